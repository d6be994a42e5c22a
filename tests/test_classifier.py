"""Tests for tinyldm.classifier: the noise-aware latent classifier and classifier guidance with it.

Tiny configs on 4×8×8 latents. The synthetic task: each head's label is written into the mean of
one latent channel (head k -> channel k), so a briefly trained classifier is meaningful and its
accuracy must fall as noise drowns the channel means. References: torch.distributions for the
log-probabilities, finite differences for the gradient, float64 recomputation for Guided Eq. 14.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from tinyldm.classifier import (
    CLASSES,
    HEADS,
    ClassifierConfig,
    LatentClassifier,
    accuracy_by_timestep,
    classifier_loss,
    classifier_targets,
    labels_from_scenes,
    load_classifier,
    log_prob,
    make_classifier_grad,
    save_classifier,
)
from tinyldm.data import (
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    sample_scenes,
    scene_attributes,
)
from tinyldm.diffusion import (
    NoiseSchedule,
    classifier_guidance,
    ddim_sample,
    ddpm_sample,
    draw_t_and_eps,
    make_beta_schedule,
    make_guided_eps,
)

TINY = ClassifierConfig(in_channels=4, channels=16, channel_mult=(1, 2), num_groups=4, time_dim=32)
NUM_CLASSES = torch.tensor([len(c) for c in CLASSES])  # (4,)


def synthetic_latents(n, generator):
    """(z0 (n, 4, 8, 8), labels (n, 4)): channel k has mean −2 + 4·label_k/(K_k − 1), plus N(0, 0.3²)."""
    labels = torch.stack([torch.randint(0, len(c), (n,), generator=generator) for c in CLASSES], dim=1)
    means = -2 + 4 * labels / (NUM_CLASSES - 1)  # (n, 4)
    z0 = 0.3 * torch.randn(n, 4, 8, 8, generator=generator) + means[:, :, None, None]
    return z0, labels


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(make_beta_schedule("linear", 1000))


@pytest.fixture(scope="module")
def trained(schedule):
    """A tiny classifier trained for 60 steps on the synthetic latents, with its data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    z0, labels = synthetic_latents(256, g)
    classifier = LatentClassifier(TINY)
    opt = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, len(z0), (64,), generator=g)
        loss, _ = classifier_loss(classifier, schedule, z0[idx], labels[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return classifier.eval(), z0, labels


def test_forward_shapes_of_the_four_heads():
    """forward(z_t, t) gives one (B, K) logit tensor per head, K = number of names in data.py."""
    torch.manual_seed(0)
    classifier = LatentClassifier(TINY)
    for z_t, t in ((torch.randn(3, 4, 8, 8), torch.tensor([0, 5, 999])), (torch.randn(2, 4, 16, 16), 7)):
        logits = classifier(z_t, t)
        assert tuple(logits) == HEADS
        expected = {"shape": len(SHAPES), "colour": len(COLOUR_NAMES), "size": len(SIZES),
                    "position": len(POSITIONS)}
        for name, K in expected.items():
            assert logits[name].shape == (z_t.shape[0], K)
    with pytest.raises(ValueError, match="z_t must have shape"):
        classifier(torch.randn(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="num_groups"):
        ClassifierConfig(channels=12, num_groups=8)


def test_loss_is_the_summed_cross_entropy_and_reaches_every_parameter(schedule):
    """Loss = Σ_heads mean_b −log p(y_b | z_t, t) with z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε (DDPM Eq. 4), against
    torch.distributions.Categorical; after one update (ResBlocks' last convs start at zero) the
    gradient reaches every parameter."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    classifier = LatentClassifier(TINY)
    z0, labels = synthetic_latents(4, g)
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn(z0.shape, generator=g)
    loss, accuracy = classifier_loss(classifier, schedule, z0, labels, t=t, eps=eps)
    assert loss.ndim == 0 and torch.isfinite(loss)
    alpha_bar = torch.cumprod(1 - make_beta_schedule("linear", 1000), 0)[t].float()[:, None, None, None]
    z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps  # DDPM Eq. 4, by hand
    logits = classifier(z_t, t)
    reference = sum(-Categorical(logits=logits[name]).log_prob(labels[:, k]).mean() for k, name in enumerate(HEADS))
    torch.testing.assert_close(loss, reference)
    for k, name in enumerate(HEADS):
        assert accuracy[name].item() == (logits[name].argmax(-1) == labels[:, k]).float().mean().item()

    loss.backward()
    torch.optim.SGD(classifier.parameters(), lr=0.1).step()  # switches on the zero-initialised convs
    classifier.zero_grad()
    loss, _ = classifier_loss(classifier, schedule, z0, labels, t=t, eps=eps)
    loss.backward()
    dead = [n for n, p in classifier.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert dead == []
    with pytest.raises(ValueError, match="LongTensor of shape"):
        classifier_loss(classifier, schedule, z0, labels[:, :3])


def test_loss_draws_t_and_eps_as_the_diffusion_loss_does(schedule):
    """Without t and ε, classifier_loss draws them with diffusion.draw_t_and_eps (t first, then ε, from the
    one generator), so that the classifier's training sees the diffusion model's own (t, ε) distribution."""
    torch.manual_seed(0)
    classifier = LatentClassifier(TINY)
    z0, labels = synthetic_latents(6, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    drawn, _ = classifier_loss(classifier, schedule, z0, labels, generator=g)
    reference = torch.Generator().manual_seed(9)
    t, eps = draw_t_and_eps(schedule, z0, reference)
    given, _ = classifier_loss(classifier, schedule, z0, labels, t=t, eps=eps)
    assert torch.equal(drawn, given)
    assert torch.equal(g.get_state(), reference.get_state())  # and nothing else was drawn


def test_log_prob_matches_categorical_with_per_image_targets():
    """log p(y|z_t) = Σ over specified heads of log softmax (torch.distributions.Categorical);
    −1 heads are left out, each image has its own target, and a (1, 4) target is broadcast."""
    torch.manual_seed(0)
    classifier = LatentClassifier(TINY)
    z_t, t = torch.randn(3, 4, 8, 8), torch.tensor([3, 300, 900])
    target = torch.tensor([[1, 2, -1, 4], [-1, -1, -1, -1], [3, 0, 1, -1]])
    logits = classifier(z_t, t)
    reference = torch.zeros(3)
    for b in range(3):
        for k, name in enumerate(HEADS):
            if target[b, k] >= 0:
                reference[b] += Categorical(logits=logits[name][b]).log_prob(target[b, k])
    torch.testing.assert_close(log_prob(classifier, z_t, t, target), reference)
    one = target[2:3]
    torch.testing.assert_close(log_prob(classifier, z_t, t, one), log_prob(classifier, z_t, t, one.expand(3, -1)))
    with pytest.raises(ValueError, match="colour indices"):
        log_prob(classifier, z_t, t, torch.tensor([[0, 6, 0, 0]]))


def test_classifier_grad_shape_sign_and_finite_difference(trained):
    """make_classifier_grad returns ∇_{x_t} Σ_b log p(y_b|x_t): x_t's shape, detached; a step along it
    raises log p; its directional derivative matches a central finite difference (float64); image
    b's gradient does not depend on the other images in the batch."""
    classifier = trained[0]
    g = torch.Generator().manual_seed(2)
    x_t, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([50, 200, 400])
    target = torch.tensor([[0, 5, 1, 8], [2, -1, 0, -1], [-1, 3, -1, 0]])
    grad = make_classifier_grad(classifier, target)(x_t, t)
    assert grad.shape == x_t.shape and not grad.requires_grad and x_t.grad is None
    delta = 1e-2
    assert bool((log_prob(classifier, x_t + delta * grad, t, target)
                 > log_prob(classifier, x_t - delta * grad, t, target)).all())

    clf64 = copy.deepcopy(classifier).double()
    x64 = x_t.double()
    grad64 = make_classifier_grad(clf64, target)(x64, t)
    v = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    h = 1e-5
    finite_difference = (log_prob(clf64, x64 + h * v, t, target).sum()
                         - log_prob(clf64, x64 - h * v, t, target).sum()) / (2 * h)
    torch.testing.assert_close((grad64 * v).sum(), finite_difference, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad64.float(), grad, rtol=1e-3, atol=1e-5)

    alone = make_classifier_grad(classifier, target[1:2])(x_t[1:2], t[1:2])
    torch.testing.assert_close(grad[1:2], alone, rtol=1e-4, atol=1e-6)


def test_classifier_guidance_matches_its_closed_form():
    """Guided Eq. 14: classifier_guidance(schedule, ε, t, g, s) = ε − s·√(1−ᾱ_t)·g, ᾱ recomputed in float64."""
    betas = make_beta_schedule("linear", 1000)
    schedule = NoiseSchedule(betas)
    alpha_bars = torch.cumprod(1 - betas, dim=0)  # float64
    g = torch.Generator().manual_seed(3)
    eps, grad = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, s = torch.tensor([0, 321, 999]), 2.5
    expected = eps.double() - s * (1 - alpha_bars[t]).sqrt()[:, None, None, None] * grad.double()
    torch.testing.assert_close(classifier_guidance(schedule, eps, t, grad, s).double(), expected,
                               rtol=1e-6, atol=1e-6)
    expected_int = eps.double() - s * (1 - alpha_bars[321]).sqrt() * grad.double()
    torch.testing.assert_close(classifier_guidance(schedule, eps, 321, grad, s).double(), expected_int,
                               rtol=1e-6, atol=1e-6)


def test_guided_step_raises_target_log_prob(trained, schedule):
    """From the same x_t and the same noise, one DDIM step and one DDPM step with ε guided by Guided Eq. 14
    end with a higher log p(target | x_{t−1}) than the unguided step, for every image."""
    classifier, z0, labels = trained
    g = torch.Generator().manual_seed(4)
    mixing = torch.randn(4, 4, generator=g) * 0.5  # stand-in ε-model: a fixed random 1×1 channel mixing

    def eps_model(x):
        return torch.einsum("dc,bchw->bdhw", mixing, x)

    t = 300
    x_t = schedule.q_sample(z0[:4], t, torch.randn(4, 4, 8, 8, generator=g))  # DDPM Eq. 4
    target = (labels[:4] + 1) % NUM_CLASSES  # a different class in every head
    grad = make_classifier_grad(classifier, target)(x_t, torch.full((4,), t))
    eps = eps_model(x_t)
    guided = classifier_guidance(schedule, eps, t, grad, 5.0)  # Guided Eq. 14

    t_prev = 250
    lp_guided = log_prob(classifier, schedule.ddim_step(x_t, t, t_prev, guided), t_prev, target)
    lp_plain = log_prob(classifier, schedule.ddim_step(x_t, t, t_prev, eps), t_prev, target)
    assert bool((lp_guided > lp_plain).all())

    noise = torch.randn(x_t.shape, generator=g)
    lp_guided = log_prob(classifier, schedule.ddpm_step(x_t, t, guided, noise=noise), t - 1, target)
    lp_plain = log_prob(classifier, schedule.ddpm_step(x_t, t, eps, noise=noise), t - 1, target)
    assert bool((lp_guided > lp_plain).all())


def test_scale_zero_equals_unguided_sampling(trained):
    """classifier_scale = 0 with a classifier_grad is bit-for-bit unguided sampling (DDIM and DDPM);
    a positive scale changes the samples."""
    classifier = trained[0]
    schedule = NoiseSchedule(make_beta_schedule("linear", 50))
    mixing = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.5

    def model(x, t, c):
        return torch.einsum("dc,bchw->bdhw", mixing, x)

    grad_fn = make_classifier_grad(classifier, classifier_targets({"shape": "square", "colour": "blue"}))
    shape = (2, 4, 8, 8)
    for sample, kwargs in ((ddim_sample, {"steps": 10, "eta": 0.5}), (ddpm_sample, {})):
        def run(sample=sample, kwargs=kwargs, **guidance):
            eps_fn = make_guided_eps(model, schedule, **guidance)
            return sample(eps_fn, schedule, shape, generator=torch.Generator().manual_seed(6), **kwargs)

        plain = run()
        assert torch.equal(run(classifier_grad=grad_fn, classifier_scale=0.0), plain)
        guided = run(classifier_grad=grad_fn, classifier_scale=3.0)
        assert (guided - plain).abs().max() > 1e-3


def test_brief_training_beats_chance_and_accuracy_falls_with_t(trained, schedule):
    """After 60 steps the classifier is well above chance at small t on the synthetic latents, and
    accuracy_by_timestep shows lower accuracy in the noisiest bin than in the cleanest."""
    classifier, z0, labels = trained
    result = accuracy_by_timestep(classifier, schedule, z0, labels, [0, 100, 500, 1000],
                                  generator=torch.Generator().manual_seed(7))
    assert result["bins"] == [(0, 100), (100, 500), (500, 1000)]
    chance = 1 / NUM_CLASSES.double()
    first = torch.tensor([result[name][0] for name in HEADS], dtype=torch.float64)
    last = torch.tensor([result[name][-1] for name in HEADS], dtype=torch.float64)
    assert bool((first > chance + 0.1).all()), first
    assert ((first - chance) / (1 - chance)).mean() > 0.4, first  # most of the way from chance to perfect
    assert bool((last < first).all()) and result["all"][-1] < result["all"][0]
    assert len(accuracy_by_timestep(classifier, schedule, z0[:8], labels[:8], 4)["shape"]) == 4
    with pytest.raises(ValueError, match="t_bins"):
        accuracy_by_timestep(classifier, schedule, z0, labels, [0, 500, 400])


def test_save_and_load_beside_the_model(trained, tmp_path):
    """save_classifier writes classifier.json + classifier.pt; load_classifier rebuilds the same network in eval
    mode. A run folder without a classifier gives None; one saved in the older layout (the classifier inside
    model.json and model.pt) loads too."""
    classifier = trained[0]
    z_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10)), torch.tensor([10, 600])
    assert load_classifier(tmp_path) is None
    save_classifier(classifier, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"classifier.json", "classifier.pt"}
    loaded = load_classifier(tmp_path)
    assert not loaded.training and loaded.cfg == classifier.cfg
    with torch.no_grad():
        for name in HEADS:
            assert torch.equal(loaded(z_t, t)[name], classifier(z_t, t)[name])

    old = tmp_path / "old"
    old.mkdir()
    (old / "model.json").write_text(json.dumps({"unet": {}, "classifier": dataclasses.asdict(classifier.cfg)}))
    torch.save({"unet": {}, "classifier": classifier.state_dict()}, old / "model.pt")
    with torch.no_grad():
        assert torch.equal(load_classifier(old)(z_t, t)["shape"], classifier(z_t, t)["shape"])
    (old / "model.json").write_text(json.dumps({"unet": {}, "classifier": None}))
    assert load_classifier(old) is None


def test_labels_from_scenes_and_classifier_targets():
    """labels_from_scenes keeps the one-object images with their ground truth in HEADS order;
    classifier_targets maps names to indices, None/missing to −1, and rejects unknown names."""
    scenes = sample_scenes(ShapesConfig(), "train", np.arange(40))
    labels, indices = labels_from_scenes(scenes)
    assert indices.tolist() == [i for i in range(40) if scenes.n_objects[i] == 1]
    truth = [scene_attributes(scenes, i)["objects"][0] for i in indices.tolist()]
    assert torch.equal(labels, classifier_targets(truth))
    assert len(labels_from_scenes(scenes, single_object_only=False)[1]) == 40

    target = classifier_targets([{"colour": "red", "shape": "circle"},
                                      {"objects": [{"size": "large", "position": "bottom right"}]}])
    assert target.tolist() == [[SHAPES.index("circle"), COLOUR_NAMES.index("red"), -1, -1],
                               [-1, -1, SIZES.index("large"), POSITIONS.index("bottom right")]]
    for bad, message in (({"colour": "magenta"}, "not one of"), ({"color": "red"}, "unknown attribute"),
                         ({"objects": [{"shape": "circle"}, {"shape": "square"}]}, "single-object")):
        with pytest.raises(ValueError, match=message):
            classifier_targets(bad)
