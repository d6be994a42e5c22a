"""Editing with the same trained model (tinyldm/ldm.py): image-to-image (SDEdit), inpainting (RePaint),
per-sample guidance scales, the cross-attention weights of each CFG pass, and their command lines."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import tinyldm.__main__ as tinyldm_cli
from tests.test_ldm import tiny_model
from tinyldm.__main__ import main as cli
from tinyldm.data import COLOUR_NAMES, render, to_float
from tinyldm.diffusion import ddim_timesteps, sdedit_timesteps
from tinyldm.evaluate import (_object, _say, edit_scenes, edit_tests, inpaint_test, object_box_mask, other_colour,
                              recolour_prompt, recolour_test)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def model():
    """The tiny model of test_ldm.py with its U-Net's weights shaken (its zero-initialised output layer would
    make every ε̂ zero and hide the guidance and the prompts)."""
    m = tiny_model()
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m.eval()


def images_and_noise(model, B=2, seed=0):
    """B images in [-1, 1] at the model's size, and a noise ε (B, z, h, w), both fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, model.image_size, model.image_size, generator=g) * 2 - 1
    return x, torch.randn(B, *model.latent_shape, generator=g)


def half_mask(model, B=2):
    """Pixel masks (B, 1, H, W) that repaint the left half of each image."""
    S = model.image_size
    masks = torch.zeros(B, 1, S, S)
    masks[..., : S // 2] = 1
    return masks


# -- image-to-image -----------------------------------------------------------------------------


def test_sdedit_timesteps_are_the_ddim_steps_at_or_below_t0():
    """t0 = round(s·T) − 1 (half up, at least 0); the edit runs the τ of ddim_timesteps(T, steps) with τ ≤ t0."""
    assert ddim_timesteps(100, 5) == [99, 74, 50, 25, 0]
    assert sdedit_timesteps(100, 5, 1.0) == [99, 74, 50, 25, 0]
    assert sdedit_timesteps(100, 5, 0.75) == [74, 50, 25, 0]       # t0 = 74: on the grid
    assert sdedit_timesteps(100, 5, 0.6) == [50, 25, 0]            # t0 = 59: the next grid step below
    assert sdedit_timesteps(100, 5, 0.255) == [25, 0]              # 25.5 rounds up: t0 = 25
    assert sdedit_timesteps(100, 5, 0.001) == [0]                  # t0 never below 0
    assert sdedit_timesteps(1000, 50, 0.6) == [t for t in ddim_timesteps(1000, 50) if t <= 599]
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="strength must be a number in \\(0, 1\\]"):
            sdedit_timesteps(100, 5, bad)
    with pytest.raises(ValueError, match="runs no step"):
        sdedit_timesteps(100, 1, 0.5)                              # one DDIM step: only t = 99


def test_img2img_at_strength_one_is_generate_with_the_same_x_T(model):
    """Strength 1 forgets the image: with noise = x_T it is generate(x_T = x_T) (DDIM, η = 0), bit for bit."""
    x, x_T = images_and_noise(model)
    _, want = model.generate(PROMPTS, steps=5, guidance_scale=3.0, x_T=x_T, return_latents=True)
    _, got = model.img2img(x, PROMPTS, strength=1.0, steps=5, guidance_scale=3.0, noise=x_T, return_latents=True)
    assert torch.equal(got, want)


def test_img2img_starts_at_q_sample_and_runs_the_sdedit_timesteps(model):
    """The start is q_sample(z0, τ_0, ε) (DDPM Eq. 4) with z0 the posterior mean of the image, at τ_0, the first
    of sdedit_timesteps; the sampler then visits exactly those steps."""
    x, eps = images_and_noise(model)
    seen = []
    model.img2img(x, PROMPTS, strength=0.6, steps=5, noise=eps, callback=lambda i, t, z_t, x0: seen.append((t, z_t)))
    assert [t for t, _ in seen] == sdedit_timesteps(100, 5, 0.6) == [50, 25, 0]
    z0 = model.encode_images(x, sample=False)
    torch.testing.assert_close(seen[0][1], model.schedule.q_sample(z0, 50, eps), atol=0, rtol=0)


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
def test_img2img_with_an_exact_noise_prediction_returns_the_input_latent(model, monkeypatch, strength):
    """With a U-Net that predicts the very ε the start was noised with, every DDIM step (Eq. 12) stays on
    q_sample(z0, t, ε) and the edit lands on z0: the noising and the steps agree at any strength."""
    x, eps = images_and_noise(model)
    monkeypatch.setattr(model, "unet_output", lambda z_t, t, cond: eps)   # an "eps" model: ε̂ = ε
    _, z = model.img2img(x, PROMPTS, strength=strength, steps=10, noise=eps, return_latents=True)
    torch.testing.assert_close(z, model.encode_images(x, sample=False), atol=1e-4, rtol=1e-4)


def test_img2img_at_small_strength_stays_close_to_the_input_latent(model):
    """The distance of the edited latent from z0 grows with the strength; at s = 0.05 (t0 = 4: the one DDIM
    step at t = 0, from z_0 = √ᾱ_0·z0 + √(1−ᾱ_0)·ε) it is under a tenth of the distance at s = 1, where the
    image is forgotten (this untrained U-Net's ε̂ is far from ε, so the edit drifts at every step)."""
    x, eps = images_and_noise(model)
    z0 = model.encode_images(x, sample=False)
    strengths = (0.05, 0.2, 0.5, 1.0)
    dist = [(model.img2img(x, PROMPTS, strength=s, steps=10, noise=eps, return_latents=True)[1] - z0).norm().item()
            for s in strengths]
    assert dist == sorted(dist) and dist[0] < 0.1 * dist[-1], dict(zip(strengths, dist))


# -- inpainting -----------------------------------------------------------------------------------


def test_latent_mask_repaints_every_cell_a_masked_pixel_touches(model):
    """The mask on the latent grid is a max pool over f×f patches: one masked pixel repaints its whole cell."""
    S, f = model.image_size, model.autoencoder_cfg.downsample_factor
    masks = torch.zeros(1, S, S)
    masks[0, f + 1, 2 * f] = 1                                      # a pixel in latent cell (1, 2)
    m = model.latent_mask(masks)
    assert m.shape == (1, 1, S // f, S // f) and m.dtype == torch.bool
    assert m.nonzero().tolist() == [[0, 0, 1, 2]]


def test_full_mask_is_text_to_image_with_the_same_x_T(model):
    """A mask over everything keeps nothing: inpaint is generate(x_T = ε), bit for bit."""
    x, x_T = images_and_noise(model)
    _, want = model.generate(PROMPTS, steps=5, x_T=x_T, return_latents=True)
    _, got = model.inpaint(x, torch.ones(2, 1, 16, 16), PROMPTS, steps=5, noise=x_T, return_latents=True)
    assert torch.equal(got, want)


def test_empty_mask_returns_the_input_up_to_the_autoencoder(model):
    """A mask over nothing keeps everything: the latent is z0 exactly, the image the autoencoder's
    reconstruction D(E(x)) (the documented limit: inpainting never returns the pixels themselves)."""
    x, eps = images_and_noise(model)
    images, z = model.inpaint(x, torch.zeros(2, 16, 16, dtype=torch.bool), PROMPTS, steps=5, noise=eps,
                              return_latents=True)
    z0 = model.encode_images(x, sample=False)
    assert torch.equal(z, z0)
    assert torch.equal(images, model.decode_latents(z0))


@pytest.mark.parametrize("resample", [1, 3])
def test_known_region_is_the_noised_original_at_every_step(model, resample):
    """RePaint Eq. 8: at every U-Net call the kept latents equal q_sample(z0, t, ε) at that call's t, and after the
    last step z0; the repainted ones do not. resample = U calls the U-Net U times per step."""
    x, eps = images_and_noise(model)
    masks = half_mask(model)
    seen = []
    _, z = model.inpaint(x, masks, PROMPTS, steps=4, noise=eps, resample=resample, return_latents=True,
                         generator=torch.Generator().manual_seed(1),
                         callback=lambda i, t, z_t, x0: seen.append((i, t, z_t)))
    assert [(i, t) for i, t, _ in seen] == [(i, t) for i, t in enumerate(ddim_timesteps(100, 4)) for _ in range(resample)]
    z0, keep = model.encode_images(x, sample=False), ~model.latent_mask(masks).expand_as(z)
    for _, t, z_t in seen:
        noised = model.schedule.q_sample(z0, t, eps)
        assert torch.equal(z_t[keep], noised[keep])
        assert not torch.allclose(z_t[~keep], noised[~keep])
    assert torch.equal(z[keep], z0[keep])


# -- library gaps: a fixed x_T, per-sample scales, attention weights per CFG pass -------------------


def test_generate_takes_a_fixed_x_T(model):
    """generate(x_T=...) starts from x_T (the generator is then unused with DDIM, η = 0); a wrong shape is an error."""
    _, x_T = images_and_noise(model)
    a = model.generate(PROMPTS, steps=3, x_T=x_T, generator=torch.Generator().manual_seed(0))
    b = model.generate(PROMPTS, steps=3, x_T=x_T, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(PROMPTS, steps=3, x_T=-x_T))
    with pytest.raises(ValueError, match="x_T has shape"):
        model.generate(PROMPTS, steps=3, x_T=x_T[:1])


def test_per_sample_guidance_scale_equals_one_call_per_scale(model):
    """guidance_scale (B,) sweeps CFG (Eq. 6) across the batch: each row is the image generate gives that prompt
    alone at its own scale (s = 1 included, where CFG is off); the same for the classifier scale γ."""
    _, x_T = images_and_noise(model, B=3)
    prompts, scales = ["a red circle"] * 3, torch.tensor([1.0, 3.0, 6.0])
    _, together = model.generate(prompts, steps=4, guidance_scale=scales, x_T=x_T, return_latents=True)
    for b in range(3):
        _, alone = model.generate(prompts[b:b + 1], steps=4, guidance_scale=scales[b].item(), x_T=x_T[b:b + 1],
                                  return_latents=True)
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    towards_one = lambda z_t, t: 1 - z_t                                 # noqa: E731  ∇ log N(1; z_t, I)
    gammas = torch.tensor([0.0, 2.0, 5.0])
    _, together = model.generate(prompts, steps=4, guidance_scale=1.0, classifier_grad=towards_one,
                                 classifier_scale=gammas, x_T=x_T, return_latents=True)
    for b in range(3):
        _, alone = model.generate(prompts[b:b + 1], steps=4, guidance_scale=1.0, classifier_grad=towards_one,
                                  classifier_scale=gammas[b].item(), x_T=x_T[b:b + 1], return_latents=True)
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_scale as a tensor must have shape \\(3,\\)"):
        model.generate(prompts, steps=2, guidance_scale=torch.tensor([1.0, 2.0]))


def test_attention_weights_keep_the_two_cfg_passes_apart(model):
    """With keep_attention_weights, model.attention_weights holds each CFG pass's cross-attention weights at every
    step: the empty prompt's pass puts all weight on [BOS], the prompt's pass spreads over its words and equals
    a replay of ε(z_t, t, c); without CFG there is only the conditional pass."""
    model.unet.keep_attention_weights(True)
    try:
        steps, cond = [], model.encode_text(PROMPTS)

        def look(i, t, z_t, x0):
            kept = model.attention_weights
            steps.append(sorted(kept))
            for weights in kept["uncond"].values():                 # (B, heads, HW, L)
                torch.testing.assert_close(weights[..., 0], torch.ones(weights.shape[:-1]))
            replay = {name: w.clone() for name, w in kept["cond"].items()}
            model.unet_output(z_t, torch.full((2,), t), cond)       # the conditional pass again
            for name, w in model.unet.kept_attention_weights().items():
                torch.testing.assert_close(replay[name], w)
                assert w[..., 1:].sum() > 0.1                       # the words get weight too

        model.generate(PROMPTS, steps=3, guidance_scale=3.0, callback=look, generator=torch.Generator().manual_seed(0))
        assert steps == [["cond", "uncond"]] * 3
        model.generate(PROMPTS, steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert sorted(model.attention_weights) == ["cond"]
    finally:
        model.unet.keep_attention_weights(False)


# -- bad input: one-line ValueErrors before any work, and the model keeps its mode -------------------


def test_bad_edit_inputs_are_one_line_errors(model):
    x, _ = images_and_noise(model)
    masks = half_mask(model)
    cases = [
        (lambda: model.img2img(x, PROMPTS, strength=0.0), "strength must be a number in \\(0, 1\\]"),
        (lambda: model.img2img(x, PROMPTS, strength=1.2), "strength must be a number in \\(0, 1\\]"),
        (lambda: model.img2img(torch.zeros(2, 3, 32, 32), PROMPTS), "images must be \\(B, 3, 16, 16\\)"),
        (lambda: model.img2img(x * 255, PROMPTS), "in \\[-1, 1\\]"),
        (lambda: model.img2img(x, PROMPTS[:1] * 3), "got 3 prompts for 2 images"),
        (lambda: model.img2img(x, PROMPTS, noise=torch.zeros(2, 4, 8, 8)), "noise must have the latents' shape"),
        (lambda: model.inpaint(x, masks[..., :8, :8], PROMPTS), "masks must be \\(2, 1, 16, 16\\)"),
        (lambda: model.inpaint(x, masks[:1], PROMPTS), "masks must be \\(2, 1, 16, 16\\)"),
        (lambda: model.inpaint(x, masks * 0.5, PROMPTS), "masks must be binary"),
        (lambda: model.inpaint(x, masks, PROMPTS, resample=0), "resample must be an integer >= 1"),
        (lambda: model.inpaint(x.to(torch.uint8), masks, PROMPTS), "images must be a float tensor"),
    ]
    model.train()
    try:
        for call, message in cases:
            with pytest.raises(ValueError, match=message) as error:
                call()
            assert "\n" not in str(error.value)
            assert model.training                                   # a refused call leaves the mode alone
        model.img2img(x, PROMPTS, strength=0.3, steps=3)
        model.inpaint(x, masks, PROMPTS, steps=2)
        assert model.training                                       # and so does a finished one
    finally:
        model.eval()


# -- command lines ----------------------------------------------------------------------------------


def write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def run_files(model, monkeypatch, tmp_path):
    """The CLI loads the tiny model as its run; an input image and a binary mask at its size, as PNGs."""
    monkeypatch.setattr(tinyldm_cli, "_load_run", lambda args: (model, torch.device("cpu")))
    image = write_png(tmp_path / "in.png", np.random.default_rng(0).integers(0, 256, (16, 16, 3)))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    return {"image": image, "mask": write_png(tmp_path / "mask.png", mask), "dir": tmp_path}


def test_img2img_and_inpaint_commands_write_a_png(run_files):
    out = run_files["dir"] / "edit.png"
    cli(["img2img", "--run", "r", "--image", run_files["image"], "a blue square", "--strength", "0.6",
         "--steps", "3", "--out", str(out)])
    assert np.asarray(Image.open(out)).shape[:2] == (16, 16)     # the edited image itself, at the model's size
    out2 = run_files["dir"] / "filled.png"
    cli(["inpaint", "--run", "r", "--image", run_files["image"], "--mask", run_files["mask"], "a blue square",
         "--steps", "3", "--num-images", "2", "--out", str(out2)])
    assert np.asarray(Image.open(out2)).shape[:2] == (16, 32)    # two results side by side


def test_edit_commands_refuse_bad_input_before_writing(run_files):
    d = run_files["dir"]
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[3, 3] = 128
    big = np.zeros((32, 32, 3), dtype=np.uint8)
    cases = [
        (["img2img", "--image", run_files["image"], "--strength", "0"], "--strength must be in \\(0, 1\\]"),
        (["img2img", "--image", run_files["image"], "--strength", "nan"], "--strength must be in \\(0, 1\\]"),
        (["img2img", "--image", str(d / "missing.png")], "--image .*missing.png: no such file"),
        (["img2img", "--image", write_png(d / "big.png", big)], "--image .*big.png is 32×32 pixels; this run's model"),
        (["inpaint", "--image", run_files["image"], "--mask", write_png(d / "grey.png", grey)],
         "--mask .*grey.png is not binary"),
        (["inpaint", "--image", run_files["image"], "--mask", write_png(d / "m8.png", grey[:8, :8] * 0)],
         "--mask .*m8.png is 8×8 pixels, the image 16×16"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli([*args, "--run", "r", "--out", str(d / "out.png"), "a blue square"])
        assert not (d / "out.png").exists()


def test_evaluate_edit_options_are_checked_before_loading(model, monkeypatch, tmp_path):
    """--edits is off by default; its strengths must lie in (0, 1]."""
    monkeypatch.setattr(tinyldm_cli, "_load_run", lambda args: pytest.fail("the run was loaded"))
    monkeypatch.chdir(tmp_path)
    for args, message in [(["--edits", "-1"], "--edits must be >= 0"),
                          (["--edits", "4", "--edit-strengths", "0,0.5"], "--edit-strengths must be numbers in"),
                          (["--edits", "4", "--edit-strengths", ""], "--edits needs at least one strength")]:
        with pytest.raises(SystemExit, match=message):
            cli(["evaluate", "--run", "r", *args])


# -- the measuring functions of evaluate.py -----------------------------------------------------------

class Editor:
    """Stands in for a model in the measuring functions: each edit returns images[prompt] when it knows the
    prompt (an editor that does exactly what is asked), else the input unchanged; the autoencoder is exact."""

    image_size, device = 32, torch.device("cpu")

    def __init__(self, images=None):
        self.images = images or {}

    def _answer(self, x, prompts):
        return torch.stack([self.images.get(p, xi) for p, xi in zip(prompts, x)])

    def img2img(self, x, prompts, **kwargs):
        return self._answer(x, prompts)

    def inpaint(self, x, masks, prompts, **kwargs):
        return self._answer(x, prompts)

    def encode_images(self, x, sample=True):
        return x

    def decode_latents(self, z):
        return z


def only_object(scenes, k):
    """The scenes with object k alone, in slot 0."""
    return replace(scenes, n_objects=np.ones_like(scenes.n_objects),
                   **{name: getattr(scenes, name)[:, [k, k]] for name in ("shape", "colour", "size", "cell", "cx", "cy")})


def recoloured(scenes, ks, colours):
    """The scenes with object ks[i] of scene i in colours[i]."""
    colour = scenes.colour.copy()
    for i, (k, c) in enumerate(zip(ks, colours)):
        colour[i, k] = COLOUR_NAMES.index(c)
    return replace(scenes, colour=colour)


def test_object_box_mask_covers_the_whole_object():
    """Every pixel object k paints, anti-aliased edge included, lies inside object_box_mask(scenes, i, k)."""
    scenes, _ = edit_scenes(32, 40, 2)
    for k in (0, 1):
        alone = render(only_object(scenes, k), 32)                                # (40, 3, 32, 32) uint8
        drawn = (alone != render(replace(only_object(scenes, k), n_objects=np.zeros(40, int)), 32)).any(1)
        masks = torch.stack([object_box_mask(scenes, i, k, 32) for i in range(40)])
        assert drawn.any() and not (drawn & ~masks).any()


def test_edit_measures_of_an_editor_that_changes_nothing():
    """Nothing recoloured, everything kept: recolour "unchanged" and "kept" 1, "recoloured" 0; inpainting's PSNR
    outside the mask at its maximum, the other object kept, the masked one not recoloured."""
    report = recolour_test(Editor(), 12, [0.5, 1.0], steps=2)
    for row in report["by_strength"]:
        assert (row["recoloured"], row["edited"], row["unchanged"], row["kept"]) == (0, 0, 1, 1)
        assert row["n"] == 12 and row["edited_ci"][0] == 0 and 0 < row["edited_ci"][1] < 0.3
    report = inpaint_test(Editor(), 12, steps=2)
    assert report["psnr_outside"] == report["psnr_outside_reconstruction"] == 100
    assert (report["recoloured"], report["other_kept"], report["edited"]) == (0, 1, 0)


def test_edit_measures_of_an_editor_that_does_what_is_asked():
    """An editor that returns the scene drawn with the asked colour scores 1 on every edit share, and inpainting
    it changes no pixel outside the mask."""
    scenes, _ = edit_scenes(32, 12, 1)
    asked = [_object(scenes, i, 0, other_colour(scenes, i, 0)) for i in range(12)]
    truth = to_float(render(recoloured(scenes, [0] * 12, [a["colour"] for a in asked]), 32))
    row = recolour_test(Editor({recolour_prompt(a): img for a, img in zip(asked, truth)}), 12, [0.7],
                        steps=2)["by_strength"][0]
    assert (row["recoloured"], row["edited"], row["unchanged"], row["kept"]) == (1, 1, 0, 1)
    scenes, _ = edit_scenes(32, 12, 2)
    ks = [i % 2 for i in range(12)]
    asked = [_object(scenes, i, k, other_colour(scenes, i, k)) for i, k in enumerate(ks)]
    prompts = [" and ".join(_say(_object(scenes, i, j, asked[i]["colour"] if j == k else None)) for j in (0, 1))
               for i, k in enumerate(ks)]
    truth = to_float(render(recoloured(scenes, ks, [a["colour"] for a in asked]), 32))
    report = inpaint_test(Editor(dict(zip(prompts, truth))), 12, steps=2)
    assert report["psnr_outside"] == 100 and (report["recoloured"], report["other_kept"], report["edited"]) == (1, 1, 1)


@pytest.mark.filterwarnings("ignore:.*truncated")  # the tiny model reads 12 tokens; two-object prompts are longer
def test_edit_tests_run_on_a_model_and_are_json(model):
    """edit_tests on the tiny model: plain dicts that json.dumps takes, one recolour row per strength."""
    import json

    report = json.loads(json.dumps(edit_tests(model, 2, [0.5, 1.0], 3.0, steps=2)))
    assert [row["strength"] for row in report["recolour"]["by_strength"]] == [0.5, 1.0]
    assert report["inpaint"]["n"] == 2 and 0 <= report["inpaint"]["edited"] <= 1
