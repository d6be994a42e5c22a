"""KL-regularised autoencoder: image x (B, 3, H, W) <-> latent z (B, z, H/f, W/f).

This is the first stage of latent diffusion (Rombach et al. 2022, "LDM", Sec. 3.1 and App. G),
written after CompVis' `AutoencoderKL`. The encoder E outputs a diagonal Gaussian q(z|x); the
decoder D maps a sample z back to pixels. Training minimises (LDM Eq. 25)

    L = L_rec(x, D(z)) + kl_weight · KL(q(z|x) ‖ N(0, I)) + λ · disc_weight · L_G      (z ~ q(z|x))

with a tiny KL weight (the latent only has to be "roughly Gaussian", not a good VAE prior) and an
optional PatchGAN adversarial term whose weight λ is set adaptively (VQGAN Eq. 7).

What we leave out on purpose: LPIPS, the perceptual loss the LDM paper adds to L_rec, needs
pretrained VGG weights that would have to be downloaded. We use a plain pixel loss (L2 by default,
see `AutoencoderConfig.recon_loss`) plus, optionally, the patch discriminator. The cost is blurrier
fine texture; on the flat-coloured shapes of tinyldm's dataset there is no texture to lose, so it
does not matter here. We also leave
out CompVis' learned output log-variance (its `logvar` parameter), which only rescales L_rec.

Conventions: images are expected in [-1, 1]; the decoder output is not squashed (no tanh), as in
CompVis. H and W must be divisible by f. All randomness takes an optional torch.Generator.
The modules assert what they assume; `check_autoencoder_config`, at the end of the file, is the full
check with advice, for the code a user calls (LatentDiffusion).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyldm.unet import Downsample, Upsample  # the U-Net's stride-2 conv and nearest ×2 + conv, as in CompVis


@dataclass
class AutoencoderConfig:
    in_channels: int = 3  # image channels (RGB); the decoder outputs the same number
    z_channels: int = 4  # latent channels (LDM's KL-f4/f8 models use 3 or 4)
    base_channels: int = 64  # width of the first level; level i has base_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2)  # one entry per resolution level; f = 2 ** (len - 1)
    num_res_blocks: int = 1  # ResnetBlocks per level in the encoder (the decoder uses one more, as CompVis)
    mid_attention: bool = True  # single-head self-attention in the middle of encoder and decoder
    num_groups: int = 32  # GroupNorm groups; must divide every width
    dropout: float = 0.0  # dropout inside ResnetBlocks
    # CompVis sums L_rec and the KL over each image; autoencoder_loss averages both over the
    # C·H·W pixel values instead, which keeps their ratio, so 1e-6 means what it means in CompVis.
    kl_weight: float = 1e-6  # weight of KL(q(z|x) ‖ N(0,I)) (CompVis kl-f* configs use 1e-6)
    # L1 or L2? The L2 optimum is the mean of plausible outputs, which blurs edges, while L1 (a
    # median) keeps flat regions and sharp edges (Isola et al. 2017, pix2pix Sec. 3.1); CompVis'
    # LPIPSWithDiscriminator (ldm/modules/losses/contperceptual.py) pairs |x - x̂| with a GAN. But on
    # Shapes, where objects cover a few % of the pixels, the median is "background everywhere" for a
    # long time: measured with train_small's cpu autoencoder (32x32, 400 Adam steps at 1e-3), L2
    # reached 28.3 dB PSNR and L1 24.7 dB with the colours still wrong. So L2 is the default.
    recon_loss: str = "l2"  # "l2" or "l1"
    disc_weight: float = 0.0  # weight of the adversarial term; 0 disables the discriminator
    disc_start: int = 0  # training step from which the adversarial term is switched on
    disc_channels: int = 64  # width of the first PatchDiscriminator layer
    disc_layers: int = 3  # stride-2 layers of the PatchDiscriminator (3 gives 70×70 patches)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # JSON gives lists back

    @property
    def downsample_factor(self) -> int:
        """f: the latent is H/f × W/f."""
        return 2 ** (len(self.channel_mult) - 1)


# ----------------------------------------------------------------------------------------------
# The posterior q(z|x) = N(μ, diag σ²)


class DiagonalGaussian:
    """A diagonal Gaussian over latents: the encoder's posterior q(z|x) = N(mean, exp(logvar))."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as CompVis: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)  # σ
        self.var = torch.exp(self.logvar)  # σ²
        assert mean.shape == logvar.shape, f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ"

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split the encoder output (B, 2·z, h, w) into mean and log-variance along channels."""
        assert moments.shape[1] % 2 == 0, f"moments need an even number of channels, got {tuple(moments.shape)}"
        mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, z, h, w) each
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparametrised sample, differentiable in mean and logvar."""
        # BEGIN ASSIGNMENT 4: the reparametrisation trick, ε drawn from `generator`
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps  # VAE (Kingma & Welling) Sec. 2.4: z = μ + σ ⊙ ε
        # END ASSIGNMENT 4

    def mode(self) -> torch.Tensor:
        """The most likely latent, μ (used to encode deterministically)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)) summed over C, H, W: one value per image, shape (B,)."""
        # BEGIN ASSIGNMENT 4: VAE App. B, in float32, summed over every dimension but the batch
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()  # fp32 under autocast
        dims = list(range(1, mean.dim()))
        # VAE (Kingma & Welling) App. B: KL = ½ Σ (μ² + σ² − 1 − log σ²)
        return 0.5 * torch.sum(mean.pow(2) + var - 1.0 - logvar, dim=dims)
        # END ASSIGNMENT 4


# ----------------------------------------------------------------------------------------------
# Building blocks


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus a skip (a 1×1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions of a feature map, with a residual.

    Written out here, not imported from unet.py: it is CompVis' single-head block with 1×1-conv
    projections, and the autoencoder's assignment (4) must not run the U-Net's (5). A 1×1 conv is one
    linear map applied at every position, so the projections run as matmuls on the (B, HW, C) tokens
    with the convs' own weights (on a CPU, 1.6× faster inference for the whole cpu-preset autoencoder than
    1×1 convs on its 16×16 maps: README, Performance). `fused` (True) runs softmax(QKᵀ/√d)V as one kernel,
    F.scaled_dot_product_attention; False runs the formula written out, QKᵀ in the input dtype, scale
    and softmax in float32 (the U-Net's and the text encoder's precision policy).
    """

    def __init__(self, channels: int, num_groups: int, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.norm = nn.GroupNorm(num_groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _per_position(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        """A 1×1 conv applied to tokens (B, HW, C_in) -> (B, HW, C_out): W·x + b at every position."""
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): one token per position
        q, k, v = (self._per_position(conv, h) for conv in (self.q, self.k, self.v))  # (B, HW, C) each
        if self.fused:  # Transformer Eq. 1 in one kernel, one head: (B, 1, HW, C)
            out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        else:
            scores = torch.bmm(q, k.transpose(1, 2)).float() / math.sqrt(C)  # (B, HW, HW)  Transformer Eq. 1: QKᵀ/√d
            attn = torch.softmax(scores, dim=-1).to(v.dtype)  # (B, HW, HW)  each query's weights sum to 1
            out = torch.bmm(attn, v)  # (B, HW, C)  Transformer Eq. 1: softmax(QKᵀ/√d)·V
        out = self._per_position(self.proj_out, out)  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Encoder(nn.Module):
    """x (B, in, H, W) → moments (B, 2·z, H/f, W/f): conv_in, levels, mid, GN-SiLU-conv_out."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        ch = cfg.base_channels
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width, cfg.num_groups, cfg.dropout))
                ch = width
            if i != len(widths) - 1:  # no downsampling after the last level
                blocks.append(Downsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.mid = nn.Sequential(
            ResnetBlock(ch, ch, cfg.num_groups, cfg.dropout),
            AttnBlock(ch, cfg.num_groups) if cfg.mid_attention else nn.Identity(),
            ResnetBlock(ch, ch, cfg.num_groups, cfg.dropout),
        )
        self.norm_out = nn.GroupNorm(cfg.num_groups, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, base, H, W)
        for level in self.levels:
            h = level(h)  # (B, width_i, ·, ·), H and W halved after every level but the last
        h = self.mid(h)  # (B, width_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2·z, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z, h, w) → x̂ (B, in, h·f, w·f): the encoder's mirror image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(ch, ch, cfg.num_groups, cfg.dropout),
            AttnBlock(ch, cfg.num_groups) if cfg.mid_attention else nn.Identity(),
            ResnetBlock(ch, ch, cfg.num_groups, cfg.dropout),
        )
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):  # one more than the encoder, as CompVis
                blocks.append(ResnetBlock(ch, widths[i], cfg.num_groups, cfg.dropout))
                ch = widths[i]
            if i != 0:  # no upsampling after the full-resolution level
                blocks.append(Upsample(ch))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = nn.GroupNorm(cfg.num_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, width_last, h, w)
        for level in self.levels:
            h = level(h)  # doubled in H and W after every level but the last
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, in, h·f, w·f)


class Autoencoder(nn.Module):
    """The KL autoencoder. encode(x) gives q(z|x); decode(z) gives x̂.

    As in CompVis, 1×1 convs sit between the encoder and the posterior ("quant_conv") and between
    the latent and the decoder ("post_quant_conv"); they are kept so the layout matches the
    reference, and cost next to nothing.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images x (B, in, H, W) -> q(z|x) over latents (B, z, H/f, W/f)."""
        B, C, H, W = x.shape
        f = self.cfg.downsample_factor
        assert C == self.cfg.in_channels, f"expected images (B, {self.cfg.in_channels}, H, W), got {(B, C, H, W)}"
        assert H % f == 0 and W % f == 0, f"H and W must be divisible by the downsample factor f={f}, got {H}×{W}"
        moments = self.quant_conv(self.encoder(x))  # (B, 2·z, H/f, W/f)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (B, z, h, w) -> images x̂ (B, in, h·f, w·f)."""
        assert z.shape[1] == self.cfg.z_channels, f"expected latents (B, {self.cfg.z_channels}, h, w), got {tuple(z.shape)}"
        return self.decoder(self.post_quant_conv(z))  # (B, in, h·f, w·f)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None):
        """Encode, take a sample (or the mean), decode. Returns (x̂, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv: where the adaptive weight λ compares gradients."""
        return self.decoder.conv_out.weight


# ----------------------------------------------------------------------------------------------
# Losses


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean over all pixels of |x − x̂| ("l1") or (x − x̂)² ("l2")."""
    if kind == "l1":
        return (x - x_hat).abs().mean()
    if kind == "l2":
        return (x - x_hat).pow(2).mean()
    raise ValueError(f"reconstruction loss kind must be 'l1' or 'l2', got {kind!r}")


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """L_reg: KL(q(z|x) ‖ N(0, I)) per image, averaged over the batch."""
    return posterior.kl().mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one real/fake logit per overlapping image patch.

    Built from the autoencoder's config: 4×4 convs with LeakyReLU(0.2), the first cfg.disc_channels
    wide, cfg.disc_layers of them with stride 2, then one with stride 1 (each after the first doubles
    the width, up to 8×), then a 1-channel conv. The defaults (64 channels, 3 layers) are pix2pix'
    70×70 PatchGAN. GroupNorm replaces pix2pix' BatchNorm so that batches of 1 or 2 behave.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        channels, self.n_layers = cfg.disc_channels, cfg.disc_layers
        layers = [nn.Conv2d(cfg.in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, self.n_layers + 1):
            next_width = channels * min(2 ** n, 8)
            stride = 2 if n < self.n_layers else 1  # the last of these keeps the resolution
            layers += [nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(math.gcd(32, next_width), next_width),  # 32 groups, or fewer that divide
                       nn.LeakyReLU(0.2)]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))  # one logit per patch
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        min_size = 3 * 2 ** self.n_layers  # n_layers halvings, then two 4×4 convs that each lose 1
        assert min(H, W) >= min_size, f"{self.n_layers} layers need images of at least {min_size}, got {H}×{W}"
        return self.net(x)  # (B, 1, h, w) logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; taming/CompVis `hinge_d_loss`)."""
    loss_real = F.relu(1.0 - logits_real).mean()  # push real logits above +1
    loss_fake = F.relu(1.0 + logits_fake).mean()  # push fake logits below −1
    return 0.5 * (loss_real + loss_fake)  # L_D = ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (here: decoder) adversarial loss L_G = −E[D(x̂)]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """λ balancing L_G against L_rec at the decoder's last layer (LDM Eq. 25, VQGAN Eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)  # VQGAN Eq. 7: λ = ‖∇L_rec‖ / (‖∇L_G‖ + δ)
    return weight.clamp(0.0, max_weight).detach()


def autoencoder_loss(model, x: torch.Tensor, step: int, discriminator=None,
                     generator: torch.Generator | None = None):
    """The autoencoder's training loss (LDM Eq. 25) on a batch x. Returns (loss, parts, x_hat).

    `model` is an Autoencoder, or one wrapped in DistributedDataParallel (it is called through
    forward). Both terms are per pixel value: L_rec is a mean, and the KL (a sum over the latent
    of one image) is divided by C·H·W, as CompVis' sums divided by the same number.
    parts holds detached 0-d tensors for logging: rec, kl (per image), g (adversarial loss) and
    weight (λ); g and weight are 0 while the discriminator is off. The discriminator also gets
    gradients from L_G here: zero its grads before its own step (see discriminator_loss).
    """
    core = getattr(model, "module", model)  # the Autoencoder itself, also under DDP
    cfg = core.cfg
    # BEGIN ASSIGNMENT 4: LDM Eq. 25 without the adversarial term; defines x_hat, rec, kl and loss
    x_hat, posterior = model(x, sample_posterior=True, generator=generator)  # z ~ q(z|x), x̂ = D(z)
    rec = reconstruction_loss(x, x_hat, cfg.recon_loss)
    kl = kl_loss(posterior)
    loss = rec + cfg.kl_weight * kl / x[0].numel()  # LDM Eq. 25: L_rec + L_reg, per pixel value
    # END ASSIGNMENT 4
    g = torch.zeros((), device=x.device)
    weight = torch.zeros((), device=x.device)
    if discriminator is not None and cfg.disc_weight > 0 and step >= cfg.disc_start:
        g = generator_adv_loss(discriminator(x_hat))
        if torch.is_grad_enabled():  # without a graph (evaluation) λ stays 0, as in CompVis
            weight = adaptive_weight(rec, g, core.last_layer)
        loss = loss + weight * cfg.disc_weight * g  # LDM Eq. 25: + λ·L_adv
    parts = {name: t.detach().float() for name, t in (("rec", rec), ("kl", kl), ("g", g), ("weight", weight))}
    return loss, parts, x_hat


def discriminator_loss(discriminator: PatchDiscriminator, x: torch.Tensor,
                       x_hat: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator on real x and reconstructed x̂ (x̂ detached)."""
    return hinge_d_loss(discriminator(x), discriminator(x_hat.detach()))


# ----------------------------------------------------------------------------------------------
# Latent scaling for the diffusion stage


@torch.no_grad()
def latent_scale_factor(z: torch.Tensor) -> float:
    """1 / std(z) over the whole batch, so that z·scale has unit variance for the diffusion model.

    This is CompVis' `scale_by_std` (ldm/models/diffusion/ddpm.py), computed on a first batch of
    latents; Stable Diffusion's 0.18215 was obtained this way.
    """
    std = float(z.detach().double().flatten().std())  # float64: a constant batch gives exactly 0
    if not math.isfinite(std) or std < 1e-8:
        raise ValueError(f"cannot scale latents: their std is {std} (need a finite std > 1e-8, "
                         f"i.e. latents that are not constant; got {z.numel()} values)")
    return 1.0 / std


@torch.no_grad()
def latent_channel_stats(z: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel shift μ_c and scale 1/σ_c of latents z (N, C, h, w): z0 = (z − μ_c) / σ_c has zero
    mean and unit variance in every channel.

    One global scale (latent_scale_factor) leaves each channel's mean in z0: an offset the encoder puts
    in a channel is counted as signal, the scale comes out small, and the object's own variation ends
    up small next to the unit noise. Standardising each channel removes the offsets first (the
    per-channel `latents_mean` / `latents_std` of later latent diffusion models)."""
    if z.dim() != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(z.shape)}")
    per_channel = z.detach().double().transpose(0, 1).flatten(1)         # (C, N·h·w), float64
    mean, std = per_channel.mean(1), per_channel.std(1)                   # μ_c, σ_c   (C,) each
    if not (torch.isfinite(std).all() and std.min() > 1e-8):
        raise ValueError(f"cannot standardise latents: per-channel std {[round(float(s), 6) for s in std]} "
                         f"(need every channel finite and not constant; got {z.numel()} values)")
    return mean.tolist(), (1.0 / std).tolist()


# ----------------------------------------------------------------------------------------------
# The full check, for the code a user calls (LatentDiffusion); the modules above only assert


def check_autoencoder_config(cfg: AutoencoderConfig, image_size: int | None = None):
    """Raise ValueError, with what to change, if `cfg` (and images of side `image_size`) cannot work."""
    n = len(cfg.channel_mult)
    if n not in (1, 2, 3, 4):
        raise ValueError(f"downsample factor f = 2**(len(channel_mult)-1) must be 1, 2, 4 or 8; "
                         f"got channel_mult={cfg.channel_mult} ({n} levels)")
    for name in ("in_channels", "z_channels", "base_channels", "num_res_blocks", "num_groups",
                 "disc_channels", "disc_layers"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    if min(cfg.channel_mult) < 1:
        raise ValueError(f"channel_mult entries must be >= 1, got {cfg.channel_mult}")
    widths = [cfg.base_channels] + [cfg.base_channels * m for m in cfg.channel_mult]
    bad = [w for w in widths if w % cfg.num_groups != 0]
    if bad:
        raise ValueError(f"num_groups={cfg.num_groups} must divide every width {sorted(set(widths))} "
                         f"(GroupNorm); it does not divide {sorted(set(bad))}")
    if cfg.recon_loss not in ("l1", "l2"):
        raise ValueError(f"recon_loss must be 'l1' or 'l2', got {cfg.recon_loss!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    for name in ("kl_weight", "disc_weight", "disc_start"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if image_size is not None and image_size % cfg.downsample_factor != 0:
        raise ValueError(f"image_size {image_size} must be divisible by the downsample factor "
                         f"f={cfg.downsample_factor} (channel_mult={cfg.channel_mult})")
    if image_size is not None and cfg.disc_weight > 0 and image_size < 3 * 2 ** cfg.disc_layers:
        raise ValueError(f"the patch discriminator with disc_layers={cfg.disc_layers} needs images of at least "
                         f"{3 * 2 ** cfg.disc_layers} pixels a side, got {image_size}; use fewer disc_layers")
