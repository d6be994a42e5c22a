"""Attribute detector, caption fidelity, diversity, reconstruction metrics, and the evaluation protocol
(tinyldm/evaluate.py)."""

import math
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch
from test_ldm import tiny_model

from tinyldm.data import (BACKGROUND, COLOUR_NAMES, POSITIONS, RELATIONS, SHAPES, SIZE_RADIUS, SIZES,
                          Scenes, ShapesConfig, ShapesDataset, describe, render, to_float)
from tinyldm.__main__ import _plot_eval
from tinyldm.evaluate import (ATTRIBUTES, PROMPT_KINDS, _summarise, best_guidance_scale, classifier_sweep, detect,
                              detector_accuracy, diversity, evaluate_model, fidelity, final_fidelity,
                              guidance_sweep, position_follows_prompt, prompt_set, psnr, reconstruction,
                              reconstruction_report, same_noise_test, sampler_sweep, score, targets_from_attributes,
                              wilson_interval)


def _scenes(objects):
    """Scenes with one image per entry of `objects`: a list of 1 or 2 (shape, colour, size, cell)."""
    N = len(objects)
    arr = lambda: np.zeros((N, 2), dtype=np.int64)  # noqa: E731
    s = Scenes(n_objects=np.array([len(o) for o in objects]), shape=arr(), colour=arr(), size=arr(),
               cell=arr(), cx=np.zeros((N, 2)), cy=np.zeros((N, 2)), choices=np.zeros((N, 21)))
    for i, objs in enumerate(objects):
        for k, (shape, colour, size, cell) in enumerate(objs):
            s.shape[i, k], s.colour[i, k] = SHAPES.index(shape), COLOUR_NAMES.index(colour)
            s.size[i, k], s.cell[i, k] = SIZES.index(size), POSITIONS.index(cell)
            s.cx[i, k] = (s.cell[i, k] % 3 + 0.5) / 3   # the cell's centre, no jitter
            s.cy[i, k] = (s.cell[i, k] // 3 + 0.5) / 3
    return s


@pytest.fixture(scope="module")
def val32():
    ds = ShapesDataset(ShapesConfig(image_size=32, num_val=500, two_object_prob=0.5), "val")
    return ds, ds.images_uint8(), [ds.attributes(i) for i in range(len(ds))]


@pytest.mark.parametrize("size, n", [(32, 500), (64, 300)])
def test_detector_reads_rendered_validation_images(size, n, val32):
    """Per-attribute accuracy >= 99 % on rendered val images, for one- and two-object scenes."""
    if size == 32:
        ds, images, truth = val32
    else:
        ds = ShapesDataset(ShapesConfig(image_size=64, num_val=n, two_object_prob=0.5), "val")
        images, truth = ds.images_uint8(), [ds.attributes(i) for i in range(n)]
    detections = detect(images)
    for k in (1, 2):
        pick = [i for i in range(n) if len(truth[i]["objects"]) == k]
        assert len(pick) > n // 4
        acc = detector_accuracy([detections[i] for i in pick], [truth[i] for i in pick])
        for attribute in ATTRIBUTES + ("count",):
            assert acc[attribute] >= 0.99, (size, k, attribute, acc)


def test_area_matches_the_geometry():
    """Sum of coverage = the shape's area: a large circle covers pi r^2, a square (1.7 r)^2."""
    H = 64
    r = SIZE_RADIUS[1] * H
    for shape, area in (("circle", math.pi * r * r), ("square", (1.7 * r) ** 2)):
        det = detect(render(_scenes([[(shape, "red", "large", "center")]]), H))[0]
        assert len(det) == 1 and det[0]["shape"] == shape
        assert det[0]["area"] * H * H == pytest.approx(area, rel=0.02)
        assert (det[0]["cx"], det[0]["cy"]) == pytest.approx((0.5, 0.5), abs=0.01)


def test_uint8_and_float_agree_and_bad_input_is_rejected(val32):
    """uint8 [0, 255] and float [-1, 1] versions of an image give the same detections."""
    _, images, _ = val32
    a, b = detect(images[:40]), detect(to_float(images[:40]))
    assert [[(o["shape"], o["colour"], o["size"], o["position"]) for o in d] for d in a] == \
           [[(o["shape"], o["colour"], o["size"], o["position"]) for o in d] for d in b]
    for bad in (torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 32, 16), torch.zeros(2, 3, 8, 8),
                torch.zeros(3, 32, 32), torch.zeros(2, 3, 32, 32, dtype=torch.int64)):
        with pytest.raises(ValueError):
            detect(bad)


def test_specks_and_dim_objects_do_not_change_the_reading():
    """Isolated pixels are dropped (minimum area); an object at 60 % of its colour is still whole
    (coverage is measured relative to the blob's peak), for every shape and size."""
    want = [(shape, "green", size, "top right") for shape in SHAPES for size in SIZES]
    images = render(_scenes([[obj] for obj in want]), 32)
    specks = images.clone()
    specks[:, :, [3, 20, 28], [5, 25, 2]] = torch.tensor([240, 220, 40], dtype=torch.uint8)[:, None]
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    dim = (bg + 0.6 * (images.float() - bg)).round().to(torch.uint8)
    for variant in (images, specks, dim):
        read = [[(o["shape"], o["colour"], o["size"], o["position"]) for o in d] for d in detect(variant)]
        assert read == [[obj] for obj in want]


def test_fidelity_of_real_images_is_high_and_of_noise_is_low(val32):
    """Real images scored against their own captions' mentions: >= 99 %; noise and blank: far below."""
    _, images, truth = val32
    targets = targets_from_attributes(truth)
    real = fidelity(images, targets)
    assert real["all_correct"] >= 0.99 and real["relation"] >= 0.99
    g, n = torch.Generator().manual_seed(0), 128
    noise = fidelity(torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, targets[:n])
    blank = fidelity(to_float(render(_scenes([[]] * n), 32)), targets[:n])
    assert noise["all_correct"] < 0.3 and noise["relation"] < 0.3 and noise["shape"] < 0.5
    assert blank["all_correct"] == 0.0


def test_psnr_closed_form():
    """PSNR = 10 log10(1 / MSE) on the [0, 1] range: an offset 2 delta in [-1, 1] gives -20 log10 delta."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 1.6 - 0.8
    assert psnr(x, x) == 100.0
    delta = torch.tensor([0.1, 0.01, 0.05]).view(3, 1, 1, 1)
    per_image = psnr(x, x + 2 * delta, reduce=False)
    assert torch.allclose(per_image, -20 * torch.log10(delta.flatten()), atol=1e-3)
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    mse = torch.nn.functional.mse_loss((x + 1) / 2, (y + 1) / 2, reduction="none").mean((1, 2, 3))
    assert psnr(x, y) == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)


def test_score_marks_a_wrong_colour_wrong():
    """An image of a red circle scores colour-right for "red circle" and colour-wrong for "blue circle"."""
    images = render(_scenes([[("circle", "red", "large", "left")]] * 2), 32)
    targets = [{"kind": "single", "objects": [{"shape": "circle", "colour": c, "position": "left"}],
                "relation": None} for c in ("red", "blue")]
    right, wrong = score(detect(images), targets)
    assert right == {"shape": True, "colour": True, "position": True, "all_correct": True, "count": True}
    assert wrong["colour"] is False and wrong["shape"] and wrong["all_correct"] is False


def test_relations_are_checked_between_the_right_objects():
    """"A left of B" holds when A's centre has the smaller x; swapped objects or relation fail."""
    scenes = _scenes([[("circle", "red", "small", "left"), ("square", "blue", "large", "right")],
                      [("triangle", "green", "large", "bottom"), ("cross", "cyan", "small", "top")]])
    images = render(scenes, 64)
    dets = detect(images)
    pairs = [(("red", "circle"), ("blue", "square")), (("green", "triangle"), ("cyan", "cross"))]
    truth = ["left of", "below"]
    for i, ((c0, s0), (c1, s1)) in enumerate(pairs):
        objects = [{"colour": c0, "shape": s0}, {"colour": c1, "shape": s1}]
        for relation in RELATIONS:
            result = score([dets[i]], [{"kind": "two", "objects": objects, "relation": relation}])[0]
            assert result["relation"] == (relation == truth[i]) and result["colour"] and result["shape"]
        swapped = {"kind": "two", "objects": objects[::-1], "relation": truth[i]}
        assert score([dets[i]], [swapped])[0]["relation"] is False


def _render_target(target, rng):
    """Render an image that satisfies a target, choosing the attributes it leaves open at random."""
    objs = []
    cells = rng.permutation(9)
    if target["relation"] == "left of":
        cells[:2] = [3, 5]
    elif target["relation"] == "right of":
        cells[:2] = [5, 3]
    elif target["relation"] == "above":
        cells[:2] = [1, 7]
    elif target["relation"] == "below":
        cells[:2] = [7, 1]
    for k, obj in enumerate(target["objects"]):
        objs.append((obj["shape"], obj.get("colour", COLOUR_NAMES[rng.integers(6)]),
                     obj.get("size", SIZES[rng.integers(2)]), obj.get("position", POSITIONS[cells[k]])))
    return objs


def test_prompt_sets_are_deterministic_respect_held_out_and_are_satisfiable():
    """Same seed, same prompts; held-out pairs only in "held_out"; images built to a target score 100 %."""
    held_out = ShapesConfig().held_out
    assert prompt_set("single", 30, seed=3) == prompt_set("single", 30, seed=3)
    assert prompt_set("single", 30, seed=3) != prompt_set("single", 30, seed=4)
    rng = np.random.default_rng(0)
    for kind in ("single", "two", "held_out"):
        pairs = prompt_set(kind, 40, seed=1)
        for prompt, target in pairs:
            assert target["kind"] == kind and len(target["objects"]) == (2 if kind == "two" else 1)
            for obj in target["objects"]:
                assert all(str(v) in prompt for v in obj.values())
                in_held_out = (obj.get("colour"), obj["shape"]) in held_out
                assert in_held_out == (kind == "held_out")
        images = render(_scenes([_render_target(t, rng) for _, t in pairs]), 32)
        assert fidelity(images, [t for _, t in pairs])["all_correct"] == 1.0
    with pytest.raises(ValueError, match="kind"):
        prompt_set("three", 5)


def test_diversity_sees_mode_collapse():
    """Four images of one open prompt at four positions: distinct 1; all at one position: 1/4, entropy 0."""
    target = {"kind": "single", "objects": [{"shape": "circle"}], "relation": None}
    spread = [[{"position": p, "size": "small"}] for p in POSITIONS[:4]]
    collapsed = [[{"position": "center", "size": "small"}]] * 4
    good, bad = diversity(spread, [target] * 4), diversity(collapsed, [target] * 4)
    assert good["position"]["distinct"] == 1.0 and good["position"]["entropy"] == pytest.approx(1.0)
    assert bad["position"]["distinct"] == 0.25 and bad["position"]["entropy"] == 0.0
    assert good["size"]["distinct"] == bad["size"]["distinct"] == 0.5
    mentioned = {"kind": "single", "objects": [{"shape": "circle", "position": "top"}], "relation": None}
    assert diversity(collapsed, [mentioned] * 4)["position"]["prompts"] == 0


class _RenderingModel:
    """A stand-in for LatentDiffusion whose generate() draws each prompt's target (or nothing)."""

    def __init__(self, lookup, blank=False):
        self.lookup, self.blank, self.calls = lookup, blank, []

    def generate(self, prompts, steps, guidance_scale, sampler, generator):
        self.calls.append((len(prompts), steps, guidance_scale, sampler))
        objects = [[] if self.blank else self.lookup[p] for p in prompts]
        return to_float(render(_scenes(objects), 32))


def test_evaluate_model_batches_and_splits_by_kind():
    """evaluate_model generates N images per prompt in batches and reports fidelity per prompt kind."""
    rng = np.random.default_rng(0)
    pairs = prompt_set("single", 5, seed=0) + prompt_set("two", 4, seed=0)
    lookup = {p: _render_target(t, rng) for p, t in pairs}
    model = _RenderingModel(lookup)
    report = evaluate_model(model, pairs, images_per_prompt=3, steps=7, guidance_scale=2.0,
                            sampler="ddpm", batch_size=10)
    assert [c[0] for c in model.calls] == [10, 10, 7] and model.calls[0][1:] == (7, 2.0, "ddpm")
    assert report["fidelity"]["single"]["n"] == 15 and report["fidelity"]["two"]["n"] == 12
    assert report["fidelity"]["all"]["all_correct"] == 1.0
    assert report["diversity"]["position"]["distinct"] == pytest.approx(1 / 3)  # the same image thrice
    blank = evaluate_model(_RenderingModel(lookup, blank=True), pairs, images_per_prompt=1, batch_size=4)
    assert blank["fidelity"]["all"]["all_correct"] == 0.0


def test_wilson_interval():
    """Wilson 1927 score interval: 5/10 -> (0.2366, 0.7634) and 1/3 -> (0.0615, 0.7923) by hand;
    0/n starts at 0 and n/n ends at 1 with a width; it holds p̂ and narrows as n grows at fixed p̂."""
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(1, 3) == pytest.approx((0.0615, 0.7923), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    widths = []
    for n in (10, 40, 160, 640):
        lo, hi = wilson_interval(n // 5, n)
        assert lo < 0.2 < hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.07
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_summaries_carry_intervals_and_counts():
    """Each share K comes with K_ci (its Wilson interval) and K_n (the images where K was checked),
    through _summarise and fidelity; the shares themselves are unchanged."""
    scores = [{"shape": True, "all_correct": True, "count": True},
              {"shape": False, "relation": True, "all_correct": False, "count": True},
              {"shape": True, "relation": False, "all_correct": False, "count": False}]
    summary = _summarise(scores)
    assert summary["n"] == 3 and summary["shape"] == pytest.approx(2 / 3) and summary["shape_n"] == 3
    assert summary["relation"] == 0.5 and summary["relation_n"] == 2
    assert summary["relation_ci"] == list(wilson_interval(1, 2))
    assert "colour" not in summary and "colour_ci" not in summary
    images = render(_scenes([[("circle", "red", "large", "left")]] * 2), 32)
    targets = [{"kind": "single", "objects": [{"shape": "circle", "colour": c}], "relation": None}
               for c in ("red", "blue")]
    f = fidelity(images, targets)
    assert f["colour"] == 0.5 and f["colour_ci"] == list(wilson_interval(1, 2)) and f["colour_n"] == 2
    assert f["shape_ci"] == list(wilson_interval(2, 2)) and f["all_correct_n"] == 2


class _SameNoiseModel:
    """A stand-in for LatentDiffusion in the same-noise test: generate() draws each prompt's large
    object at the prompted position, or (follow_noise) at the cell argmax(x_T) mod 9 of its x_T."""
    image_size = 32
    autoencoder_cfg, unet_cfg = SimpleNamespace(downsample_factor=4), SimpleNamespace(in_channels=4)
    OBJECTS = {describe(s, c, "large", p): (s, c, "large", p)
               for c in COLOUR_NAMES for s in SHAPES for p in POSITIONS}

    def __init__(self, follow_noise):
        self.follow_noise = follow_noise

    def generate(self, prompts, steps, guidance_scale, sampler="ddim", eta=0.0, generator=None, x_T=None):
        assert x_T.shape == (len(prompts), 4, 8, 8)                   # (B, z, h, w)
        objects = []
        for prompt, noise in zip(prompts, x_T):
            shape, colour, size, position = self.OBJECTS[prompt]
            objects.append([(shape, colour, size, POSITIONS[int(noise.argmax()) % 9] if self.follow_noise
                             else position)])
        return to_float(render(_scenes(objects), 32))


def test_same_noise_test_tells_prompt_from_noise():
    """Same x_T, 9 prompted positions: a model that follows the prompt hits every cell (hit 1, moved
    8/9, follows_noise 1/9); one that places the object by x_T stays put (follows_noise 1, moved 0)
    and hits exactly one prompt per noise (hit = chance = 1/9). Batches that split a noise's 9
    images (batch_size 7) keep each prompt with its own noise."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    prompt, noise = (position_follows_prompt(_SameNoiseModel(follow_noise), noises=4, steps=3, generator=gen(),
                                             batch_size=7) for follow_noise in (False, True))
    assert prompt["n"] == noise["n"] == 36
    assert prompt["hit"] == 1.0 and prompt["moved"] == pytest.approx(8 / 9)
    assert prompt["follows_noise"] == pytest.approx(1 / 9)
    assert noise["follows_noise"] == 1.0 and noise["moved"] == 0.0
    assert noise["hit"] == pytest.approx(1 / 9) and noise["chance"] == pytest.approx(1 / 9)
    assert noise["hit_ci"] == list(wilson_interval(4, 36)) and prompt["hit_ci"] == list(wilson_interval(36, 36))


def test_generate_starts_from_the_given_x_T():
    """DDIM η = 0 is deterministic given x_T: one x_T gives identical images under two different
    generators, while without x_T the two generators draw different noise and different images."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # make the zero-initialised layers matter
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))           # (B, z, h, w)
    run = lambda seed, **kw: model.generate(["a red circle", "a blue square"], steps=3, eta=0.0,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(0, x_T=x_T), run(1, x_T=x_T))
    assert not torch.allclose(run(0), run(1))


class _Blur(torch.nn.Module):
    """A stand-in autoencoder: encode = 2x2 average pool (mode = mean), decode = nearest upsampling."""

    def __init__(self, identity=False):
        super().__init__()
        self.identity, self.unused = identity, torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        z = x if self.identity else torch.nn.functional.avg_pool2d(x, 2)
        return type("Posterior", (), {"mode": lambda self: z})()

    def decode(self, z):
        return z if self.identity else torch.nn.functional.interpolate(z, scale_factor=2)


def test_reconstruction_report():
    """A perfect autoencoder: PSNR at the cap, same detections; a lossy one: the PSNR of its output."""
    ds = ShapesDataset(ShapesConfig(image_size=32, num_val=24), "val")
    perfect = reconstruction_report(_Blur(identity=True), ds, batch_size=10)
    assert perfect["n"] == 24 and perfect["psnr"] == 100.0
    assert perfect["detector_reconstructions"] == perfect["detector_originals"]
    lossy = reconstruction_report(_Blur(), ds, n=16, batch_size=5)
    x = to_float(ds.images_uint8()[:16])
    x_hat = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2)
    assert lossy["n"] == 16 and lossy["psnr"] == pytest.approx(psnr(x, x_hat), rel=1e-5)
    assert 10 < lossy["psnr"] < 40


# ----------------------------------------------------------------------------------------------
# The protocol of `python -m tinyldm evaluate`, step by step, on stand-in models


class _RecordingModel:
    """A stand-in for LatentDiffusion that draws each prompt's target (nothing for a prompt it does not
    know) and records every generate() call: its prompts, its settings and its generator's first number."""
    device, diffusion_cfg = torch.device("cpu"), SimpleNamespace(T=9)

    def __init__(self, lookup=None):
        self.lookup, self.calls = lookup or {}, []

    def generate(self, prompts, steps, guidance_scale, sampler, generator, classifier_scale=0.0,
                 classifier_grad=None):
        self.calls.append({"prompts": list(prompts), "steps": steps, "s": guidance_scale, "sampler": sampler,
                           "gamma": classifier_scale, "noise": torch.rand(1, generator=generator).item()})
        return to_float(render(_scenes([self.lookup.get(p, []) for p in prompts]), 32))


def _first_noise(seed):
    return torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()


def test_sweeps_run_each_setting_from_the_same_noise(capsys):
    """guidance_sweep and sampler_sweep: one run per setting, in order, on the same prompts, each from a
    generator seeded afresh with `seed`; "ddimN" is DDIM with N steps, "ddpm" DDPM with all T; one
    printed line per run (and the sweep's header)."""
    rng = np.random.default_rng(0)
    pairs = prompt_set("single", 3, seed=0) + prompt_set("two", 2, seed=0)
    model = _RecordingModel({p: _render_target(t, rng) for p, t in pairs})
    sweep = guidance_sweep(model, pairs, [1.0, 3.0, 2.0], images_per_prompt=2, steps=5, seed=7, batch_size=4)
    assert [(r["guidance_scale"], r["steps"], r["sampler"]) for r in sweep] == [(1.0, 5, "ddim"), (3.0, 5, "ddim"),
                                                                                (2.0, 5, "ddim")]
    assert all(r["fidelity"]["all"]["all_correct"] == 1.0 and r["fidelity"]["all"]["n"] == 10 for r in sweep)
    firsts = model.calls[::3]  # 10 images in batches of 4: three calls per run
    assert [c["s"] for c in firsts] == [1.0, 3.0, 2.0] and all(c["prompts"] == firsts[0]["prompts"] for c in firsts)
    assert [c["noise"] for c in firsts] == [_first_noise(7)] * 3
    model.calls.clear()
    samplers = sampler_sweep(model, pairs[:3], ["ddim2", "ddpm"], 3.0, images_per_prompt=1, seed=7)
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in samplers] == [("ddim", 2, 3.0), ("ddpm", 9, 3.0)]
    assert [c["noise"] for c in model.calls] == [_first_noise(7)] * 2
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3 + 2


def test_best_guidance_scale_is_the_best_single_object_share_first_of_a_tie():
    """The best scale is the one with the highest single-object all-correct share; a tie keeps the first."""
    sweep = [{"guidance_scale": s, "fidelity": {"single": {"all_correct": a}, "two": {"all_correct": 1.0}}}
             for s, a in ((1.0, 0.2), (3.0, 0.5), (5.0, 0.5), (7.0, 0.1))]
    assert best_guidance_scale(sweep) == 3.0


def test_final_fidelity_draws_fresh_prompts_one_image_each(capsys):
    """The headline figures: n prompts of each kind drawn with seed + 1 (not those the scale was picked on),
    one image each, at the given scale, from the noise of `seed`; a line per kind with every attribute."""
    model = _RecordingModel()
    result = final_fidelity(model, 2, guidance_scale=2.0, steps=3, seed=4)
    assert model.calls[0]["prompts"] == [p for kind in PROMPT_KINDS for p, _ in prompt_set(kind, 2, seed=5)]
    assert (model.calls[0]["s"], model.calls[0]["steps"], model.calls[0]["noise"]) == (2.0, 3, _first_noise(4))
    assert result["images_per_prompt"] == 1 and all(result["fidelity"][k]["n"] == 2 for k in PROMPT_KINDS)
    assert sum(line.startswith("  ") for line in capsys.readouterr().out.splitlines()) == len(PROMPT_KINDS)


def test_classifier_sweep_compares_the_guidance_methods():
    """For each γ: the unconditional model (empty prompts, s = 1) with the classifier, named "unconditional"
    at γ = 0, then CFG at the given s with the classifier; last the prompts with no guidance at all;
    every run from the same noise."""
    pairs = prompt_set("single", 2, seed=0)
    model = _RecordingModel()
    results = classifier_sweep(model, object(), pairs, [0.0, 2.0], 3.0, images_per_prompt=1, steps=4, seed=1)
    assert [(r["method"], r["guidance_scale"], r["classifier_scale"], r["use_prompts"]) for r in results] == [
        ("unconditional", 1.0, 0.0, False), ("cfg+classifier", 3.0, 0.0, True), ("classifier", 1.0, 2.0, False),
        ("cfg+classifier", 3.0, 2.0, True), ("conditional, no guidance", 1.0, 0.0, True)]
    prompts = [p for p, _ in pairs]
    assert [c["prompts"] for c in model.calls] == [["", ""], prompts, ["", ""], prompts, prompts]
    assert [(c["s"], c["gamma"]) for c in model.calls] == [(1.0, 0.0), (3.0, 0.0), (1.0, 2.0), (3.0, 2.0), (1.0, 0.0)]
    assert {c["noise"] for c in model.calls} == {_first_noise(1)}


def test_same_noise_test_and_reconstruction_are_the_measurements_seeded():
    """same_noise_test is position_follows_prompt from a generator seeded with `seed`; reconstruction is
    reconstruction_report on the first n validation images at the model's image size."""
    model = _SameNoiseModel(follow_noise=True)
    model.device = torch.device("cpu")
    report = same_noise_test(model, 2, guidance_scale=2.0, steps=3, seed=3, batch_size=5)
    assert report == position_follows_prompt(model, 2, steps=3, guidance_scale=2.0,
                                             generator=torch.Generator().manual_seed(3), batch_size=5)
    model = SimpleNamespace(image_size=32, autoencoder=_Blur())
    ds = ShapesDataset(ShapesConfig(image_size=32, num_val=8), "val")
    assert reconstruction(model, 8) == reconstruction_report(_Blur(), ds)


def test_eval_plot_draws_every_report_shape(tmp_path):
    """eval.png is drawn for a full report and for one whose sampler sweep is DDPM alone (no DDIM steps to
    put on the log axis)."""
    rng = np.random.default_rng(0)
    pairs = prompt_set("single", 2, seed=0)
    model = _RecordingModel({p: _render_target(t, rng) for p, t in pairs})
    sweep = guidance_sweep(model, pairs + prompt_set("two", 1) + prompt_set("held_out", 1), [1.0, 2.0],
                           images_per_prompt=1, steps=2)
    full = {"guidance_sweep": sweep, "best_guidance_scale": 1.0, "final": final_fidelity(model, 1, 1.0, steps=2),
            "sampler_sweep": sampler_sweep(model, pairs, ["ddim2", "ddpm"], 1.0, images_per_prompt=1),
            "guidance_methods": classifier_sweep(model, object(), pairs, [0.0, 1.0], 1.0, images_per_prompt=1, steps=2)}
    ddpm_alone = dict(full, final=None, guidance_methods=[],
                      sampler_sweep=sampler_sweep(model, pairs, ["ddpm"], 1.0, images_per_prompt=1))
    share = {"n": 4, **{k: 0.5 for k in ("edited", "recoloured", "kept", "unchanged")},
             **{k + "_ci": [0.15, 0.85] for k in ("edited", "recoloured", "kept", "unchanged")}}
    edits = {"recolour": {"n": 4, "guidance_scale": 1.0, "by_strength": [dict(share, strength=s) for s in (0.5, 1.0)]},
             "inpaint": {"n": 4, "recoloured": 0.25, "other_kept": 1.0}}
    with_edits = dict(full, edits=edits)
    for name, report in (("full", full), ("ddpm_alone", ddpm_alone), ("with_edits", with_edits)):
        _plot_eval(report, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    width = {name: matplotlib.image.imread(tmp_path / f"{name}.png").shape[1] for name in ("full", "with_edits")}
    assert width["with_edits"] == width["full"] * 4 // 3  # one 5-inch panel more: the edits against the strength
