"""Tests for tinyldm.diffusion: schedules, forward process, posterior, steps, guidance, samplers, loss.

Code timesteps t in {0..T−1} mean paper steps t+1 (see the diffusion.py docstring). The tests check
behaviour, each against a reference that is not the code under test written again: the one-step
process (DDPM Eq. 2) iterated, Gaussian conditioning done generically on a joint Gaussian, numerical
integration, torch.distributions, autograd, float64 values computed once with mpmath (stored as data),
and properties (a step preserves a marginal, noise enters as σ·z, ...).

Outside assignment 1 the tests use `wiggly_betas`, a schedule that is none of the three kinds and
whose β jumps from step to step, so that an off-by-one in t shows.
"""

import itertools
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


def wiggly_betas(T, mean_beta=None):
    """β_t = b·(1 + 0.6·sin(2.3·t)), float64 (T,): neither linear nor cosine, and β changes a lot between
    neighbouring steps. b = 10/T by default (at most 0.2), so that for large T ᾱ_{T−1} ≈ e^{−10} and x_T is
    N(0, I) for all purposes."""
    b = min(10.0 / T, 0.2) if mean_beta is None else mean_beta
    steps = torch.arange(T, dtype=torch.float64)
    return b * (1 + 0.6 * torch.sin(2.3 * steps))


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(wiggly_betas(T))


def float64_terms(betas):
    """α, ᾱ, ᾱ_{t−1} (with ᾱ_{−1} = 1) recomputed independently in float64."""
    betas = betas.double()
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, 0)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    return betas, alphas, alpha_bars, alpha_bars_prev


def alpha_bar_at(schedule, t):
    """ᾱ at code step t (int or tensor) in float64, with ᾱ_{−1} = 1 (the data)."""
    _, _, alpha_bars, _ = float64_terms(schedule.betas)
    t = torch.as_tensor(t)
    return torch.where(t >= 0, alpha_bars[t.clamp(min=0)], torch.ones((), dtype=torch.float64))


def per_row(values, x):
    """values (B,) or () shaped to broadcast against x (B, ...)."""
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def forward(schedule, x0, t, eps):
    """x_t for given x0 and ε, in float64, for tests that need it but do not grade q_sample: the one sample of
    q(x_t | x0) = N(√ᾱ_t·x0, (1−ᾱ_t)·I) (DDPM Eq. 4) that has noise ε."""
    a = per_row(alpha_bar_at(schedule, t), x0)
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).to(x0.dtype)


def markov_pair(alpha_bar_early, alpha_bar_late, x0):
    """The joint Gaussian of (u, v) = (x at noise level ᾱ_early, x at the later level ᾱ_late ≤ ᾱ_early), given x0,
    under the Markov forward process: u ~ q(· | x0) (DDPM Eq. 4), then v from u by the one-step kernel
    composed over the steps between (DDPM Eq. 2): v = √(ᾱ_late/ᾱ_early)·u + √(1 − ᾱ_late/ᾱ_early)·e.

    Written as (u, v) = m + L·(e₁, e₂) with independent standard normals e₁, e₂: returns the mean m (..., 2) and
    the covariance L·Lᵀ (..., 2, 2), per element of x0."""
    a1, a2 = torch.broadcast_tensors(alpha_bar_early.double(), alpha_bar_late.double())
    ratio = a2 / a1
    zero = torch.zeros_like(a1)
    L = torch.stack([torch.stack([(1 - a1).sqrt(), zero], -1),
                     torch.stack([ratio.sqrt() * (1 - a1).sqrt(), (1 - ratio).sqrt()], -1)], -2)  # (..., 2, 2)
    m_u = a1.sqrt() * x0.double()
    mean = torch.stack([m_u, ratio.sqrt() * m_u], -1)  # (..., 2)
    return mean, L @ L.transpose(-1, -2)


def condition_first_on_second(mean, cov, v):
    """Gaussian conditioning, generic: the law of u given v for (u, v) ~ N(mean, cov) (the Schur complement).
    Returns (E[u | v], Var[u | v]) per element."""
    gain = cov[..., 0, 1] / cov[..., 1, 1]
    return mean[..., 0] + gain * (v.double() - mean[..., 1]), cov[..., 0, 0] - gain * cov[..., 1, 0]


def posterior_by_conditioning(schedule, x0, x_t, t, t_prev=None):
    """Mean and variance of q(x_{t_prev} | x_t, x0) (t_prev = t − 1 by default), by conditioning the joint
    Gaussian of the Markov forward process: no posterior formula is written here."""
    t = torch.as_tensor(t)
    t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev)
    early, late = (per_row(alpha_bar_at(schedule, s), x0).expand(x0.shape) for s in (t_prev, t))
    mean, cov = markov_pair(early, late, x0)
    return condition_first_on_second(mean, cov, x_t)


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


# --- schedules (assignment 1) -----------------------------------------------------------------

# ᾱ of the cosine schedule (T = 1000) at code steps t, i.e. the paper's f(t+1)/f(0) (Improved DDPM Eq. 17,
# s = 0.008): computed once with mpmath at 40 digits, independently of tinyldm, and stored here as data.
COSINE_ALPHA_BARS = {0: 0.99995871577517822, 1: 0.99991257592736802, 9: 0.99936871840165848,
                     99: 0.97209273711396917, 499: 0.49384359044063771, 899: 0.024091724140085855,
                     990: 0.00019671738012480477}


@pytest.mark.assignment(1)
@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedule_shapes_dtypes_and_buffers(kind):
    """make_beta_schedule gives (T,) float64 with every β in (0, 1); NoiseSchedule's buffers are (T,) float32
    and non-persistent."""
    betas = make_beta_schedule(kind, T)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all()
    s = NoiseSchedule(betas)
    assert s.T == T
    for name in ["betas", "alphas", "alpha_bars", "alpha_bars_prev", "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars"]:
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
@pytest.mark.parametrize("start, end", [(1e-4, 2e-2), (3e-4, 5e-2)])
def test_linear_schedule_endpoints(start, end):
    """linear (DDPM Sec. 4): β_0 = beta_start, β_{T−1} = beta_end, evenly spaced; the arguments are used."""
    betas = make_beta_schedule("linear", T, beta_start=start, beta_end=end)
    assert math.isclose(betas[0].item(), start, rel_tol=1e-12) and math.isclose(betas[-1].item(), end, rel_tol=1e-12)
    assert torch.allclose(betas.diff(), torch.full((T - 1,), (end - start) / (T - 1), dtype=torch.float64))


@pytest.mark.assignment(1)
def test_cosine_schedule_matches_float64_values():
    """Improved DDPM Eq. 17 in code steps: ᾱ at code t is the paper's ᾱ(t+1) = f(t+1)/f(0) (values stored above,
    from mpmath); β ≤ 0.999 with only the last step clipped; beta_start and beta_end are ignored."""
    betas = make_beta_schedule("cosine", T)
    assert (betas <= 0.999).all() and betas[-1] == 0.999  # the last step is the clipped one
    assert (betas[:-1] < 0.999).all()
    _, _, alpha_bars, _ = float64_terms(betas)
    for t, expected in COSINE_ALPHA_BARS.items():
        assert math.isclose(alpha_bars[t].item(), expected, rel_tol=1e-9), (t, alpha_bars[t].item(), expected)
    assert torch.equal(make_beta_schedule("cosine", T, beta_start=0.3, beta_end=0.4), betas)
    _, _, small, _ = float64_terms(make_beta_schedule("cosine", 10))  # the paper's t enters as t/T:
    assert math.isclose(small[0].item(), COSINE_ALPHA_BARS[99], rel_tol=1e-9)  # code 0 of 10 is code 99 of 1000
    assert math.isclose(small[4].item(), COSINE_ALPHA_BARS[499], rel_tol=1e-9)


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


# --- forward process (assignment 1) -----------------------------------------------------------


def one_step_process_iterated(betas):
    """Run DDPM Eq. 2, x_s = √(1−β_s)·x_{s−1} + √β_s·e_s, for s = 0, 1, … from x_{−1} = x0, tracking in float64
    the coefficient of x0 and the variance of the noise collected: q(x_t | x0) = N(m_t·x0, v_t·I).
    Returns (m, √v), each (T,), entry t after the steps 0 … t."""
    m, v, out = 1.0, 0.0, []
    for beta in betas.tolist():
        m, v = math.sqrt(1 - beta) * m, (1 - beta) * v + beta
        out.append((m, math.sqrt(v)))
    return torch.tensor(out, dtype=torch.float64).T


@pytest.mark.assignment(1)
@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (6, 2)])
def test_q_sample_is_the_one_step_process_iterated(schedule, shape):
    """q_sample(x0, t, ε) = m_t·x0 + s_t·ε, where m_t and s_t² are the mean factor and the variance of t+1 steps of
    DDPM Eq. 2 (code t is paper step t+1); for images and points, t a tensor (B,) or an int."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    chain = one_step_process_iterated(schedule.betas.double())  # (2, T)
    steps = [0, 1, 2, 57, 500, 999]
    for t in (torch.tensor(steps), 321):
        ts = torch.tensor(steps if isinstance(t, torch.Tensor) else [t] * shape[0])
        m, s = (per_row(chain[i, ts], x0) for i in (0, 1))
        noisy = schedule.q_sample(x0, t, eps)
        assert noisy.shape == x0.shape and noisy.dtype == torch.float32
        torch.testing.assert_close(noisy.double(), m * x0.double() + s * eps.double(), rtol=1e-5, atol=1e-6)
        # the two coefficients alone (x0 = 1, ε = 0 and x0 = 0, ε = 1)
        ones, zeros = torch.ones(shape), torch.zeros(shape)
        torch.testing.assert_close(schedule.q_sample(ones, t, zeros).double(), m.expand(shape), rtol=1e-5, atol=0)
        torch.testing.assert_close(schedule.q_sample(zeros, t, ones).double(), s.expand(shape), rtol=1e-5, atol=0)


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
def test_q_sample_rejects_bad_timesteps(schedule):
    """Clear ValueErrors from q_sample: t out of range, of the wrong shape, or not an integer (self._gather checks)."""
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        schedule.q_sample(x, T, x)
    with pytest.raises(ValueError):
        schedule.q_sample(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError):
        schedule.q_sample(x, torch.tensor([1.0, 2.0]), x)


def test_predict_x0_and_predict_eps_invert_the_forward_process(schedule):
    """DDPM Eq. 15 inverts Eq. 4 (x̂0 from ε, ε̂ from x0), for images (B,C,H,W) and points (B,2), tensor or int t.
    The tolerance scales with 1/√ᾱ_t (resp. 1/√(1−ᾱ_t)), by which the inversion amplifies float32 rounding."""
    g = torch.Generator().manual_seed(1)
    for shape, t in (((4, 3, 8, 8), torch.tensor([0, 10, 500, 999])), ((5, 2), 321)):
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x_t = forward(schedule, x0, t, eps)
        a = per_row(alpha_bar_at(schedule, t), x0).float()
        assert ((schedule.predict_x0(x_t, t, eps) - x0).abs() <= 1e-5 / a.sqrt()).all()
        assert ((schedule.predict_eps(x_t, t, x0) - eps).abs() <= 1e-5 / (1 - a).sqrt()).all()


# --- the posterior and the DDPM step (assignment 2) -------------------------------------------


@pytest.mark.assignment(2)
def test_q_posterior_is_the_conditioned_joint_gaussian(schedule):
    """DDPM Eqs. 6–7: q_posterior's mean and variance are those of x_{t−1} given x_t in the joint Gaussian of
    (x_{t−1}, x_t) given x0, conditioned here generically; t a tensor or an int; variance (B, 1, ..., 1), 0 at t = 0."""
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 2, 37, 500, 998, 999])
    x0, x_t = torch.randn(7, 2, 3, 3, generator=g), torch.randn(7, 2, 3, 3, generator=g)
    mean, var = schedule.q_posterior(x0, x_t, t)
    expected_mean, expected_var = posterior_by_conditioning(schedule, x0, x_t, t)
    assert mean.shape == x_t.shape and var.shape == (7, 1, 1, 1)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var.double().expand(x_t.shape), expected_var, rtol=1e-4, atol=1e-10)
    assert var.flatten()[0].abs() < 1e-12  # t = 0: ᾱ_{−1} = 1, the last step is deterministic
    mean, var = schedule.q_posterior(x0[:2], x_t[:2], 37)  # an int t: one step for the batch
    expected_mean, expected_var = posterior_by_conditioning(schedule, x0[:2], x_t[:2], torch.tensor([37, 37]))
    assert var.shape == (1, 1, 1, 1)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var.double().expand(x_t[:2].shape), expected_var, rtol=1e-4, atol=1e-10)


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


@pytest.mark.assignment(2)
def test_ddpm_step_draws_from_the_posterior_at_x0_hat(schedule):
    """DDPM Alg. 2 line 4 through x̂0: without noise the step is the posterior mean at x̂0 = predict_x0(x_t, t, ε)
    (conditioned here generically), and noise z enters as √β̃_t·z, β̃_t the posterior variance; t tensor or int."""
    g = torch.Generator().manual_seed(3)
    for t in (torch.tensor([1, 2, 10, 400, 998, 999]), 321):
        x_t, eps, z = (torch.randn(6, 2, generator=g) for _ in range(3))
        x0_hat = schedule.predict_x0(x_t, t, eps)  # given: DDPM Eq. 15
        ts = t if isinstance(t, torch.Tensor) else torch.full((6,), t)
        mean, var = posterior_by_conditioning(schedule, x0_hat, x_t, ts)
        without_noise = schedule.ddpm_step(x_t, t, eps, noise=torch.zeros_like(z))
        with_noise = schedule.ddpm_step(x_t, t, eps, noise=z)
        assert with_noise.shape == x_t.shape
        torch.testing.assert_close(without_noise.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close((with_noise - without_noise).double(), var.sqrt() * z.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.assignment(2)
def test_ddpm_step_adds_noise_only_for_t_above_zero(schedule):
    """DDPM Alg. 2: z = 0 at the last step (code t = 0); for t > 0 the noise changes the output; without `noise`
    the draw comes from `generator`."""
    g = torch.Generator().manual_seed(4)
    x_t, eps, n1, n2 = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    torch.testing.assert_close(schedule.ddpm_step(x_t, 0, eps, noise=n1), schedule.ddpm_step(x_t, 0, eps, noise=n2),
                               rtol=0, atol=1e-6)
    t = torch.tensor([0, 7])
    a, b = schedule.ddpm_step(x_t, t, eps, noise=n1), schedule.ddpm_step(x_t, t, eps, noise=n2)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1], b[1])
    drawn = [schedule.ddpm_step(x_t, 7, eps, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[0], drawn[2])


# --- the DDIM step (assignment 3) -------------------------------------------------------------

# strided steps (t, t_prev), the last one to the data (t_prev = −1), as ddim_sample takes them
STRIDES = torch.tensor([[999, 749], [700, 300], [500, 499], [40, 39], [250, 0], [40, -1]])


@pytest.mark.assignment(3)
def test_ddim_eta0_is_deterministic_and_keeps_eps(schedule):
    """DDIM Eq. 12, σ = 0: noise is ignored; with the true ε it maps forward(x0, t, ε) to forward(x0, t_prev, ε)."""
    g = torch.Generator().manual_seed(5)
    x0, eps, n1, n2 = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    t, t_prev = torch.tensor([999, 500, 20]), torch.tensor([700, 100, 0])
    x_t = forward(schedule, x0, t, eps)
    out1 = schedule.ddim_step(x_t, t, t_prev, eps, eta=0.0, noise=n1)
    assert torch.equal(out1, schedule.ddim_step(x_t, t, t_prev, eps, eta=0.0, noise=n2))
    torch.testing.assert_close(out1, forward(schedule, x0, t_prev, eps), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.ddim_step(x_t, t, torch.full((3,), -1), eps), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.assignment(3)
@pytest.mark.parametrize("eta", [0.25, 0.5, 1.0])
def test_ddim_noise_is_sigma_z_with_eta_times_the_conditional_std(schedule, eta):
    """x_prev(noise=z) − x_prev(noise=0) = σ·z, and σ² = η²·Var(x_{t'} | x_t, x0), the variance of the Markov
    forward process's x_{t'} given x_t (DDIM Eq. 16), conditioned here generically; on strided steps too."""
    g = torch.Generator().manual_seed(6)
    t, t_prev = STRIDES[:, 0], STRIDES[:, 1]
    x_t, eps, z = (torch.randn(len(t), 3, generator=g) for _ in range(3))
    with_noise = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, noise=z)
    without_noise = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, noise=torch.zeros_like(z))
    _, variance = posterior_by_conditioning(schedule, torch.zeros_like(x_t), x_t, t, t_prev)  # does not depend on x0
    sigma = eta * variance.sqrt()
    torch.testing.assert_close((with_noise - without_noise).double(), sigma * z.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.assignment(3)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_keeps_the_marginal_for_every_eta(schedule, eta):
    """DDIM's point (Sec. 4.1): with the true ε, x_t ~ q(x_t|x0) is taken to x_{t'} ~ q(x_{t'}|x0) = N(√ᾱ_{t'}·x0,
    (1−ᾱ_{t'})·I) for every η. The step is affine in (ε, z): its constant is √ᾱ_{t'}·x0 and its two coefficients
    have squares summing to 1 − ᾱ_{t'}."""
    t, t_prev = STRIDES[:-1, 0], STRIDES[:-1, 1]
    x0 = torch.randn(len(t), 3, generator=torch.Generator().manual_seed(7))

    def step(eps_value, z_value):
        eps, z = torch.full_like(x0, eps_value), torch.full_like(x0, z_value)
        return schedule.ddim_step(forward(schedule, x0, t, eps), t, t_prev, eps, eta=eta, noise=z).double()

    constant = step(0.0, 0.0)
    c_eps, c_z = step(1.0, 0.0) - constant, step(0.0, 1.0) - constant
    a_prev = per_row(alpha_bar_at(schedule, t_prev), x0)
    torch.testing.assert_close(constant, a_prev.sqrt() * x0.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_eps**2 + c_z**2, (1 - a_prev).expand(x0.shape), rtol=1e-3, atol=1e-5)


@pytest.mark.assignment(3)
def test_ddim_eta1_consecutive_steps_are_ddpm_steps(schedule):
    """DDIM Eq. 16 with η = 1 and t' = t − 1: σ² is the posterior variance β̃_t and the step is a draw from the
    posterior at x̂0 (DDPM's step), both from the joint Gaussian conditioned here."""
    g = torch.Generator().manual_seed(8)
    x_t, eps, z = (torch.randn(5, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 10, 500, 999])
    mean, var = posterior_by_conditioning(schedule, schedule.predict_x0(x_t, t, eps), x_t, t)
    ddim = schedule.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=z)
    torch.testing.assert_close(ddim.double(), mean + var.sqrt() * z.double(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ddim[1:], schedule.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=torch.zeros_like(z))[1:])


@pytest.mark.assignment(3)
def test_ddim_step_takes_python_ints(schedule):
    """ddim_sample calls ddim_step with python ints, t_prev = −1 at the last step: ints give what tensors give."""
    g = torch.Generator().manual_seed(9)
    x_t, eps, z = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    for (t, t_prev), eta in itertools.product(STRIDES.tolist(), (0.0, 0.5)):
        as_ints = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, noise=z)
        as_tensors = schedule.ddim_step(x_t, torch.full((4,), t), torch.full((4,), t_prev), eps, eta=eta, noise=z)
        assert as_ints.shape == x_t.shape
        torch.testing.assert_close(as_ints, as_tensors, rtol=1e-6, atol=1e-6)
    drawn = [schedule.ddim_step(x_t, 700, 300, eps, eta=0.5, generator=torch.Generator().manual_seed(s))
             for s in (1, 1, 2)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.allclose(drawn[0], drawn[2])


# --- guidance (assignment 3) ------------------------------------------------------------------


@pytest.mark.assignment(3)
def test_classifier_free_guidance_scales():
    """CFG Eq. 6 with s = 1 + w: s = 1 → ε_c, s = 0 → ε_u, s = 3 → 3·ε_c − 2·ε_u, s = −0.5 → 1.5·ε_u − 0.5·ε_c."""
    g = torch.Generator().manual_seed(10)
    eps_c, eps_u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for s, (weight_c, weight_u) in ((1.0, (1, 0)), (0.0, (0, 1)), (3.0, (3, -2)), (-0.5, (-0.5, 1.5))):
        out = classifier_free_guidance(eps_c, eps_u, s)
        assert out.shape == eps_c.shape and out.dtype == eps_c.dtype
        torch.testing.assert_close(out, weight_c * eps_c + weight_u * eps_u, rtol=1e-5, atol=1e-5)


def gaussian_scores(x_t, alpha_bar):
    """A toy with every density known: p(x0) = N(0, 1.5²), and p(x0 | y) = N(0.8, 0.4²) for the label y. Returns
    ∇log p(x_t), ∇log p(x_t | y) and the Bayes classifier's ∇log p(y | x_t) = ∇log p(x_t | y) − ∇log p(x_t),
    each by autograd of Normal.log_prob of the noised densities (DDPM Eq. 4: variance ᾱ·σ² + 1 − ᾱ)."""
    x = x_t.double().detach().requires_grad_(True)
    log_p = Normal(0.0, (alpha_bar * 1.5**2 + 1 - alpha_bar).sqrt()).log_prob(x).sum()
    log_p_y = Normal(alpha_bar.sqrt() * 0.8, (alpha_bar * 0.4**2 + 1 - alpha_bar).sqrt()).log_prob(x).sum()
    score_u, score_c = (torch.autograd.grad(v, x)[0] for v in (log_p, log_p_y))
    return score_u.float(), score_c.float(), (score_c - score_u).float()


@pytest.mark.assignment(3)
def test_classifier_guidance_with_the_bayes_classifier(schedule):
    """Guided Eq. 14 on a toy: from the unconditional ε, s = 0 gives it back, s = 1 with the Bayes classifier's
    gradient gives the conditional ε (both ε from scores by Guided Eq. 11), and ε̂ moves linearly in s."""
    x_t = torch.randn(3, 4, generator=torch.Generator().manual_seed(11))
    for t in (torch.tensor([5, 300, 990]), 300):
        score_u, score_c, grad = gaussian_scores(x_t, per_row(alpha_bar_at(schedule, t), x_t))
        eps_u, eps_c = schedule.eps_from_score(score_u, t), schedule.eps_from_score(score_c, t)  # given: Guided Eq. 11
        torch.testing.assert_close(classifier_guidance(schedule, eps_u, t, grad, 0.0), eps_u, rtol=0, atol=1e-7)
        torch.testing.assert_close(classifier_guidance(schedule, eps_u, t, grad, 1.0), eps_c, rtol=1e-5, atol=1e-5)
        for s in (2.5, -1.0):
            torch.testing.assert_close(classifier_guidance(schedule, eps_u, t, grad, s) - eps_u, s * (eps_c - eps_u),
                                       rtol=1e-4, atol=1e-5)


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
    small = NoiseSchedule(wiggly_betas(30, 0.1))
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


# --- samplers and the loss (assignment 8) -----------------------------------------------------


class StandInSchedule(NoiseSchedule):
    """A NoiseSchedule whose q_sample, ddpm_step and ddim_step (assignments 1–3) are stand-ins: simple maps
    that are not the papers' maths, which record every call. The loops and the loss (assignment 8) are
    graded with it on their own: what they call, in which order, with what, and what they do with the result."""

    def __init__(self, betas):
        super().__init__(betas)
        self.calls = []

    def q_sample(self, x0, t, eps):
        out = 2 * x0 - eps / 3 + per_row(torch.as_tensor(t, dtype=x0.dtype), x0) / 100
        self.calls.append(dict(name="q_sample", x0=x0, t=t, eps=eps, out=out))
        return out

    def _stand_in_step(self, x_t, eps, generator):
        z = torch.randn(x_t.shape, generator=generator)  # draws from the caller's generator, as a real step would
        return 0.9 * x_t - 0.05 * eps + 0.01 * z

    def ddpm_step(self, x_t, t, eps, noise=None, generator=None):
        out = self._stand_in_step(x_t, eps, generator)
        self.calls.append(dict(name="ddpm_step", x_t=x_t, t=t, eps=eps, generator=generator, out=out))
        return out

    def ddim_step(self, x_t, t, t_prev, eps, eta=0.0, noise=None, generator=None):
        out = self._stand_in_step(x_t, eps, generator)
        self.calls.append(dict(name="ddim_step", x_t=x_t, t=t, t_prev=t_prev, eps=eps, eta=eta, generator=generator,
                               out=out))
        return out


def recording_eps_fn(seen):
    """An eps_fn(x_t, t) that records its calls and returns a function of both."""
    def eps_fn(x_t, t):
        seen.append((x_t, t))
        return 0.5 * x_t + t / 100
    return eps_fn


def check_chain(calls, x_T, eps_fn, result):
    """The steps form one chain: the first starts at x_T, each starts where the last ended, each steps with
    eps_fn's ε for its own x_t and t, and the sampler returns the last step's output."""
    assert calls[0]["x_t"] is x_T or torch.equal(calls[0]["x_t"], x_T)
    for before, after in zip(calls, calls[1:]):
        assert torch.equal(after["x_t"], before["out"])
    for call in calls:
        assert torch.equal(call["eps"], eps_fn(call["x_t"], call["t"]))
    assert torch.equal(result, calls[-1]["out"])


@pytest.mark.assignment(8)
def test_ddpm_sample_steps_from_T_minus_1_down_to_0():
    """DDPM Algorithm 2: ddpm_step once for each t = T−1, …, 0 (python ints), chained from x_T, with eps_fn's ε
    and the caller's generator; the callback sees (i, t, x_t, x̂0) before each step."""
    small = StandInSchedule(wiggly_betas(12))
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(12))
    g, seen, shown = torch.Generator().manual_seed(13), [], []
    result = ddpm_sample(recording_eps_fn(seen), small, (3, 2), generator=g, x_T=x_T,
                         callback=lambda i, t, x_t, x0_pred: shown.append((i, t, x_t, x0_pred)))
    calls = small.calls
    assert [c["t"] for c in calls] == list(range(11, -1, -1)) and all(type(c["t"]) is int for c in calls)
    assert all(c["generator"] is g for c in calls)
    check_chain(calls, x_T, recording_eps_fn([]), result)
    assert [(i, t) for i, t, _, _ in shown] == list(enumerate(range(11, -1, -1)))
    for (i, t, x_t, x0_pred), call in zip(shown, calls):
        assert torch.equal(x_t, call["x_t"])
        torch.testing.assert_close(x0_pred, small.predict_x0(call["x_t"], t, call["eps"]))


@pytest.mark.assignment(8)
@pytest.mark.parametrize("steps, eta", [(5, 0.0), (7, 0.5), (1, 1.0)])
def test_ddim_sample_steps_along_ddim_timesteps(steps, eta):
    """DDIM: ddim_step once for each t of ddim_timesteps(T, steps), t_prev the next one and −1 after the last
    (python ints), chained from x_T, with eps_fn's ε, the caller's η and generator; the callback sees each step."""
    small = StandInSchedule(wiggly_betas(30))
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(14))
    g, seen, shown = torch.Generator().manual_seed(15), [], []
    result = ddim_sample(recording_eps_fn(seen), small, (2, 3), steps=steps, eta=eta, generator=g, x_T=x_T,
                         callback=lambda i, t, x_t, x0_pred: shown.append((i, t)))
    calls, timesteps = small.calls, ddim_timesteps(30, steps)
    assert [(c["t"], c["t_prev"]) for c in calls] == list(zip(timesteps, timesteps[1:] + [-1]))
    assert all(type(c["t"]) is int and type(c["t_prev"]) is int for c in calls)
    assert all(c["eta"] == eta and c["generator"] is g for c in calls)
    check_chain(calls, x_T, recording_eps_fn([]), result)
    assert shown == list(enumerate(timesteps))


@pytest.mark.assignment(8)
def test_samplers_draw_x_T_from_the_generator_first():
    """Without x_T the samplers start from x_T ~ N(0, I) drawn first from the generator: the same seed gives the
    same sample, another seed another one; the shape and dtype are the schedule's."""
    small = StandInSchedule(wiggly_betas(8))
    for sample, kwargs in ((ddpm_sample, {}), (ddim_sample, {"steps": 4, "eta": 0.5})):
        a, b, c = (sample(recording_eps_fn([]), small, (2, 3, 4, 4), generator=torch.Generator().manual_seed(seed),
                          **kwargs) for seed in (0, 0, 1))
        assert a.shape == (2, 3, 4, 4) and a.dtype == small.betas.dtype
        assert torch.equal(a, b) and not torch.allclose(a, c)
        small.calls.clear()
        sample(recording_eps_fn([]), small, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(small.calls[0]["x_t"], torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
        small.calls.clear()


@pytest.mark.assignment(8)
def test_sampler_cfg_calls_and_context_passthrough(monkeypatch):
    """Guidance scale 1 makes one model call per step; otherwise two, and the step gets classifier_free_guidance's
    result of the two (a stand-in here, so that this grades the loop, not assignment 3)."""
    import tinyldm.diffusion

    monkeypatch.setattr(tinyldm.diffusion, "classifier_free_guidance", lambda c, u, s: 10 * c + u + s)
    small = StandInSchedule(wiggly_betas(20))
    cond = (torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool))  # an (embeddings, mask) tuple
    uncond = (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    calls = []

    def model(x_t, t, context):
        assert context is cond or context is uncond  # opaque: passed through untouched
        calls.append(context is cond)
        return 0.1 * x_t + (0.3 if context is cond else -0.2)

    x_T = torch.randn(2, 2, generator=torch.Generator().manual_seed(16))
    ddim_sample(make_guided_eps(model, small, cond, uncond, guidance_scale=1.0), small, (2, 2), x_T=x_T, steps=5)
    assert calls == [True] * 5
    calls.clear()
    small.calls.clear()
    ddim_sample(make_guided_eps(model, small, cond, uncond, guidance_scale=4.0), small, (2, 2), x_T=x_T, steps=5)
    assert calls.count(True) == 5 and calls.count(False) == 5
    for step in small.calls:
        x_t = step["x_t"]
        torch.testing.assert_close(step["eps"], 10 * (0.1 * x_t + 0.3) + (0.1 * x_t - 0.2) + 4.0)


@pytest.mark.assignment(8)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_is_the_mean_squared_error_to_the_target(prediction):
    """DDPM Eq. 14 (or the v target): the model sees q_sample(x0, t, ε), t and the context; the loss is the mean
    over all elements of (target − model output)², a 0-d tensor; target ε, or v = v_from_eps_x0(x0, ε, t)."""
    small = StandInSchedule(wiggly_betas(50))
    g = torch.Generator().manual_seed(17)
    x0, eps, delta = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 7, 30, 49])
    context, seen = object(), []
    target = eps if prediction == "eps" else small.v_from_eps_x0(x0, eps, t)

    def model(x_t, t_model, c):
        seen.append((x_t, t_model, c))
        return target + delta

    loss = diffusion_loss(model, small, x0, context, prediction=prediction, t=t, eps=eps)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, (delta**2).mean())
    (x_t, t_model, c), = seen
    assert c is context and torch.equal(t_model, t)
    assert len(small.calls) == 1 and torch.equal(x_t, small.calls[0]["out"])
    assert torch.equal(small.calls[0]["x0"], x0) and torch.equal(small.calls[0]["eps"], eps)


@pytest.mark.assignment(8)
def test_diffusion_loss_draws_t_and_eps_and_gradients_flow():
    """Without t and ε the loss draws them with draw_t_and_eps from the generator (same seed, same loss); a model
    that outputs the target costs 0, a zero model costs E[ε²] ≈ 1; the gradient reaches the model's weights."""
    small = StandInSchedule(wiggly_betas(T))
    x0 = torch.randn(256, 2, 4, 4, generator=torch.Generator().manual_seed(18))
    t, eps = draw_t_and_eps(small, x0, torch.Generator().manual_seed(19))

    def knows_eps(x_t, t_model, c):  # inverts the stand-in q_sample: it knows x0
        return 3 * (2 * x0 - x_t + per_row(t_model.to(x_t.dtype), x_t) / 100)

    assert diffusion_loss(knows_eps, small, x0, None, generator=torch.Generator().manual_seed(19)) < 1e-8
    zero = diffusion_loss(lambda x_t, t, c: torch.zeros_like(x_t), small, x0, None,
                          generator=torch.Generator().manual_seed(19))
    torch.testing.assert_close(zero, (eps**2).mean())
    assert 0.9 < zero < 1.1
    weight = torch.zeros((), requires_grad=True)
    loss = diffusion_loss(lambda x_t, t, c: weight * x_t, small, x0, None, t=t, eps=eps)
    loss.backward()
    assert weight.grad is not None and weight.grad.abs() > 0


# --- the whole samplers on a toy with an exact ε (all assignments together) -------------------


def test_ddpm_sample_recovers_gaussian_toy(schedule):
    """DDPM Alg. 2 with the exact ε for data N(1.5, 0.5²): 4000 samples have mean ≈ 1.5 and std ≈ 0.5."""
    model = gaussian_oracle(schedule, 1.5, 0.5)
    x0 = ddpm_sample(make_guided_eps(model, schedule), schedule, (4000, 1),
                     generator=torch.Generator().manual_seed(12))
    assert x0.dtype == torch.float32
    assert abs(x0.mean().item() - 1.5) < 0.05 and abs(x0.std().item() - 0.5) < 0.05


def test_ddim_sample_recovers_gaussian_toy_eps_and_v():
    """DDIM (50 steps, η = 0) with the exact ε for 2-D data N((1.5, −1), diag(0.5, 0.8)²); a v-model gives the same.
    On DDPM's linear schedule, whose small β near t = 0 make the last strided step a short one."""
    schedule = NoiseSchedule(make_beta_schedule("linear", T))
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


def test_bad_inputs_raise(schedule):
    """Clear ValueErrors: unknown prediction, wrong x_T shape, betas outside (0, 1)."""
    with pytest.raises(ValueError):
        make_guided_eps(lambda x_t, t, c: x_t, schedule, prediction="x0")
    with pytest.raises(ValueError):
        ddim_sample(lambda x_t, t: x_t, schedule, (2, 3), x_T=torch.zeros(2, 4))
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))


# --- training objective -----------------------------------------------------------------------


# --- training draws -----------------------------------------------------------------------------


def test_draw_t_and_eps_draws_t_then_eps():
    """draw_t_and_eps draws t ~ U{0..T-1} (training_timesteps) and then ε ~ N(0, I) from one generator, in that
    order; a given t (int or (B,)) becomes a LongTensor (B,), and a given ε is used as it is."""
    schedule = NoiseSchedule(wiggly_betas(T))
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
