"""LatentDiffusion: the components wired together (tinyldm/ldm.py)."""

import json

import pytest
import torch

from tinyldm.autoencoder import AutoencoderConfig
from tinyldm.diffusion import DiffusionConfig
from tinyldm.ldm import LatentDiffusion
from tinyldm.text_encoder import TextEncoderConfig, train_tokenizer
from tinyldm.unet import UNetConfig

CAPTIONS = ["a red circle", "a blue square", "a big green triangle at the top left"]


def tiny_model(p_uncond=0.0, seed=0, prediction="eps"):
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=50)
    return LatentDiffusion(
        tokenizer,
        TextEncoderConfig(vocab_size=tokenizer.get_vocab_size(), max_length=12, d_model=32, n_layers=1, n_heads=2),
        AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), num_groups=4, mid_attention=False),
        UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                   num_heads=2, context_dim=32, num_groups=4),
        DiffusionConfig(T=100, beta_start=0.0085, beta_end=0.12, p_uncond=p_uncond, prediction=prediction),
        image_size=16, scale_factor=0.7)


def test_shapes_through_the_pipeline():
    """Images -> latents (B, 4, H/4, W/4) -> images; prompts -> context (B, L, d) and mask (B, L)."""
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z0 = model.encode_images(x, generator=torch.Generator().manual_seed(0))
    assert z0.shape == (2, 4, 4, 4)
    assert model.decode_latents(z0).shape == (2, 3, 16, 16)
    context, mask = model.encode_text(["a red circle", ""])
    assert context.shape == (2, 12, 32) and mask.sum(1).tolist() == [4, 1]
    assert model.loss(x, ["a red circle", "a blue square"]).shape == ()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_eps_model_is_eps_whatever_the_unet_predicts(prediction):
    """eps_model gives ε̂ for either parametrisation: the U-Net's output itself, or, for a v-model,
    ε̂ = √(1−ᾱ_t)·z_t + √ᾱ_t·v̂ (v-pred); the loss trains unet_output on the matching target."""
    model = tiny_model(prediction=prediction)
    for p in model.unet.parameters():  # the zero-initialised output layer would hide the difference
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 90])
    cond = model.encode_text(["a red circle", ""])
    with torch.no_grad():
        out, eps = model.unet_output(z_t, t, cond), model.eps_model(z_t, t, cond)
    a_bar = model.schedule.alpha_bars[t].float().view(2, 1, 1, 1)
    want = out if prediction == "eps" else (1 - a_bar).sqrt() * z_t + a_bar.sqrt() * out
    torch.testing.assert_close(eps, want, atol=1e-5, rtol=1e-5)
    if prediction == "v":
        assert (eps - out).abs().max() > 1e-3


def test_scale_factor_multiplies_latents():
    """z0 = scale · E(x) (LDM Sec. 4.3.2), and decode divides by the same scale."""
    model = tiny_model()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = model.autoencoder.encode(x).mode()
    assert torch.allclose(model.encode_images(x, sample=False), 0.7 * z)
    assert torch.allclose(model.decode_latents(0.7 * z), model.autoencoder.decode(z).clamp(-1, 1), atol=1e-5)


def test_per_channel_shift_and_scale():
    """z0 = (z − μ_c)·s_c per channel, decode_latents undoes it, and both survive save/load as lists."""
    model = tiny_model()
    model.latent_shift, model.scale_factor = [0.5, -1.0, 0.0, 2.0], [1.0, 0.5, 2.0, 0.25]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.autoencoder.encode(x).mode()                                 # (2, 4, 4, 4)
    z0 = model.encode_images(x, sample=False)
    for c in range(4):
        torch.testing.assert_close(z0[:, c], (z[:, c] - model.latent_shift[c]) * model.scale_factor[c])
    torch.testing.assert_close(model.denormalize_latents(z0), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode_latents(z0), model.autoencoder.decode(z).clamp(-1, 1), atol=1e-5, rtol=0)
    assert model.normalize_latents(z.double()).dtype == torch.float64      # the constants follow z's dtype


def test_shift_and_scale_are_checked_and_saved(tmp_path):
    """A per-channel list has one entry per latent channel and positive scales; model.json keeps lists as
    lists, and a model.json written before the shift existed loads with shift 0."""
    model = tiny_model()
    args = (model.tokenizer, model.text_cfg, model.autoencoder_cfg, model.unet_cfg, model.diffusion_cfg, 16)
    with pytest.raises(ValueError, match="scale_factor has 3 entries"):
        LatentDiffusion(*args, scale_factor=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale_factor must be > 0"):
        LatentDiffusion(*args, scale_factor=[1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="latent_shift must be finite"):
        LatentDiffusion(*args, latent_shift=float("nan"))
    model = LatentDiffusion(*args, scale_factor=[1.0, 0.5, 2.0, 0.25], latent_shift=[0.5, -1.0, 0.0, 2.0])
    model.save(tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["scale_factor"] == [1.0, 0.5, 2.0, 0.25] and saved["latent_shift"] == [0.5, -1.0, 0.0, 2.0]
    loaded = LatentDiffusion.load(tmp_path)
    assert loaded.scale_factor == model.scale_factor and loaded.latent_shift == model.latent_shift
    del saved["latent_shift"]
    (tmp_path / "model.json").write_text(json.dumps(saved))
    assert LatentDiffusion.load(tmp_path).latent_shift == 0.0


def test_a_model_saved_before_scale_shift_existed_loads_with_additive_resblocks(tmp_path):
    """model.json without unet.scale_shift (saved before the field existed) loads as the additive ResBlocks its
    weights were trained with (a time projection of C_out outputs), and gives the same outputs."""
    model = tiny_model()
    model.save(tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["unet"].pop("scale_shift") is False
    (tmp_path / "model.json").write_text(json.dumps(saved))
    loaded = LatentDiffusion.load(tmp_path)
    assert loaded.unet_cfg.scale_shift is False
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 70]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(z, t, c), model.unet(z, t, c), atol=0, rtol=0)


def test_caption_dropout_rate():
    """drop_captions replaces a row by the empty prompt with probability p_uncond (CFG Sec. 3.2)."""
    model = tiny_model(p_uncond=0.3)
    ids, mask = model.tokenize(["a red circle"] * 4000)
    new_ids, new_mask = model.drop_captions(ids, mask, torch.Generator().manual_seed(0))
    dropped = (new_mask.sum(1) == 1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    empty_ids, empty_mask = model.tokenize([""])
    assert (new_ids[dropped] == empty_ids).all() and (new_ids[~dropped] == ids[~dropped]).all()
    assert (tiny_model(p_uncond=0.0).drop_captions(ids, mask)[0] == ids).all()


def test_text_and_unet_overfit_a_fixed_batch_and_use_the_caption():
    """Text encoder + U-Net learn to denoise two fixed latents with different captions: the loss
    (DDPM Eq. 14 on fixed (t, ε) pairs) falls well below its start, and swapping the captions
    raises it (a model that ignored the text would score exactly the same)."""
    model = tiny_model()
    model.autoencoder.requires_grad_(False)
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ids, mask = model.tokenize(["a red circle", "a blue square"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    probe = torch.Generator().manual_seed(2)
    t = torch.arange(0, 100, 4).repeat_interleave(2)                        # (50,) both latents at 25 steps
    eps = torch.randn(50, 4, 4, 4, generator=probe)

    def probe_loss(ids_, mask_):
        with torch.no_grad():
            x_t = model.schedule.q_sample(z0.repeat(25, 1, 1, 1), t, eps)
            context = model.text_encoder(ids_.repeat(25, 1), mask_.repeat(25, 1))
            return torch.nn.functional.mse_loss(model.eps_model(x_t, t, (context, mask_.repeat(25, 1))), eps).item()

    start = probe_loss(ids, mask)
    for _ in range(150):
        loss = model(z0.repeat(4, 1, 1, 1), ids.repeat(4, 1), mask.repeat(4, 1), generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, swapped = probe_loss(ids, mask), probe_loss(ids.flip(0), mask.flip(0))
    assert end < 0.3 * start, (start, end)
    assert swapped > 1.2 * end, (end, swapped)


def test_save_and_load_round_trip(tmp_path):
    """save() writes configs as JSON and state dicts; load() rebuilds an identical model."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make the zero-initialised layers matter
    model.save(tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["scale_factor"] == 0.7
    loaded = LatentDiffusion.load(tmp_path)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.generate(["a red circle"], steps=3, generator=gen())
    b = loaded.generate(["a red circle"], steps=3, generator=gen())
    assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_load_leaves_other_entries_of_the_run_folder_alone(tmp_path):
    """A run folder whose model.json and model.pt also hold a classifier (the layout before the classifier
    had its own files) still loads: load() reads the four components' entries and nothing else."""
    model = tiny_model()
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps(dict(cfg, classifier={"channels": 16})))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save(dict(state, classifier={"conv_in.weight": torch.zeros(1)}), tmp_path / "model.pt")
    loaded = LatentDiffusion.load(tmp_path)
    assert not hasattr(loaded, "classifier")
    for name in ("text_encoder", "autoencoder", "unet"):
        for key, value in getattr(model, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], value), (name, key)


def test_generate_validates_and_guidance_changes_the_result():
    """Unknown sampler is an error; guidance scale 1 vs 5 give different images; DDPM runs all T."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ValueError, match="sampler"):
        model.generate(["a red circle"], sampler="euler")
    model.train()
    with pytest.raises(ValueError, match="classifier"):
        model.generate(["a red circle"], classifier_scale=2.0)  # no classifier_grad to guide with
    assert model.training  # a failed call leaves the mode as it was
    model.eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    one = model.generate(["a red circle"], steps=4, guidance_scale=1.0, generator=gen())
    five = model.generate(["a red circle"], steps=4, guidance_scale=5.0, generator=gen())
    assert not torch.allclose(one, five)
    calls = []
    model.generate(["a red circle"], sampler="ddpm", guidance_scale=1.0, generator=gen(),
                   callback=lambda i, t, x, x0: calls.append(t))
    assert calls == list(range(99, -1, -1))


def test_generate_guides_with_a_classifier_gradient():
    """classifier_grad(z_t, t) reaches the sampler: it is called once per step with z_t (B, z, h, w) and t (B,)
    when classifier_scale != 0, never when it is 0 (then the images are the unguided ones, bit for bit)."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []

    def towards_one(z_t, t):  # ∇ log N(1; z_t, I): pulls every latent towards 1
        calls.append((tuple(z_t.shape), tuple(t.shape)))
        return 1 - z_t

    def run(**guidance):  # the latents z0 of two prompts, from the same starting noise
        generator = torch.Generator().manual_seed(0)
        return model.generate(["a red circle", ""], steps=4, generator=generator, return_latents=True, **guidance)[1]

    plain = run()
    assert torch.equal(run(classifier_grad=towards_one, classifier_scale=0.0), plain) and calls == []
    guided = run(classifier_grad=towards_one, classifier_scale=3.0)
    assert calls == [((2, 4, 4, 4), (2,))] * 4
    assert (guided - 1).abs().mean() < (plain - 1).abs().mean()


def test_mismatched_components_are_rejected():
    """The text width must equal the U-Net's context_dim; latent channels its input channels."""
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=50)
    with pytest.raises(ValueError, match="context_dim"):
        LatentDiffusion(tokenizer, TextEncoderConfig(vocab_size=50, d_model=32, n_heads=2),
                        AutoencoderConfig(base_channels=8, num_groups=4), UNetConfig(context_dim=64, num_groups=8),
                        DiffusionConfig(), image_size=16)


def test_training_draws_t_from_the_noisy_end(monkeypatch):
    """DiffusionConfig.p_noisy_t = 1: every training t lies in [noisy_t_from·T, T); 0: they spread over all T."""
    import tinyldm.ldm

    seen, real = [], tinyldm.ldm.diffusion_loss

    def spy(*args, t=None, **kwargs):
        seen.append(t)
        return real(*args, t=t, **kwargs)

    monkeypatch.setattr(tinyldm.ldm, "diffusion_loss", spy)
    model = tiny_model()
    ids, mask = model.tokenize(["a red circle"] * 256)
    z0 = torch.randn(256, 4, 4, 4)
    model(z0, ids, mask, torch.Generator().manual_seed(0))
    assert seen[-1].min() < 30 and seen[-1].max() > 90  # T = 100, uniform
    model.diffusion_cfg.p_noisy_t, model.diffusion_cfg.noisy_t_from = 1.0, 0.7
    model(z0, ids, mask, torch.Generator().manual_seed(0))
    assert seen[-1].min() >= 70 and seen[-1].max() == 99


def test_bad_component_configs_fail_at_the_boundary():
    """LatentDiffusion checks every component's config with a clear ValueError, before building anything:
    heads that do not divide the U-Net's attention widths, an image side the autoencoder's f does not divide."""
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=50)
    text = TextEncoderConfig(vocab_size=tokenizer.get_vocab_size(), max_length=12, d_model=32, n_layers=1, n_heads=2)
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), num_groups=4, mid_attention=False)
    unet = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), context_dim=32,
                num_groups=4)
    with pytest.raises(ValueError, match="num_heads"):
        LatentDiffusion(tokenizer, text, ae, UNetConfig(num_heads=3, **unet), DiffusionConfig(), image_size=16)
    with pytest.raises(ValueError):
        LatentDiffusion(tokenizer, text, ae, UNetConfig(num_heads=2, **unet), DiffusionConfig(), image_size=18)
    LatentDiffusion(tokenizer, text, ae, UNetConfig(num_heads=2, **unet), DiffusionConfig(), image_size=16)


def test_the_package_points_nowhere_above_it():
    """Nothing in tinyldm/ imports or runs the training script, the benchmark, the course tooling or the
    notebooks' helpers, or reads the tests: the package is the model, its data and its evaluation."""
    import ast
    from pathlib import Path

    import tinyldm

    for path in Path(tinyldm.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert not imported & {"train_small", "bench", "course", "helpers", "tests", "subprocess"}, path.name
        strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        assert not any(s.endswith(("train_small.py", "bench.py")) or s.startswith("tests/") for s in strings), path.name
