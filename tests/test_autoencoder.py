"""Tests for tinyldm.autoencoder: shapes, the Gaussian posterior, the losses, and an overfit run."""

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from tinyldm.autoencoder import (
    AttnBlock,
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    PatchDiscriminator,
    adaptive_weight,
    autoencoder_loss,
    check_autoencoder_config,
    discriminator_loss,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    latent_channel_stats,
    latent_scale_factor,
    reconstruction_loss,
)


def tiny_config(**overrides) -> AutoencoderConfig:
    kwargs = dict(base_channels=8, channel_mult=(1, 2), num_groups=4)
    kwargs.update(overrides)
    return AutoencoderConfig(**kwargs)


def draw_shapes(B: int = 4, S: int = 16) -> torch.Tensor:
    """B images in [-1, 1]: a grey background with one saturated disc or square each."""
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
    images = torch.full((B, 3, S, S), -0.5)
    for i in range(B):
        cx, cy, r = S * (0.25 + 0.15 * i), S * (0.7 - 0.1 * i), S * 0.22
        if i % 2 == 0:
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r  # disc
        else:
            mask = ((xs - cx).abs() <= r) & ((ys - cy).abs() <= r)  # square
        images[i][:, mask] = colours[i % 4][:, None]
    return images


# ------------------------------------------------------------------------------------------
# Architecture


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_encode_decode_shapes(f):
    """Latent is (B, z, H/f, W/f) and decode returns (B, 3, H, W), for every f in {1, 2, 4, 8}."""
    levels = int(math.log2(f)) + 1
    cfg = tiny_config(channel_mult=(1,) + (2,) * (levels - 1), z_channels=3)
    assert cfg.downsample_factor == f
    torch.manual_seed(0)
    model = Autoencoder(cfg)
    x = torch.randn(2, 3, 16, 16)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 3, 16 // f, 16 // f)
    assert posterior.logvar.shape == (2, 3, 16 // f, 16 // f)
    x_hat, _ = model(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == (2, 3, 16, 16)
    assert model.decode(posterior.mode()).shape == (2, 3, 16, 16)


def test_encode_rejects_bad_images():
    """H, W not divisible by f, or the wrong channel count, fails the module's assert that names the problem;
    at the boundary (check_autoencoder_config with the image size) an indivisible size is a ValueError."""
    model = Autoencoder(tiny_config(channel_mult=(1, 2, 2)))  # f = 4
    with pytest.raises(AssertionError, match="divisible"):
        model.encode(torch.randn(1, 3, 18, 16))
    with pytest.raises(AssertionError, match="expected images"):
        model.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(AssertionError, match="expected latents"):
        model.decode(torch.randn(1, 3, 4, 4))  # z_channels is 4
    with pytest.raises(ValueError, match="divisible"):
        check_autoencoder_config(model.cfg, image_size=18)
    check_autoencoder_config(model.cfg, image_size=16)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_scaled_dot_product_attention(fused):
    """Both paths of the block, fused and written out, equal x + proj_out(SDPA(q, k, v)) computed with the
    1×1 convs themselves on the feature map: the projections as matmuls over tokens are those convs."""
    torch.manual_seed(0)
    block = AttnBlock(8, num_groups=4, fused=fused)
    x = torch.randn(2, 8, 5, 3)
    B, C, H, W = x.shape
    h = block.norm(x)
    q, k, v = (conv(h).reshape(B, C, H * W).transpose(1, 2) for conv in (block.q, block.k, block.v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
    expected = x + block.proj_out(out.transpose(1, 2).reshape(B, C, H, W))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# The posterior q(z|x)


@pytest.mark.assignment(4)
def test_kl_matches_torch_distributions():
    """VAE App. B: kl() = ½Σ(μ² + σ² − 1 − log σ²) equals torch's KL(N(μ,σ) ‖ N(0,1)) summed over C,H,W."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    posterior = DiagonalGaussian(mean, logvar)
    reference = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)  # one value per image, not summed over the batch
    torch.testing.assert_close(posterior.kl().double(), reference)
    torch.testing.assert_close(kl_loss(posterior).double(), reference.mean())
    half = DiagonalGaussian(mean[:, :2].bfloat16(), logvar[:, :2].bfloat16())  # as under autocast: KL in float32
    assert half.kl().dtype == torch.float32
    reference = kl_divergence(Normal(half.mean.double(), torch.exp(0.5 * half.logvar.double())), Normal(0.0, 1.0))
    torch.testing.assert_close(half.kl().double(), reference.sum(dim=(1, 2, 3)), rtol=1e-2, atol=1e-2)  # σ² is bf16


@pytest.mark.assignment(4)
def test_kl_of_standard_normal_is_zero():
    """KL(N(0, I) ‖ N(0, I)) is exactly 0 for every image."""
    posterior = DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))
    torch.testing.assert_close(posterior.kl(), torch.zeros(2), rtol=0, atol=1e-7)


@pytest.mark.assignment(4)
def test_sample_has_right_moments():
    """z = μ + σ·ε has empirical mean μ and std σ (per channel, 10⁴ draws each)."""
    mu = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1).expand(1, 2, 100, 100)
    sigma = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1).expand(1, 2, 100, 100)
    z = DiagonalGaussian(mu, torch.log(sigma**2)).sample(torch.Generator().manual_seed(0))
    n = 100 * 100
    for c, (m, s) in enumerate([(1.5, 0.5), (-0.5, 2.0)]):
        assert abs(z[0, c].mean().item() - m) < 4 * s / math.sqrt(n)
        assert abs(z[0, c].std().item() / s - 1) < 0.03


@pytest.mark.assignment(4)
def test_sample_is_reparametrised_and_reproducible():
    """Same generator seed → same z, another seed → another z; z is differentiable with dz/dμ = 1 and
    dz/dlogvar = ½σε = ½(z − μ) (VAE Sec. 2.4), whatever ε was drawn; z has the latent's shape and dtype."""
    mean = torch.randn(2, 4, 3, 3, requires_grad=True)
    logvar = torch.randn(2, 4, 3, 3, requires_grad=True)
    posterior = DiagonalGaussian(mean, logvar)
    z1 = posterior.sample(torch.Generator().manual_seed(7))
    z2 = posterior.sample(torch.Generator().manual_seed(7))
    z3 = posterior.sample(torch.Generator().manual_seed(8))
    assert z1.shape == mean.shape and z1.dtype == mean.dtype
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    z1.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    torch.testing.assert_close(logvar.grad, 0.5 * (z1 - mean).detach())


def test_mode_is_mean_and_logvar_is_clamped():
    """mode() returns μ; logvar is clamped to [−30, 20] as in CompVis."""
    mean = torch.randn(1, 2, 2, 2)
    logvar = torch.tensor([100.0, -100.0, 0.5, -0.5]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    posterior = DiagonalGaussian(mean, logvar)
    assert torch.equal(posterior.mode(), mean)
    assert posterior.logvar.max().item() == 20.0 and posterior.logvar.min().item() == -30.0
    torch.testing.assert_close(posterior.var, torch.exp(posterior.logvar))


def test_from_moments_splits_channels():
    """from_moments takes the first z channels as μ and the last z as log σ²; odd channels fail its assert."""
    moments = torch.randn(2, 8, 3, 3)
    posterior = DiagonalGaussian.from_moments(moments)
    assert torch.equal(posterior.mean, moments[:, :4]) and torch.equal(posterior.logvar, moments[:, 4:])
    with pytest.raises(AssertionError, match="even"):
        DiagonalGaussian.from_moments(torch.randn(2, 7, 3, 3))


# ------------------------------------------------------------------------------------------
# Losses


def test_reconstruction_loss_matches_torch():
    """'l1' is F.l1_loss and 'l2' is F.mse_loss (means over pixels); unknown kinds are rejected."""
    x, x_hat = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(reconstruction_loss(x, x_hat, "l1"), F.l1_loss(x_hat, x))
    torch.testing.assert_close(reconstruction_loss(x, x_hat, "l2"), F.mse_loss(x_hat, x))
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(x, x_hat, "huber")


def test_hinge_losses_on_hand_picked_logits():
    """L_D = ½(mean relu(1 − real) + mean relu(1 + fake)); L_G = −mean(fake)."""
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 − real) = 0, 0.5, 2   → mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2     → mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert generator_adv_loss(fake).item() == pytest.approx(1.0 / 3.0)
    # confident, correct logits cost nothing
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_closed_form():
    """VQGAN Eq. 7: λ = ‖∇L_rec‖/(‖∇L_G‖ + 1e-4), clamped to max_weight, detached.

    With L_rec = ½‖w − a‖² and L_G = ⟨b, w⟩ the gradients are w − a and b.
    """
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    a = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # w − a = [[1, 0], [0, 4]], norm √17
    b = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # norm 1
    rec, g = 0.5 * (w - a).pow(2).sum(), (b * w).sum()
    weight = adaptive_weight(rec, g, w)
    assert weight.item() == pytest.approx(math.sqrt(17.0) / (1.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    # a vanishing G gradient would give √17/1e-4 ≈ 4e4: clamped
    assert adaptive_weight(rec, 0.0 * g, w).item() == pytest.approx(1e4)
    assert adaptive_weight(rec, 0.0 * g, w, max_weight=50.0).item() == pytest.approx(50.0)


def autoencoder_and_discriminator():
    """A seeded tiny autoencoder and discriminator, two Shapes images x and their reconstructions x̂."""
    torch.manual_seed(0)
    model = Autoencoder(tiny_config())
    disc = PatchDiscriminator(tiny_config(disc_channels=8, disc_layers=2))
    x = draw_shapes(2)
    x_hat, _ = model(x, generator=torch.Generator().manual_seed(0))
    return model, disc, x, x_hat


def test_adaptive_weight_on_model_matches_backward():
    """λ from autograd.grad equals the ratio of gradient norms read from .grad after backward()."""
    model, disc, x, x_hat = autoencoder_and_discriminator()
    rec = reconstruction_loss(x, x_hat, "l1")
    g = generator_adv_loss(disc(x_hat))
    weight = adaptive_weight(rec, g, model.last_layer)
    rec.backward(retain_graph=True)
    rec_norm = model.decoder.conv_out.weight.grad.norm().item()
    model.zero_grad()
    g.backward()
    g_norm = model.decoder.conv_out.weight.grad.norm().item()
    assert weight.item() == pytest.approx(rec_norm / (g_norm + 1e-4), rel=1e-4)


def test_patch_discriminator_shapes():
    """PatchGAN gives a (B, 1, h, w) logit map, works with batch 1, and rejects too-small images (its assert;
    check_autoencoder_config gives the ValueError when the discriminator is on)."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(tiny_config(disc_channels=8, disc_layers=3))
    assert disc(torch.randn(1, 3, 32, 32)).shape == (1, 1, 2, 2)  # 32→16→8→4→3→2
    assert PatchDiscriminator(tiny_config(disc_channels=8, disc_layers=2))(torch.randn(2, 3, 16, 16)).shape == (2, 1, 2, 2)
    with pytest.raises(AssertionError, match="at least 24"):
        disc(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 24"):
        check_autoencoder_config(tiny_config(disc_weight=0.1, disc_layers=3), image_size=16)
    check_autoencoder_config(tiny_config(disc_weight=0.0, disc_layers=3), image_size=16)  # no discriminator


@pytest.mark.parametrize("channels, layers, widths", [(8, 2, [8, 16, 32, 1]), (64, 3, [64, 128, 256, 512, 1]),
                                                      (16, 4, [16, 32, 64, 128, 128, 1])])
def test_patch_discriminator_follows_its_config(channels, layers, widths):
    """PatchDiscriminator(cfg) is as wide and as deep as cfg.disc_channels and cfg.disc_layers say:
    disc_layers stride-2 convs, widths doubling from disc_channels up to 8×, one logit channel; the
    defaults are pix2pix' 70×70 PatchGAN (64 channels, 3 layers)."""
    disc = PatchDiscriminator(AutoencoderConfig(disc_channels=channels, disc_layers=layers))
    convs = [m for m in disc.net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths and convs[0].in_channels == 3
    assert sum(c.stride == (2, 2) for c in convs) == layers
    assert AutoencoderConfig().disc_channels == 64 and AutoencoderConfig().disc_layers == 3


@pytest.mark.assignment(4)
@pytest.mark.parametrize("kind, rec_loss", [("l1", F.l1_loss), ("l2", F.mse_loss)])
def test_autoencoder_loss_is_rec_plus_weighted_kl(kind, rec_loss):
    """LDM Eq. 25 without the adversarial term, checked by its parts: x̂ is the decoder's output for a sample
    z ~ q(z|x) drawn from the generator (the model's forward with that generator), the loss at kl_weight = 0 is the
    config's L1 or L2 between x and x̂, and raising kl_weight by w adds w·(mean KL per image)/(C·H·W), the KL from
    torch.distributions. parts report the reconstruction loss and the mean KL."""
    torch.manual_seed(0)
    model = Autoencoder(tiny_config(kl_weight=0.0, recon_loss=kind))
    x = draw_shapes(2)
    loss0, parts, x_hat = autoencoder_loss(model, x, step=0, generator=torch.Generator().manual_seed(3))
    sampled, posterior = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_hat, sampled)
    assert not torch.allclose(x_hat, model.decode(posterior.mode()), atol=1e-6)  # a sample, not the mean
    torch.testing.assert_close(loss0, rec_loss(sampled, x))
    assert loss0.shape == () and loss0.requires_grad
    kl = kl_divergence(Normal(posterior.mean, posterior.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    model.cfg.kl_weight = 0.01
    loss, parts, _ = autoencoder_loss(model, x, step=0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss - loss0, 0.01 * kl / (3 * 16 * 16), rtol=1e-4, atol=1e-9)
    parts = {k: float(v) for k, v in parts.items()}
    assert parts["rec"] == pytest.approx(loss0.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert parts["g"] == 0.0 and parts["weight"] == 0.0
    other, _, _ = autoencoder_loss(model, x, step=0, generator=torch.Generator().manual_seed(4))
    assert other != loss  # another draw of z


@pytest.mark.assignment(4)
def test_adversarial_term_switches_on_and_reaches_decoder():
    """After disc_start the loss gains λ·disc_weight·L_G ≠ 0, and its gradient reaches decoder and encoder."""
    torch.manual_seed(0)
    model = Autoencoder(tiny_config(disc_weight=0.5, disc_start=3))
    disc = PatchDiscriminator(tiny_config(disc_channels=8, disc_layers=2))
    x = draw_shapes(2)
    loss_off, off, _ = autoencoder_loss(model, x, 2, disc, torch.Generator().manual_seed(0))
    loss_on, on, _ = autoencoder_loss(model, x, 3, disc, torch.Generator().manual_seed(0))
    off, on = ({k: float(v) for k, v in d.items()} for d in (off, on))
    assert off["g"] == 0.0 and off["weight"] == 0.0
    assert on["g"] != 0.0 and on["weight"] > 0.0
    assert on["rec"] == off["rec"]  # same posterior sample
    adversarial = loss_on - loss_off  # = λ·disc_weight·L_G, with its own graph
    assert adversarial.item() == pytest.approx(on["weight"] * 0.5 * on["g"], rel=1e-4)
    adversarial.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation: no graph, so λ is 0 and nothing breaks
        _, parts, _ = autoencoder_loss(model, x, 3, disc, torch.Generator().manual_seed(0))
    assert parts["weight"] == 0.0 and parts["g"] != 0.0


def test_discriminator_loss_trains_only_the_discriminator():
    """discriminator_loss is the hinge loss on D(x), D(x̂) with x̂ detached: no gradient to the autoencoder."""
    model, disc, x, x_hat = autoencoder_and_discriminator()
    d_loss = discriminator_loss(disc, x, x_hat)
    torch.testing.assert_close(d_loss, hinge_d_loss(disc(x), disc(x_hat)))
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert disc.net[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# Latent scaling and configuration


def test_latent_scale_factor_gives_unit_std():
    """scale_by_std: std(z·scale) == 1 over the whole batch; constant or non-finite latents are rejected."""
    z = 3.0 * torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    scale = latent_scale_factor(z)
    assert isinstance(scale, float)
    assert (z * scale).flatten().std().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="std"):
        latent_scale_factor(torch.full((2, 4, 4, 4), 0.3))
    with pytest.raises(ValueError, match="std"):
        latent_scale_factor(torch.tensor([[1.0, float("nan")]]))


def test_latent_channel_stats_standardise_each_channel():
    """(z − μ_c)·scale_c has mean 0 and std 1 in every channel, whatever each channel's own offset and
    spread; one global scale would leave the offsets (the reason for the per-channel statistics)."""
    g = torch.Generator().manual_seed(0)
    offset, spread = torch.tensor([0.0, -1.6, 0.3, 2.0]), torch.tensor([0.4, 1.1, 0.5, 3.0])
    z = torch.randn(64, 4, 8, 8, generator=g) * spread.view(1, 4, 1, 1) + offset.view(1, 4, 1, 1)
    shift, scale = latent_channel_stats(z)
    assert len(shift) == len(scale) == 4 and all(isinstance(v, float) for v in shift + scale)
    z0 = (z - torch.tensor(shift).view(1, 4, 1, 1)) * torch.tensor(scale).view(1, 4, 1, 1)
    per_channel = z0.transpose(0, 1).flatten(1)                           # (4, N·h·w)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(shift), z.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)  # the offsets removed
    global_z0 = z * latent_scale_factor(z)
    assert global_z0.mean(dim=(0, 2, 3)).abs().max() > 0.3                  # what one scale leaves behind
    with pytest.raises(ValueError, match="std"):
        latent_channel_stats(torch.cat([z[:, :3], torch.full((64, 1, 8, 8), 0.5)], 1))  # a constant channel
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        latent_channel_stats(z.flatten(2))


def test_config_json_round_trip():
    """asdict(cfg) survives json, and AutoencoderConfig(**d) rebuilds an equal config (lists → tuples)."""
    cfg = AutoencoderConfig(channel_mult=(1, 2, 4, 4), z_channels=3, recon_loss="l2", disc_weight=0.1)
    d = json.loads(json.dumps(asdict(cfg)))
    assert d["channel_mult"] == [1, 2, 4, 4]
    rebuilt = AutoencoderConfig(**d)
    assert rebuilt == cfg and rebuilt.channel_mult == (1, 2, 4, 4)
    assert rebuilt.downsample_factor == 8


@pytest.mark.parametrize("bad", [
    dict(channel_mult=(1, 2, 2, 2, 2)),  # f = 16
    dict(channel_mult=()),  # no levels
    dict(num_groups=24),  # does not divide 64
    dict(recon_loss="l3"),
    dict(dropout=1.0),
    dict(kl_weight=-1.0),
])
def test_bad_config_raises(bad):
    """Invalid configurations are rejected with a ValueError by the boundary's check (LatentDiffusion runs it)."""
    with pytest.raises(ValueError):
        check_autoencoder_config(AutoencoderConfig(**bad))
    check_autoencoder_config(AutoencoderConfig())  # the defaults pass


# ------------------------------------------------------------------------------------------
# Overfit one batch


def test_overfit_one_batch():
    """A tiny autoencoder trained with autoencoder_loss on 4 shapes drives the reconstruction MSE below 1/10."""
    torch.manual_seed(0)
    model = Autoencoder(tiny_config(recon_loss="l2"))
    x = draw_shapes(4, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = F.mse_loss(model(x, sample_posterior=False)[0], x).item()
    for step in range(100):
        loss, _, _ = autoencoder_loss(model, x, step, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = F.mse_loss(model(x, sample_posterior=False)[0], x).item()
    assert end < start / 10, f"MSE went from {start:.4f} to {end:.4f}"
