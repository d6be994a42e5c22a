"""Tests for tinyldm.diffusion: schedules, forward process, posterior, steps, guidance, samplers, loss.

Code timesteps t in {0..T−1} mean paper steps t+1 (see the diffusion.py docstring). References are
recomputed here in float64 from the betas, or taken from torch.distributions and autograd.
"""

import math

import pytest
import torch
from torch.distributions import Normal

from tinyldm.diffusion import (
    SCHEDULE_KINDS,
    DiffusionConfig,
    NoiseSchedule,
    classifier_free_guidance,
    classifier_guidance,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    diffusion_loss,
    draw_t_and_eps,
    make_beta_schedule,
    make_guided_eps,
    training_timesteps,
)

T = 1000


def linear_betas(T, beta_start=1e-4, beta_end=2e-2):
    """DDPM's linear schedule written out here, so that tests outside assignment 1 do not need it."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(linear_betas(T))


class ClosedFormSchedule(NoiseSchedule):
    """A NoiseSchedule whose q_sample, ddpm_step and ddim_step are the papers' closed forms written out
    here, so that the loss and the sampling loops (assignment 8) are graded on their own,
    without the student's assignments 1–3."""

    def _alpha_bar(self, t, x):
        """ᾱ_t broadcast against x, with ᾱ_{−1} = 1; t an int or a (B,) tensor."""
        t = torch.as_tensor(t, device=x.device)
        alpha_bar = torch.where(t >= 0, self.alpha_bars[t.clamp(min=0)], torch.ones((), device=x.device))
        return alpha_bar.reshape(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, eps):
        a = self._alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM Eq. 4

    def ddim_step(self, x_t, t, t_prev, eps, eta=0.0, noise=None, generator=None):
        a, a_prev = self._alpha_bar(t, x_t), self._alpha_bar(t_prev, x_t)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()  # DDPM Eq. 15
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # DDIM Eq. 16
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps  # DDIM Eq. 12
        if eta != 0:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype) if noise is None else noise
            x_prev = x_prev + sigma * noise
        return x_prev

    def ddpm_step(self, x_t, t, eps, noise=None, generator=None):
        return self.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=noise, generator=generator)  # DDIM, η = 1: DDPM


def forward(schedule, x0, t, eps):
    """DDPM Eq. 4 recomputed in float64 (for tests that need x_t but do not grade q_sample)."""
    _, _, alpha_bars, _ = float64_terms(schedule.betas)
    a = alpha_bars[t].reshape(-1, *([1] * (x0.ndim - 1)))
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).to(x0.dtype)


def posterior_step(schedule, x_t, t, x0, z):
    """x_{t−1} = μ̃_t(x_t, x0) + √β̃_t·z (DDPM Eqs. 6–7, Alg. 2 line 4), recomputed in float64; t (B,)."""
    betas, alphas, alpha_bars, alpha_bars_prev = float64_terms(schedule.betas)
    b = (slice(None),) + (None,) * (x_t.ndim - 1)
    coef_x0 = (alpha_bars_prev[t].sqrt() * betas[t] / (1 - alpha_bars[t]))[b]
    coef_xt = (alphas[t].sqrt() * (1 - alpha_bars_prev[t]) / (1 - alpha_bars[t]))[b]
    sigma = ((1 - alpha_bars_prev[t]) / (1 - alpha_bars[t]) * betas[t]).sqrt()[b]
    return coef_x0 * x0.double() + coef_xt * x_t.double() + sigma * z.double()


def float64_terms(betas):
    """α, ᾱ, ᾱ_{t−1} (with ᾱ_{−1} = 1) recomputed independently in float64."""
    betas = betas.double()
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, 0)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    return betas, alphas, alpha_bars, alpha_bars_prev


def gaussian_oracle(schedule, mu, sigma):
    """Exact ε-predictor for data x0 ~ N(mu, sigma²) (per coordinate).

    x_t = √ᾱ·x0 + √(1−ᾱ)·ε and ε are jointly Gaussian, so the optimal (MMSE) predictor is
    E[ε | x_t] = Cov(ε, x_t)/Var(x_t)·(x_t − E x_t) = √(1−ᾱ)·(x_t − √ᾱ·mu)/(ᾱ·sigma² + 1 − ᾱ).
    """
    mu, sigma = torch.as_tensor(mu, dtype=torch.float32), torch.as_tensor(sigma, dtype=torch.float32)

    def model(x_t, t, context):
        alpha_bar = schedule.alpha_bars[t].reshape(-1, *([1] * (x_t.ndim - 1)))
        return (1 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * mu) / (alpha_bar * sigma**2 + 1 - alpha_bar)

    return model


# --- schedules --------------------------------------------------------------------------------


@pytest.mark.assignment(1)
@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedule_shapes_dtypes_and_buffers(kind):
    """make_beta_schedule gives (T,) float64; NoiseSchedule buffers are (T,) float32 and non-persistent."""
    betas = make_beta_schedule(kind, T)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    s = NoiseSchedule(betas)
    assert s.T == T
    names = ["betas", "alphas", "alpha_bars", "alpha_bars_prev", "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars",
             "posterior_variance", "posterior_mean_coef_x0", "posterior_mean_coef_xt"]
    for name in names:
        buf = getattr(s, name)
        assert buf.shape == (T,) and buf.dtype == torch.float32, name
    assert len(s.state_dict()) == 0  # derived from betas, so nothing is saved


@pytest.mark.assignment(1)
@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_alpha_bar_strictly_decreasing_in_unit_interval(kind):
    """ᾱ_t = ∏(1−β_s) is strictly decreasing and inside (0, 1), in float64 and in the float32 buffers."""
    _, _, alpha_bars64, _ = float64_terms(make_beta_schedule(kind, T))
    for alpha_bars in (alpha_bars64, NoiseSchedule(make_beta_schedule(kind, T)).alpha_bars):
        assert (alpha_bars > 0).all() and (alpha_bars < 1).all()
        assert (alpha_bars[1:] < alpha_bars[:-1]).all()


@pytest.mark.assignment(1)
def test_scaled_linear_endpoints_and_sqrt_linearity():
    """scaled_linear: β_0 = beta_start, β_{T−1} = beta_end, and √β (not β) is evenly spaced."""
    betas = make_beta_schedule("scaled_linear", T, beta_start=8.5e-4, beta_end=1.2e-2)
    assert math.isclose(betas[0].item(), 8.5e-4, rel_tol=1e-12)
    assert math.isclose(betas[-1].item(), 1.2e-2, rel_tol=1e-12)
    steps = betas.sqrt().diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=0)
    assert not torch.allclose(betas.diff(), betas.diff().mean().expand(T - 1), rtol=1e-3)  # β itself is not linear


@pytest.mark.assignment(1)
def test_linear_schedule_endpoints():
    """linear (DDPM Sec. 4): β_0 = 1e-4, β_{T−1} = 0.02, evenly spaced."""
    betas = make_beta_schedule("linear", T)
    assert math.isclose(betas[0].item(), 1e-4, rel_tol=1e-12) and math.isclose(betas[-1].item(), 2e-2, rel_tol=1e-12)
    assert torch.allclose(betas.diff(), torch.full((T - 1,), (2e-2 - 1e-4) / (T - 1), dtype=torch.float64))


@pytest.mark.assignment(1)
def test_cosine_schedule_follows_closed_form():
    """Improved DDPM Eq. 17: ᾱ_t = f(t+1)/f(0) in code steps, f(u) = cos²((u/T + s)/(1+s)·π/2); β ≤ 0.999."""
    betas = make_beta_schedule("cosine", T)
    assert (betas <= 0.999).all() and betas[-1] == 0.999  # the last step is the clipped one
    f = [math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2 for u in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    _, _, alpha_bars, _ = float64_terms(betas)
    unclipped = torch.cumprod(betas < 0.999, 0).bool()  # every β up to t unclipped
    assert unclipped.sum() >= T - 1
    assert torch.allclose(alpha_bars[unclipped], expected[unclipped], rtol=1e-9, atol=0)


def test_diffusion_config_checks_its_fields():
    """DiffusionConfig rejects an unknown schedule or prediction, and shares outside their ranges."""
    for bad, message in ((dict(schedule="quadratic"), "schedule"), (dict(prediction="x0"), "prediction"),
                         (dict(p_uncond=1.0), "p_uncond"), (dict(p_noisy_t=2.0), "p_noisy_t"),
                         (dict(noisy_t_from=1.0), "noisy_t_from")):
        with pytest.raises(ValueError, match=message):
            DiffusionConfig(**bad)


def test_unknown_kind_raises_and_lists_kinds():
    """An unknown schedule name is a ValueError that lists the valid kinds."""
    with pytest.raises(ValueError) as info:
        make_beta_schedule("quadratic", T)
    assert all(kind in str(info.value) for kind in SCHEDULE_KINDS)


# --- forward process --------------------------------------------------------------------------


@pytest.mark.assignment(1)
def test_q_sample_moments(schedule):
    """DDPM Eq. 4: over many ε, x_t has mean √ᾱ_t·x0 and variance 1−ᾱ_t (per sample's own t)."""
    g = torch.Generator().manual_seed(0)
    N = 20000
    x0 = torch.randn(1, 3, 2, 2, generator=g).expand(N, 3, 2, 2)
    t = torch.cat([torch.full((N // 2,), 100), torch.full((N // 2,), 800)])
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    _, _, alpha_bars, _ = float64_terms(schedule.betas)
    n = N // 2
    for half, step in ((x_t[:n], 100), (x_t[n:], 800)):
        ab = alpha_bars[step].item()
        mean, var = half.double().mean(0), half.double().var(0)
        assert (mean - math.sqrt(ab) * x0[0].double()).abs().max() < 5 * math.sqrt((1 - ab) / n)
        assert ((var - (1 - ab)).abs() / (1 - ab)).max() < 5 * math.sqrt(2 / n)


@pytest.mark.assignment(1)
def test_predict_x0_and_eps_invert_q_sample(schedule):
    """DDPM Eq. 15 inverts Eq. 4 (x̂0 from ε, ε̂ from x0), for images (B,C,H,W) and points (B,2), tensor or int t."""
    g = torch.Generator().manual_seed(1)
    for shape, t in (((4, 3, 8, 8), torch.tensor([0, 10, 500, 999])), ((5, 2), 321)):
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x_t = schedule.q_sample(x0, t, eps)
        assert x_t.shape == x0.shape
        assert torch.allclose(schedule.predict_x0(x_t, t, eps), x0, atol=1e-4)
        assert torch.allclose(schedule.predict_eps(x_t, t, x0), eps, atol=1e-4)


@pytest.mark.assignment(2)
def test_q_posterior_matches_float64_closed_form(schedule):
    """DDPM Eqs. 6–7: μ̃_t and β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t, recomputed in float64 from the betas."""
    betas, alphas, alpha_bars, alpha_bars_prev = float64_terms(schedule.betas)
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 37, 500, 999])
    x0, x_t = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    mean, var = schedule.q_posterior(x0, x_t, t)
    b = (slice(None), None, None, None)
    coef_x0 = alpha_bars_prev[t].sqrt() * betas[t] / (1 - alpha_bars[t])
    coef_xt = alphas[t].sqrt() * (1 - alpha_bars_prev[t]) / (1 - alpha_bars[t])
    expected_mean = coef_x0[b] * x0.double() + coef_xt[b] * x_t.double()
    expected_var = (1 - alpha_bars_prev[t]) / (1 - alpha_bars[t]) * betas[t]
    assert torch.allclose(mean.double(), expected_mean, atol=1e-5)
    assert var.shape == (5, 1, 1, 1)
    assert torch.allclose(var.flatten().double(), expected_var, rtol=1e-5, atol=0)
    assert var.flatten()[0] == 0  # t = 0: ᾱ_{−1} = 1, the last step is deterministic


@pytest.mark.assignment(2)
@pytest.mark.parametrize("t", [1, 50, 600])
def test_posterior_is_bayes_product_of_gaussians(schedule, t):
    """q(x_{t−1}|x_t,x0) ∝ q(x_t|x_{t−1})·q(x_{t−1}|x0): mean and variance by numerical integration on a grid."""
    betas, alphas, alpha_bars, alpha_bars_prev = float64_terms(schedule.betas)
    x0, x_t = 0.7, math.sqrt(alpha_bars[t]) * 0.7 + math.sqrt(1 - alpha_bars[t]) * 0.3
    grid = torch.linspace(-6, 6, 400_001, dtype=torch.float64)  # values of x_{t−1}
    log_w = (Normal(alphas[t].sqrt() * grid, betas[t].sqrt()).log_prob(torch.tensor(x_t, dtype=torch.float64))
             + Normal(alpha_bars_prev[t].sqrt() * x0, (1 - alpha_bars_prev[t]).sqrt()).log_prob(grid))
    w = torch.softmax(log_w, 0)
    grid_mean = (w * grid).sum()
    grid_var = (w * (grid - grid_mean) ** 2).sum()
    mean, var = schedule.q_posterior(torch.tensor([x0]), torch.tensor([x_t], dtype=torch.float32), t)
    assert abs(mean.item() - grid_mean.item()) < 1e-5
    assert math.isclose(var.item(), grid_var.item(), rel_tol=1e-3)


# --- reverse steps ----------------------------------------------------------------------------


@pytest.mark.assignment(2)
def test_ddpm_step_matches_algorithm_2(schedule):
    """DDPM Alg. 2 line 4: x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + √β̃_t·z, recomputed in float64."""
    betas, alphas, alpha_bars, alpha_bars_prev = float64_terms(schedule.betas)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([1, 10, 400, 999])
    x_t, eps, z = (torch.randn(4, 2, generator=g) for _ in range(3))
    sigma = ((1 - alpha_bars_prev[t]) / (1 - alpha_bars[t]) * betas[t]).sqrt()[:, None]
    eps_coef = (betas[t] / (1 - alpha_bars[t]).sqrt())[:, None]
    expected = (x_t.double() - eps_coef * eps.double()) / alphas[t].sqrt()[:, None] + sigma * z.double()
    assert torch.allclose(schedule.ddpm_step(x_t, t, eps, noise=z).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.assignment(2)
def test_ddpm_step_adds_noise_only_for_t_above_zero(schedule):
    """DDPM Alg. 2: z = 0 at the last step (code t = 0); for t > 0 the noise changes the output."""
    g = torch.Generator().manual_seed(4)
    x_t, eps, n1, n2 = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    assert torch.equal(schedule.ddpm_step(x_t, 0, eps, noise=n1), schedule.ddpm_step(x_t, 0, eps, noise=n2))
    t = torch.tensor([0, 7])
    a, b = schedule.ddpm_step(x_t, t, eps, noise=n1), schedule.ddpm_step(x_t, t, eps, noise=n2)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


@pytest.mark.assignment(3)
def test_ddim_eta0_is_deterministic_and_keeps_eps(schedule):
    """DDIM Eq. 12, σ = 0: noise is ignored; with the true ε it maps q_sample(x0, t, ε) to q_sample(x0, t_prev, ε)."""
    g = torch.Generator().manual_seed(5)
    x0, eps, n1, n2 = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    t, t_prev = torch.tensor([999, 500, 20]), torch.tensor([700, 100, 0])
    x_t = forward(schedule, x0, t, eps)
    out1 = schedule.ddim_step(x_t, t, t_prev, eps, eta=0.0, noise=n1)
    assert torch.equal(out1, schedule.ddim_step(x_t, t, t_prev, eps, eta=0.0, noise=n2))
    assert torch.allclose(out1, forward(schedule, x0, t_prev, eps), atol=1e-4)
    assert torch.allclose(schedule.ddim_step(x_t, t, -1, eps), x0, atol=1e-4)  # t_prev = −1: ᾱ_prev = 1 → x̂0


@pytest.mark.assignment(3)
def test_ddim_eta1_one_step_equals_ddpm_step(schedule):
    """DDIM Eq. 16 with η = 1, t_prev = t−1: σ² = β̃_t, so the step is DDPM's (Alg. 2 line 4) for the same noise."""
    g = torch.Generator().manual_seed(6)
    x_t, eps, z = (torch.randn(5, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 10, 500, 999])
    ddim = schedule.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=z)
    ddpm = posterior_step(schedule, x_t, t, schedule.predict_x0(x_t, t, eps), z)
    assert torch.allclose(ddim.double(), ddpm, atol=1e-5)
    ddim_without_noise = schedule.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=torch.zeros_like(z))
    assert not torch.allclose(ddim[1:], ddim_without_noise[1:])  # η = 1 does add noise for t > 0


# --- guidance ---------------------------------------------------------------------------------


@pytest.mark.assignment(3)
def test_classifier_free_guidance_scales():
    """CFG Eq. 6 with s = 1 + w: s = 1 → ε_c, s = 0 → ε_u, s = 3 → 3·ε_c − 2·ε_u."""
    g = torch.Generator().manual_seed(7)
    eps_c, eps_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(classifier_free_guidance(eps_c, eps_u, 1.0), eps_c, atol=1e-6)
    assert torch.equal(classifier_free_guidance(eps_c, eps_u, 0.0), eps_u)
    assert torch.allclose(classifier_free_guidance(eps_c, eps_u, 3.0), 3 * eps_c - 2 * eps_u, atol=1e-5)


@pytest.mark.assignment(3)
def test_classifier_guidance_formula_and_identity_at_zero(schedule):
    """Guided Eq. 14: ε̂ = ε − s·√(1−ᾱ_t)·∇log p(y|x_t); exactly ε when s = 0."""
    _, _, alpha_bars, _ = float64_terms(schedule.betas)
    g = torch.Generator().manual_seed(8)
    eps, grad = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    t = torch.tensor([5, 300, 990])
    assert torch.equal(classifier_guidance(schedule, eps, t, grad, 0.0), eps)
    expected = eps.double() - 2.5 * (1 - alpha_bars[t]).sqrt()[:, None] * grad.double()
    assert torch.allclose(classifier_guidance(schedule, eps, t, grad, 2.5).double(), expected, atol=1e-6)


def log_p_y_grad(x_t, t):
    """∇_{x_t} log N(y = 3; x_t, 1) by autograd: a toy classifier that prefers x near 3."""
    x = x_t.detach().requires_grad_(True)
    log_p = Normal(x, 1.0).log_prob(torch.full_like(x, 3.0)).sum()
    return torch.autograd.grad(log_p, x)[0]


def test_classifier_guided_sampler(schedule):
    """classifier_scale = 0 gives exactly the unguided DDIM sample (the classifier is not even run);
    scale > 0 pulls the samples towards y (the sign of Guided Eq. 14)."""
    model = gaussian_oracle(schedule, 0.0, 0.5)
    x_T = torch.randn(512, 1, generator=torch.Generator().manual_seed(9))
    calls = []

    def counted_grad(x_t, t):
        calls.append(t)
        return log_p_y_grad(x_t, t)

    plain = ddim_sample(make_guided_eps(model, schedule), schedule, (512, 1), x_T=x_T, steps=20)
    zero = ddim_sample(make_guided_eps(model, schedule, classifier_grad=counted_grad, classifier_scale=0.0),
                       schedule, (512, 1), x_T=x_T, steps=20)
    assert torch.equal(plain, zero) and calls == []
    guided = ddim_sample(make_guided_eps(model, schedule, classifier_grad=counted_grad, classifier_scale=1.0),
                         schedule, (512, 1), x_T=x_T, steps=20)
    assert len(calls) == 20 and calls[0].shape == (512,)
    assert guided.mean() > plain.mean() + 0.2


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_guided_eps_is_the_model_then_cfg_then_classifier_guidance(schedule, prediction):
    """eps_fn(x_t, t) = Guided Eq. 14 applied to CFG Eq. 6 of the model's ε(c) and ε(c_u) (a v output turned
    into ε first), bit for bit; the model sees t as a LongTensor (B,), the classifier gets x_t and that t."""
    g = torch.Generator().manual_seed(18)
    cond, uncond = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    seen = []

    def model(x_t, t, context):
        seen.append(t)
        return 0.3 * x_t * (1 + t[:, None] / T) + context

    x_t, t = torch.randn(3, 2, generator=g), 420
    eps_fn = make_guided_eps(model, schedule, cond, uncond, 2.5, log_p_y_grad, 1.5, prediction)
    t_batch = torch.full((3,), t)

    def as_eps(out):
        return schedule.eps_from_v(x_t, t, out) if prediction == "v" else out

    cfg = classifier_free_guidance(as_eps(model(x_t, t_batch, cond)), as_eps(model(x_t, t_batch, uncond)), 2.5)
    expected = classifier_guidance(schedule, cfg, t, log_p_y_grad(x_t, t_batch), 1.5)
    assert torch.equal(eps_fn(x_t, t), expected)
    assert all(s.dtype == torch.long and torch.equal(s, t_batch) for s in seen)
    eps_c = as_eps(model(x_t, t_batch, cond))
    assert torch.equal(make_guided_eps(model, schedule, cond, uncond, 1.0, None, 0.0, prediction)(x_t, t), eps_c)


def test_samplers_are_the_loop_over_eps_fn(schedule):
    """ddpm_sample and ddim_sample are x_T ~ N(0, I), then one step per t with eps_fn's ε: the same generator
    gives bit for bit the loop written out here (the starting noise first, then each step's noise)."""
    small = NoiseSchedule(linear_betas(30, 1e-3, 0.2))
    eps_fn = make_guided_eps(gaussian_oracle(small, 0.5, 0.7), small)
    shape = (4, 3)
    g = torch.Generator().manual_seed(19)
    x_t = torch.randn(shape, generator=g)
    for t in range(small.T - 1, -1, -1):
        x_t = small.ddpm_step(x_t, t, eps_fn(x_t, t), generator=g)
    assert torch.equal(ddpm_sample(eps_fn, small, shape, generator=torch.Generator().manual_seed(19)), x_t)
    g = torch.Generator().manual_seed(20)
    x_t, steps = torch.randn(shape, generator=g), ddim_timesteps(small.T, 6)
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        x_t = small.ddim_step(x_t, t, t_prev, eps_fn(x_t, t), eta=0.5, generator=g)
    assert torch.equal(ddim_sample(eps_fn, small, shape, steps=6, eta=0.5,
                                   generator=torch.Generator().manual_seed(20)), x_t)


def test_score_eps_round_trip_and_closed_form(schedule):
    """Guided Eq. 11: the score of q(x_t|x0) is −(x_t − √ᾱ·x0)/(1−ᾱ) (autograd of Normal.log_prob) = −ε/√(1−ᾱ)."""
    g = torch.Generator().manual_seed(10)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 600, 999])
    x_t = forward(schedule, x0, t, eps).detach().requires_grad_(True)
    ab = schedule.alpha_bars[t].double()[:, None]
    log_q = Normal(ab.sqrt() * x0, (1 - ab).sqrt()).log_prob(x_t).sum()
    autograd_score = torch.autograd.grad(log_q, x_t)[0]
    closed_form = -(x_t.detach() - ab.sqrt() * x0) / (1 - ab)
    assert torch.allclose(autograd_score, closed_form, rtol=1e-6)
    assert torch.allclose(schedule.score_from_eps(eps, t), closed_form, rtol=1e-4, atol=1e-4)
    assert torch.allclose(schedule.eps_from_score(schedule.score_from_eps(eps, t), t), eps, atol=1e-6)


def test_v_conversions_round_trip_and_match_velocity(schedule):
    """v-pred: v = √ᾱ·ε − √(1−ᾱ)·x0 = dz/dφ for z = cos φ·x0 + sin φ·ε; ε is recovered from (x_t, v)."""
    g = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    x_t, v = forward(schedule, x0, t, eps), schedule.v_from_eps_x0(x0, eps, t)
    assert torch.allclose(schedule.eps_from_v(x_t, t, v), eps, atol=1e-5)
    ab = schedule.alpha_bars[t].double()
    phi = torch.atan2((1 - ab).sqrt(), ab.sqrt())  # cos φ = √ᾱ, sin φ = √(1−ᾱ)
    b = (slice(None), None, None, None)
    _, dz_dphi = torch.autograd.functional.jvp(
        lambda p: torch.cos(p)[b] * x0.double() + torch.sin(p)[b] * eps.double(), phi, torch.ones_like(phi))
    assert torch.allclose(v.double(), dz_dphi, atol=1e-5)


def test_snr(schedule):
    """SNR(t) = ᾱ_t/(1−ᾱ_t), decreasing in t; an int t gives a scalar."""
    _, _, alpha_bars, _ = float64_terms(schedule.betas)
    t = torch.arange(T)
    snr = schedule.snr(t)
    assert torch.allclose(snr.double(), alpha_bars / (1 - alpha_bars), rtol=1e-4)
    assert (snr[1:] < snr[:-1]).all()
    assert schedule.snr(0).shape == ()


# --- samplers ---------------------------------------------------------------------------------


@pytest.mark.assignment(8)
def test_ddpm_sample_recovers_gaussian_toy():
    """DDPM Alg. 2 with the exact ε for data N(1.5, 0.5²): 4000 samples have mean ≈ 1.5 and std ≈ 0.5."""
    schedule = ClosedFormSchedule(linear_betas(T))
    model = gaussian_oracle(schedule, 1.5, 0.5)
    x0 = ddpm_sample(make_guided_eps(model, schedule), schedule, (4000, 1),
                     generator=torch.Generator().manual_seed(12))
    assert x0.dtype == torch.float32
    assert abs(x0.mean().item() - 1.5) < 0.05 and abs(x0.std().item() - 0.5) < 0.05


@pytest.mark.assignment(8)
def test_ddim_sample_recovers_gaussian_toy_eps_and_v():
    """DDIM (50 steps, η = 0) with the exact ε for 2-D data N((1.5, −1), diag(0.5, 0.8)²); a v-model gives the same."""
    schedule = ClosedFormSchedule(linear_betas(T))
    mu, sigma = torch.tensor([1.5, -1.0]), torch.tensor([0.5, 0.8])
    eps_model = gaussian_oracle(schedule, mu, sigma)

    def v_model(x_t, t, context):  # the same predictor written as v
        eps = eps_model(x_t, t, context)
        return schedule.v_from_eps_x0(schedule.predict_x0(x_t, t, eps), eps, t)

    x0 = ddim_sample(make_guided_eps(eps_model, schedule), schedule, (4000, 2),
                     generator=torch.Generator().manual_seed(13), steps=50)
    assert (x0.mean(0) - mu).abs().max() < 0.05 and (x0.std(0) - sigma).abs().max() < 0.05
    x0_v = ddim_sample(make_guided_eps(v_model, schedule, prediction="v"), schedule, (4000, 2),
                       generator=torch.Generator().manual_seed(13), steps=50)
    assert torch.allclose(x0_v, x0, atol=1e-3)


def test_ddim_all_steps_eta1_equals_ddpm_sample(schedule):
    """steps = T, η = 1: DDIM is DDPM's ancestral sampler (same generator → same draws → same samples)."""
    eps_fn = make_guided_eps(gaussian_oracle(schedule, 1.5, 0.5), schedule)
    ddpm = ddpm_sample(eps_fn, schedule, (64, 1), generator=torch.Generator().manual_seed(14))
    ddim = ddim_sample(eps_fn, schedule, (64, 1), generator=torch.Generator().manual_seed(14), steps=T, eta=1.0)
    assert torch.allclose(ddpm, ddim, atol=1e-4)


@pytest.mark.assignment(8)
def test_samplers_reproducible_with_generator():
    """The same generator seed gives the same sample (DDPM and stochastic DDIM), another seed a different one."""
    small = ClosedFormSchedule(linear_betas(50, 1e-3, 0.2))
    eps_fn = make_guided_eps(gaussian_oracle(small, 0.0, 1.0), small)
    for sample, kwargs in ((ddpm_sample, {}), (ddim_sample, {"steps": 10, "eta": 0.5})):
        a, b, c = (sample(eps_fn, small, (2, 3, 4, 4), generator=torch.Generator().manual_seed(seed), **kwargs)
                   for seed in (0, 0, 1))
        assert a.shape == (2, 3, 4, 4) and a.dtype == small.betas.dtype
        assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.assignment(8)
def test_sampler_cfg_calls_and_context_passthrough(monkeypatch):
    """Guidance scale 1 makes one model call per step; otherwise two, and each equals CFG Eq. 6 of the two outputs."""
    import tinyldm.diffusion

    # CFG Eq. 6 written out, so that this test grades the loop, not assignment 3's classifier_free_guidance
    monkeypatch.setattr(tinyldm.diffusion, "classifier_free_guidance", lambda c, u, s: u + s * (c - u))
    small = ClosedFormSchedule(linear_betas(20))
    cond = (torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool))  # an (embeddings, mask) tuple
    uncond = (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    calls = []

    def model(x_t, t, context):
        assert context is cond or context is uncond  # opaque: passed through untouched
        calls.append(context is cond)
        return 0.1 * x_t + (0.3 if context is cond else -0.2)

    x_T = torch.randn(2, 2, generator=torch.Generator().manual_seed(15))
    ddim_sample(make_guided_eps(model, small, cond, uncond, guidance_scale=1.0), small, (2, 2), x_T=x_T, steps=5)
    assert calls == [True] * 5
    calls.clear()
    guided = ddim_sample(make_guided_eps(model, small, cond, uncond, guidance_scale=4.0), small, (2, 2),
                         x_T=x_T, steps=5)
    assert calls.count(True) == 5 and calls.count(False) == 5

    def model_cfg(x_t, t, context):  # what CFG with s = 4 must amount to: ε_u + 4·(ε_c − ε_u)
        return 0.1 * x_t - 0.2 + 4.0 * 0.5

    assert torch.allclose(guided, ddim_sample(make_guided_eps(model_cfg, small), small, (2, 2), x_T=x_T, steps=5),
                          atol=1e-5)


@pytest.mark.assignment(8)
def test_callback_sees_every_step_and_ddim_timesteps():
    """callback(i, t, x_t, x0_pred) runs once per step along ddim_timesteps: T−1 … 0, evenly spaced."""
    assert ddim_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    assert ddim_timesteps(1000, 1) == [999]
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, bad)
    small = ClosedFormSchedule(linear_betas(100))
    seen = []
    ddim_sample(make_guided_eps(gaussian_oracle(small, 0.0, 1.0), small), small, (3, 2), steps=7,
                callback=lambda i, t, x_t, x0_pred: seen.append((i, t, x0_pred.shape)))
    assert seen == [(i, t, (3, 2)) for i, t in enumerate(ddim_timesteps(100, 7))]


@pytest.mark.assignment(1)
def test_q_sample_rejects_bad_timesteps(schedule):
    """Clear ValueErrors from q_sample: t out of range, of the wrong shape, or not an integer (self._gather checks)."""
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        schedule.q_sample(x, T, x)
    with pytest.raises(ValueError):
        schedule.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError):
        schedule.q_sample(x, torch.tensor([1.0, 2.0]), x)


def test_bad_inputs_raise(schedule):
    """Clear ValueErrors: unknown prediction, wrong x_T shape, betas outside (0, 1)."""
    with pytest.raises(ValueError):
        make_guided_eps(lambda x_t, t, c: x_t, schedule, prediction="x0")
    with pytest.raises(ValueError):
        ddim_sample(lambda x_t, t: x_t, schedule, (2, 3), x_T=torch.zeros(2, 4))
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))


# --- training objective -----------------------------------------------------------------------


@pytest.mark.assignment(8)
def test_diffusion_loss_oracle_zero_model_and_gradients():
    """DDPM Eq. 14: ~0 for a model that knows ε (data is one point x0*), ≈ E[ε²] = 1 for a zero model; grads flow."""
    schedule = ClosedFormSchedule(linear_betas(T))
    g = torch.Generator().manual_seed(16)
    x0_star = torch.randn(1, 2, 4, 4, generator=g)
    x0 = x0_star.expand(64, 2, 4, 4)

    def oracle_eps(x_t, t, context):
        return schedule.predict_eps(x_t, t, x0_star.expand_as(x_t))

    def oracle_v(x_t, t, context):
        return schedule.v_from_eps_x0(x0_star.expand_as(x_t), oracle_eps(x_t, t, context), t)

    assert diffusion_loss(oracle_eps, schedule, x0, None, generator=g) < 1e-6
    assert diffusion_loss(oracle_v, schedule, x0, None, prediction="v", generator=g) < 1e-6
    zero_loss = diffusion_loss(lambda x_t, t, c: torch.zeros_like(x_t), schedule, x0, None, generator=g)
    assert 0.8 < zero_loss < 1.2

    weight = torch.zeros((), requires_grad=True)
    t, eps = torch.randint(0, T, (64,), generator=g), torch.randn(x0.shape, generator=g)
    loss = diffusion_loss(lambda x_t, t, c: weight * x_t, schedule, x0, None, t=t, eps=eps)
    loss.backward()
    assert weight.grad is not None and weight.grad.abs() > 0
    manual = ((0 * schedule.q_sample(x0, t, eps) - eps) ** 2).mean()  # weight is 0
    assert torch.allclose(loss.detach(), manual)


def test_draw_t_and_eps_draws_t_then_eps():
    """draw_t_and_eps draws t ~ U{0..T-1} (training_timesteps) and then ε ~ N(0, I) from one generator, in that
    order; a given t (int or (B,)) becomes a LongTensor (B,), and a given ε is used as it is."""
    schedule = NoiseSchedule(linear_betas(T))
    x0 = torch.zeros(5, 2, 3)
    t, eps = draw_t_and_eps(schedule, x0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(t, training_timesteps(T, 5, generator=g))
    assert torch.equal(eps, torch.randn(x0.shape, generator=g))
    given = torch.ones_like(x0)
    t, eps = draw_t_and_eps(schedule, x0, t=7, eps=given)
    assert t.dtype == torch.long and t.tolist() == [7] * 5 and eps is given


def test_training_timesteps_uniform_and_noisy_end():
    """p_noisy = 0 is DDPM's t ~ U{0..T-1}, draw for draw; p_noisy = 1 keeps every t in the noisy end;
    in between, the share of t at or above the noisy end's start is p + (1 - p)·(1 - noisy_from)."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(training_timesteps(T, 500, generator=g1), torch.randint(0, T, (500,), generator=g2))
    t = training_timesteps(T, 20000, p_noisy=1.0, noisy_from=0.6, generator=g1)
    assert t.dtype == torch.long and t.min() == 600 and t.max() == T - 1
    t = training_timesteps(T, 20000, p_noisy=0.5, noisy_from=0.6, generator=g1)
    share = (t >= 600).float().mean().item()
    assert abs(share - (0.5 + 0.5 * 0.4)) < 0.02  # 0.7 ± 4.4 standard errors
    assert t.min() < 600 and t.max() == T - 1
    for bad in [dict(p_noisy=-0.1), dict(p_noisy=1.5), dict(noisy_from=1.0), dict(noisy_from=-0.2)]:
        with pytest.raises(ValueError):
            training_timesteps(T, 4, **bad)
