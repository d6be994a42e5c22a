"""Instructor-only tests of the diffusion assignments (1, 2, 3, 8); the starter kit does not get tests/hidden/.

They hold what the public tests must not: float64 values of DDPM's linear schedule computed once with mpmath at
40 digits (stored here as data), the papers' closed forms written out as references, and the samplers graded on
a toy with the exact ε. Code t means paper step t+1 (see tinyldm/diffusion.py).
"""

import math

import pytest
import torch

from tinyldm.diffusion import (NoiseSchedule, classifier_free_guidance, classifier_guidance, ddim_sample, ddpm_sample,
                               make_beta_schedule, make_guided_eps)

T = 1000
LINEAR = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)  # DDPM's schedule, written here (not assignment 1's code)

# mpmath, 40 digits, linear schedule β_t = 1e-4 + (0.02 − 1e-4)·t/999: (√ᾱ_t, √(1−ᾱ_t)) at code t
SQRT_ALPHA_BARS = {0: (0.9999499987499375, 0.01), 1: (0.99989003999043418, 0.014829292900469932),
                   499: (0.28033416288739808, 0.95990247271179678), 999: (0.0063528180875700221, 0.99997982064756999)}
# the same, the posterior q(x_{t−1}|x_t, x0) by conditioning the joint Gaussian: (coef of x0, coef of x_t, β̃_t)
POSTERIOR = {1: (0.54529149951027148, 0.45470849899056467, 5.4531876613026054e-5),
             10: (0.13627785977005411, 0.86372206928696654, 0.00025846362040810561),
             500: (0.0030580570756296196, 0.99410435075672573, 0.010051335778909594),
             999: (0.00012835148717224694, 0.98994867826751726, 0.019999983526560607)}
# the same, DDIM's σ² = η²·Var(x_{t'} | x_t, x0) on strided steps: (t, t', η) -> σ²
DDIM_SIGMA2 = {(999, 749, 0.5): 0.24617106854232421, (500, 250, 1.0): 0.44152189987722802,
               (250, 0, 0.3): 8.9990193266906897e-6, (40, 39, 1.0): 0.00085781708645141413}


@pytest.mark.assignment(1)
def test_hidden_linear_and_cosine_endpoints():
    """make_beta_schedule("linear") is DDPM's schedule to 1e-12; cosine's ᾱ at code 0 is f(1)/f(0)."""
    torch.testing.assert_close(make_beta_schedule("linear", T), LINEAR, rtol=1e-12, atol=0)
    alpha_bar0 = 1 - make_beta_schedule("cosine", T)[0].item()
    assert math.isclose(alpha_bar0, 0.99995871577517822, rel_tol=1e-9)


@pytest.mark.assignment(1)
def test_hidden_q_sample_matches_mpmath_values():
    """q_sample(x0, t, ε) = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with the coefficients of the linear schedule from mpmath."""
    schedule = NoiseSchedule(LINEAR)
    ones, zeros = torch.ones(4, 3), torch.zeros(4, 3)
    t = torch.tensor(list(SQRT_ALPHA_BARS))
    signal, noise = (torch.tensor([v[i] for v in SQRT_ALPHA_BARS.values()])[:, None] for i in (0, 1))
    torch.testing.assert_close(schedule.q_sample(ones, t, zeros), signal.expand(4, 3), rtol=2e-6, atol=0)
    # rtol 5e-4: √(1 − ᾱ_t) taken from a float32 ᾱ_t ≈ 1 (a right formula too) is good to ~1e-4 near t = 0
    torch.testing.assert_close(schedule.q_sample(zeros, t, ones), noise.expand(4, 3), rtol=5e-4, atol=0)


@pytest.mark.assignment(2)
def test_hidden_q_posterior_matches_mpmath_values():
    """μ̃_t's two coefficients and β̃_t of the linear schedule equal the mpmath values."""
    schedule = NoiseSchedule(LINEAR)
    t = torch.tensor(list(POSTERIOR))
    expected = torch.tensor(list(POSTERIOR.values()), dtype=torch.float64)  # (4, 3)
    ones, zeros = torch.ones(4, 2), torch.zeros(4, 2)
    coef_x0, var = schedule.q_posterior(ones, zeros, t)
    coef_xt, _ = schedule.q_posterior(zeros, ones, t)
    # rtol 1e-3: near t = 0, 1 − ᾱ_{t−1} in float32 (ᾱ ≈ 1) is good to ~6e-4 only, and formulas may use it
    torch.testing.assert_close(coef_x0[:, 0].double(), expected[:, 0], rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(coef_xt[:, 0].double(), expected[:, 1], rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(var.flatten().double(), expected[:, 2], rtol=1e-3, atol=0)


@pytest.mark.assignment(2)
def test_hidden_ddpm_step_is_algorithm_2_line_4():
    """x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + √β̃_t·z, the closed form recomputed in float64."""
    schedule = NoiseSchedule(LINEAR)
    betas = LINEAR
    alphas = 1 - betas
    alpha_bars = torch.cumprod(alphas, 0)
    alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 10, 400, 999])
    x_t, eps, z = (torch.randn(5, 2, generator=g) for _ in range(3))
    sigma = ((1 - alpha_bars_prev[t]) / (1 - alpha_bars[t]) * betas[t]).sqrt()[:, None]
    eps_coef = (betas[t] / (1 - alpha_bars[t]).sqrt())[:, None]
    expected = (x_t.double() - eps_coef * eps.double()) / alphas[t].sqrt()[:, None] + sigma * z.double()
    torch.testing.assert_close(schedule.ddpm_step(x_t, t, eps, noise=z).double(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.assignment(3)
def test_hidden_ddim_sigma_matches_mpmath_values():
    """σ² on strided steps and several η: x_prev(noise=1) − x_prev(noise=0) = σ, as python ints and as tensors."""
    schedule = NoiseSchedule(LINEAR)
    x_t, eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).unbind(0)
    x_t, eps = x_t[None], eps[None]
    for (t, t_prev, eta), sigma2 in DDIM_SIGMA2.items():
        for tt, tp in ((t, t_prev), (torch.tensor([t]), torch.tensor([t_prev]))):
            with_noise = schedule.ddim_step(x_t, tt, tp, eps, eta=eta, noise=torch.ones_like(x_t))
            without = schedule.ddim_step(x_t, tt, tp, eps, eta=eta, noise=torch.zeros_like(x_t))
            sigma = (with_noise - without).double()
            torch.testing.assert_close(sigma, torch.full_like(sigma, math.sqrt(sigma2)), rtol=1e-3, atol=1e-6)


@pytest.mark.assignment(3)
def test_hidden_guidance_closed_forms():
    """CFG Eq. 6: ε_u + s·(ε_c − ε_u); Guided Eq. 14: ε − s·√(1−ᾱ_t)·∇log p(y|x_t); and CFG with s = 1 + w is
    (1 + w)·ε_c − w·ε_u."""
    schedule = NoiseSchedule(LINEAR)
    g = torch.Generator().manual_seed(5)
    eps_c, eps_u, grad = (torch.randn(3, 2, generator=g) for _ in range(3))
    for s in (0.0, 0.5, 1.0, 3.0, 7.5):
        torch.testing.assert_close(classifier_free_guidance(eps_c, eps_u, s), eps_u + s * (eps_c - eps_u),
                                   rtol=1e-5, atol=1e-5)
        w = s - 1
        torch.testing.assert_close(classifier_free_guidance(eps_c, eps_u, s), (1 + w) * eps_c - w * eps_u,
                                   rtol=1e-5, atol=1e-5)
    t = torch.tensor([5, 300, 990])
    alpha_bars = torch.cumprod(1 - LINEAR, 0)
    expected = eps_u.double() - 2.5 * (1 - alpha_bars[t]).sqrt()[:, None] * grad.double()
    torch.testing.assert_close(classifier_guidance(schedule, eps_u, t, grad, 2.5).double(), expected, rtol=1e-5,
                               atol=1e-6)


class ClosedFormSchedule(NoiseSchedule):
    """q_sample, ddpm_step and ddim_step as the papers' closed forms, written out here, so that the samplers
    (assignment 8) are graded on their own."""

    def _alpha_bar(self, t, x):
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
        out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps  # DDIM Eq. 12
        if eta != 0:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype) if noise is None else noise
            out = out + sigma * noise
        return out

    def ddpm_step(self, x_t, t, eps, noise=None, generator=None):
        return self.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=noise, generator=generator)  # DDIM, η = 1: DDPM


def gaussian_oracle(schedule, mu, sigma):
    """Exact ε for data N(mu, sigma²): E[ε | x_t] = √(1−ᾱ)·(x_t − √ᾱ·mu)/(ᾱ·sigma² + 1 − ᾱ)."""
    mu, sigma = torch.as_tensor(mu, dtype=torch.float32), torch.as_tensor(sigma, dtype=torch.float32)

    def model(x_t, t, context):
        alpha_bar = schedule.alpha_bars[t].reshape(-1, *([1] * (x_t.ndim - 1)))
        return (1 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * mu) / (alpha_bar * sigma**2 + 1 - alpha_bar)

    return model


@pytest.mark.assignment(8)
def test_hidden_samplers_recover_a_gaussian_toy():
    """With the exact ε for data N(1.5, 0.5²), DDPM (1000 steps) and DDIM (50 steps, η = 0 and 0.5) give 4000
    samples with mean ≈ 1.5 and std ≈ 0.5."""
    schedule = ClosedFormSchedule(LINEAR)
    eps_fn = make_guided_eps(gaussian_oracle(schedule, 1.5, 0.5), schedule)
    for sample, kwargs in ((ddpm_sample, {}), (ddim_sample, {"steps": 50}), (ddim_sample, {"steps": 50, "eta": 0.5})):
        x0 = sample(eps_fn, schedule, (4000, 1), generator=torch.Generator().manual_seed(12), **kwargs)
        assert abs(x0.mean().item() - 1.5) < 0.05 and abs(x0.std().item() - 0.5) < 0.05, (sample, kwargs)


@pytest.mark.assignment(8)
def test_hidden_diffusion_loss_of_an_oracle_and_a_zero_model():
    """DDPM Eq. 14 with the closed-form forward process: ~0 for a model that knows ε (one data point), ≈ 1 for
    a zero model, and the v target likewise."""
    from tinyldm.diffusion import diffusion_loss

    schedule = ClosedFormSchedule(LINEAR)
    g = torch.Generator().manual_seed(16)
    x0_star = torch.randn(1, 2, 4, 4, generator=g)
    x0 = x0_star.expand(64, 2, 4, 4)

    def oracle_eps(x_t, t, context):
        return schedule.predict_eps(x_t, t, x0_star.expand_as(x_t))

    def oracle_v(x_t, t, context):
        return schedule.v_from_eps_x0(x0_star.expand_as(x_t), oracle_eps(x_t, t, context), t)

    assert diffusion_loss(oracle_eps, schedule, x0, None, generator=g) < 1e-6
    assert diffusion_loss(oracle_v, schedule, x0, None, prediction="v", generator=g) < 1e-6
    assert 0.8 < diffusion_loss(lambda x_t, t, c: torch.zeros_like(x_t), schedule, x0, None, generator=g) < 1.2


def test_hidden_values_are_the_ones_stored():
    """The stored values describe the linear schedule (a check of the data, not of a student: unmarked)."""
    alpha_bars = torch.cumprod(1 - LINEAR, 0)
    for t, (signal, noise) in SQRT_ALPHA_BARS.items():
        assert math.isclose(alpha_bars[t].sqrt().item(), signal, rel_tol=1e-12)
        assert math.isclose((1 - alpha_bars[t]).sqrt().item(), noise, rel_tol=1e-9)
