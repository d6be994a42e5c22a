"""The diffusion process: its config, noise schedules, the forward process, DDPM and DDIM steps and
samplers, guidance, and the training objective.

Papers, and the tags the comments use for them
  DDPM            Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
  Improved DDPM   Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
  DDIM            Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"
                  (DDIM writes α for what DDPM calls ᾱ; we always write ᾱ)
  Guided          Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"
  CFG             Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"
  v-pred          Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  SDEdit          Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations"

Timestep convention (stated once, used everywhere)
  Code uses integer t in {0, …, T−1}; code t means paper step t+1. The comments write the papers'
  formulas with this shift applied: β_t is betas[t], ᾱ_t is alpha_bars[t], ᾱ_{t−1} is
  alpha_bars_prev[t], and ᾱ_{−1} := 1 (no noise at all: "x_{−1}" is the data x0).
  Code t = T−1 is the noisiest step (paper T); code t = 0 is the last denoising step (paper 1).

Glossary (code name: symbol: meaning, with the equation that defines it)
  T                          T         number of diffusion steps
  betas                      β_t       variance added at step t; q(x_t|x_{t−1}) = N(√(1−β_t)·x_{t−1}, β_t·I)  DDPM Eq. 2
  alphas                     α_t       1 − β_t
  alpha_bars                 ᾱ_t       ∏_{s≤t} α_s, so that q(x_t|x0) = N(√ᾱ_t·x0, (1−ᾱ_t)·I)            DDPM Eq. 4
  alpha_bars_prev            ᾱ_{t−1}   ᾱ shifted by one step, ᾱ_{−1} = 1
  sqrt_alpha_bars            √ᾱ_t      how much signal x_t keeps
  sqrt_one_minus_alpha_bars  √(1−ᾱ_t)  how much noise x_t holds
  (q_posterior's result)     μ̃_t, β̃_t  mean and variance of the posterior q(x_{t−1}|x_t, x0)             DDPM Eqs. 6–7
  x0, x_t, eps               x0, x_t, ε   data, noisy data, noise ε ~ N(0, I); x̂0, ε̂ are predictions of them
  v                          v         √ᾱ_t·ε − √(1−ᾱ_t)·x0, the "velocity" target        v-pred Sec. 4 and App. D
  score                      ∇log p    ∇_{x_t} log p(x_t) = −ε/√(1−ᾱ_t)                                Guided Eq. 11
  snr                        SNR(t)    ᾱ_t/(1−ᾱ_t)
  context, uncond_context    c, c_u    conditioning of the prompt and of the empty prompt (opaque to this file)
  guidance_scale             s         CFG scale; s = 1 + w in the notation of                           CFG Eq. 6
  classifier_scale           γ         classifier-guidance scale (Guided writes s)                Guided Algorithm 2
  eta                        η         DDIM noise level: 0 deterministic, 1 DDPM's variance               DDIM Eq. 16
  eps_fn                     ε̃(x_t, t) the ε a sampler steps with: the model's, with guidance (make_guided_eps)
"""

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v")


@dataclass
class DiffusionConfig:
    schedule: str = "scaled_linear"  # beta schedule kind: "linear", "scaled_linear" or "cosine"
    T: int = 1000                    # diffusion steps
    beta_start: float = 0.00085      # β at t = 0 (Stable Diffusion's values for scaled_linear)
    beta_end: float = 0.012          # β at t = T-1
    prediction: str = "eps"          # what the U-Net predicts: "eps" (DDPM) or "v" (Salimans & Ho)
    p_uncond: float = 0.1            # caption dropout: share of training captions replaced by ""
    p_noisy_t: float = 0.0           # share of training t drawn from the noisy end instead of U{0..T-1}
    noisy_t_from: float = 0.6        # the noisy end: t in [noisy_t_from·T, T) (see training_timesteps)

    def __post_init__(self):
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if not 0 <= self.p_noisy_t <= 1 or not 0 <= self.noisy_t_from < 1:
            raise ValueError(f"need 0 <= p_noisy_t <= 1 and 0 <= noisy_t_from < 1, "
                             f"got {self.p_noisy_t} and {self.noisy_t_from}")


def make_beta_schedule(kind, T=1000, beta_start=1e-4, beta_end=2e-2):
    """β_0 … β_{T−1} as a float64 tensor (T,); float64 so that ᾱ = ∏(1−β) is accurate.

    "linear"         DDPM Sec. 4: β rises linearly from beta_start to beta_end.
    "scaled_linear"  linear in √β (what CompVis calls "linear" and Stable Diffusion uses).
    "cosine"         Improved DDPM Eq. 17 with s = 0.008, β clipped at 0.999; ignores beta_start/end.
                     Mind the step convention: code t is paper step t+1, so the ᾱ that β_0 … β_t
                     give at code t is the paper's ᾱ(t+1) = f(t+1)/f(0), and the last code step
                     T−1 reaches the paper's f(T).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown beta schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    if not isinstance(T, Integral) or T < 1:
        raise ValueError(f"T must be a positive integer; got {T!r}")
    if kind in ("linear", "scaled_linear") and not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}")
    # BEGIN ASSIGNMENT 1: the three schedules, each a float64 tensor (T,)
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        frac = torch.arange(T + 1, dtype=torch.float64) / T  # paper t/T for paper t = 0 … T
        f = torch.cos((frac + s) / (1 + s) * math.pi / 2) ** 2  # Improved DDPM Eq. 17: f(t) = cos²((t/T+s)/(1+s)·π/2)
        alpha_bar = f / f[0]  # Improved DDPM Eq. 17: ᾱ(t) = f(t)/f(0)   (T+1,)
        betas = 1 - alpha_bar[1:] / alpha_bar[:-1]  # Improved DDPM Sec. 3.2: β_t = 1 − ᾱ_t/ᾱ_{t−1}   (T,)
        return betas.clamp(max=0.999)  # Improved DDPM Sec. 3.2: clip to avoid the singularity near t = T
    # END ASSIGNMENT 1


def _check_same_shape(**tensors):
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of the same shape; got {shapes}")


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


class NoiseSchedule(nn.Module):
    """Every per-timestep constant of the diffusion process, and the one-step maths that uses them.

    Buffers are computed in float64 from `betas` (T,) and stored as float32; they are
    non-persistent (a function of the betas, so not part of a state dict). Every method works for
    x of any shape (B, ...): images (B, C, H, W) or toy points (B, 2). `t` is a LongTensor (B,)
    or a python int meaning the same step for the whole batch.
    """

    def __init__(self, betas):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must be a non-empty 1-D tensor with values in (0, 1); got shape "
                             f"{tuple(betas.shape)}, range [{betas.min().item() if betas.numel() else None}, "
                             f"{betas.max().item() if betas.numel() else None}]")
        alphas = 1 - betas  # α_t = 1 − β_t
        alpha_bars = torch.cumprod(alphas, dim=0)  # ᾱ_t = ∏_{s≤t} α_s
        alpha_bars_prev = torch.cat([alpha_bars.new_ones(1), alpha_bars[:-1]])  # ᾱ_{t−1}, with ᾱ_{−1} = 1
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bars": alpha_bars,
            "alpha_bars_prev": alpha_bars_prev,
            "sqrt_alpha_bars": alpha_bars.sqrt(),  # √ᾱ_t
            "sqrt_one_minus_alpha_bars": (1 - alpha_bars).sqrt(),  # √(1−ᾱ_t)
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def T(self):
        """Number of diffusion steps."""
        return self.betas.shape[0]

    def extra_repr(self):
        return f"T={self.T}"

    def _check_step(self, t):
        if not 0 <= t < self.T:
            raise ValueError(f"timestep must be an integer in 0..{self.T - 1}; got {t}")

    def _timesteps(self, t, B):
        """t as a LongTensor (B,) on the buffers' device; a python int is repeated B times."""
        if isinstance(t, Integral):
            self._check_step(t)
            return torch.full((B,), int(t), dtype=torch.long, device=self.betas.device)
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"t must be a python int or an integer tensor of shape ({B},); got {t!r}")
        if t.ndim == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape ({B},) to match the batch; got {tuple(t.shape)}")
        return t.to(device=self.betas.device, dtype=torch.long)

    def _gather(self, values, t, x):
        """values[t] shaped to broadcast against x (B, ...): (B, 1, ..., 1), or (1, ..., 1) for an int t."""
        if isinstance(t, Integral):  # one step for the whole batch (as in the samplers)
            self._check_step(t)
            return values[t].reshape([1] * x.ndim)  # (1, ..., 1)
        B = x.shape[0]
        return values[self._timesteps(t, B)].reshape(B, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)

    # --- forward process and its inversions -------------------------------------------------

    def q_sample(self, x0, t, eps):
        """Jump from the data to step t in one go: a sample of q(x_t | x0) (DDPM Eq. 4, reparametrised).

        x0 and eps (ε ~ N(0, I)) of one shape (B, ...); t a LongTensor (B,) or a python int. Returns x_t,
        shaped as x0.
        """
        _check_same_shape(x0=x0, eps=eps)
        # BEGIN ASSIGNMENT 1: DDPM Eq. 4 (self._gather(values, t, x) gives values[t], shaped to broadcast)
        # DDPM Eq. 4, reparametrised: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
        return (self._gather(self.sqrt_alpha_bars, t, x0) * x0
                + self._gather(self.sqrt_one_minus_alpha_bars, t, x0) * eps)
        # END ASSIGNMENT 1

    def predict_x0(self, x_t, t, eps):
        """The clean data implied by x_t and a noise (prediction) ε."""
        # DDPM Eq. 15: x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t
        sqrt_one_minus_alpha_bar = self._gather(self.sqrt_one_minus_alpha_bars, t, x_t)
        return (x_t - sqrt_one_minus_alpha_bar * eps) / self._gather(self.sqrt_alpha_bars, t, x_t)

    def predict_eps(self, x_t, t, x0):
        """The noise implied by x_t and a clean data (prediction) x0."""
        # DDPM Eq. 4 solved for ε: ε = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t)
        sqrt_alpha_bar = self._gather(self.sqrt_alpha_bars, t, x_t)
        return (x_t - sqrt_alpha_bar * x0) / self._gather(self.sqrt_one_minus_alpha_bars, t, x_t)

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of the posterior q(x_{t−1} | x_t, x0) = N(μ̃_t, β̃_t·I) (DDPM Eqs. 6–7).

        x0 and x_t of one shape (B, ...); t a LongTensor (B,) or a python int. Returns (mean, variance): the
        mean has the shape of x_t; the variance is (B, 1, ..., 1), or (1, ..., 1) for an int t, and is exactly
        0 at t = 0 (ᾱ_{−1} = 1). Both are computed here from the schedule's buffers (betas, alphas,
        alpha_bars_prev, sqrt_one_minus_alpha_bars, ...), read at t with self._gather.
        """
        _check_same_shape(x0=x0, x_t=x_t)
        # BEGIN ASSIGNMENT 2: DDPM Eqs. 6–7, from the buffers (self._gather(values, t, x) gives values[t], shaped to broadcast)
        # 1. the schedule's terms at step t, each (B, 1, ..., 1)
        beta = self._gather(self.betas, t, x_t)  # β_t
        alpha = self._gather(self.alphas, t, x_t)  # α_t = 1 − β_t
        # 1 − ᾱ_t from √(1−ᾱ_t), made in float64: 1 − ᾱ_t in float32 loses digits near t = 0, where ᾱ_t ≈ 1
        one_minus_alpha_bar = self._gather(self.sqrt_one_minus_alpha_bars, t, x_t) ** 2  # 1 − ᾱ_t
        alpha_bar_prev = self._gather(self.alpha_bars_prev, t, x_t)  # ᾱ_{t−1}, with ᾱ_{−1} = 1
        # 2. the mean, a weighted sum of x0 and x_t
        # DDPM Eq. 7: μ̃_t = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t
        mean = (alpha_bar_prev.sqrt() * beta / one_minus_alpha_bar * x0
                + alpha.sqrt() * (1 - alpha_bar_prev) / one_minus_alpha_bar * x_t)
        # 3. the variance, which does not depend on x0 or x_t; exactly 0 at t = 0, where ᾱ_{t−1} = 1
        variance = (1 - alpha_bar_prev) / one_minus_alpha_bar * beta  # DDPM Eq. 7: β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t
        return mean, variance
        # END ASSIGNMENT 2

    # --- one reverse step -------------------------------------------------------------------

    def ddpm_step(self, x_t, t, eps, noise=None, generator=None):
        """One ancestral step x_t → x_{t−1}, a sample of the posterior q(x_{t−1} | x_t, x̂0) with x̂0 the data
        that ε implies (DDPM Algorithm 2, line 4, with σ_t² = β̃_t); no noise where t == 0.

        x_t and eps of one shape (B, ...); t a LongTensor (B,) or a python int. `noise` (z, shape of x_t)
        replaces the draw from `generator`. Returns x_{t−1}, shaped as x_t.
        """
        # BEGIN ASSIGNMENT 2: DDPM Algorithm 2, line 4, through x̂0 (self.predict_x0) and self.q_posterior
        # 1. the clean data the noise prediction implies
        x0 = self.predict_x0(x_t, t, eps)  # DDPM Eq. 15: x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t
        # 2. the posterior q(x_{t−1} | x_t, x̂0) = N(μ̃_t, β̃_t·I)
        mean, variance = self.q_posterior(x0, x_t, t)  # DDPM Eqs. 6–7
        # 3. a sample of it. No noise at t = 0 ("z = 0 if t = 1" in paper steps): there
        #    σ_0² = β̃_0 = (1−ᾱ_{−1})/(1−ᾱ_0)·β_0 = 0 exactly, because ᾱ_{−1} = 1
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)  # z ~ N(0, I)
        _check_same_shape(x_t=x_t, noise=noise)
        return mean + variance.sqrt() * noise  # DDPM Alg. 2 line 4: x_{t−1} = μ̃_t + σ_t·z, σ_t² = β̃_t
        # END ASSIGNMENT 2

    def ddim_step(self, x_t, t, t_prev, eps, eta=0.0, noise=None, generator=None):
        """One DDIM step x_t → x_{t_prev} for any t_prev < t (DDIM Eqs. 12 and 16); t_prev = −1 means
        ᾱ_prev = 1 (the data).

        t and t_prev: both python ints (as ddim_sample calls it) or both LongTensors (B,). x_t and eps of one
        shape (B, ...). eta = 0 is deterministic (`noise` is ignored and nothing is drawn); eta = 1 with
        t_prev = t − 1 has DDPM's posterior variance β̃_t. `noise` (z, shape of x_t) replaces the draw from
        `generator`. Returns x_{t_prev}, shaped as x_t.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0; got {eta}")
        if isinstance(t, Integral) and isinstance(t_prev, Integral) and not t_prev < t:
            raise ValueError(f"DDIM steps backwards: need t_prev < t; got t={t}, t_prev={t_prev}")
        # BEGIN ASSIGNMENT 3: DDIM Eqs. 12 and 16
        # 1. ᾱ at both ends of the step; ᾱ_{t_prev} is alpha_bars_prev[t_prev + 1], which also covers
        #    t_prev = −1, where ᾱ_{−1} = 1
        alpha_bar = self._gather(self.alpha_bars, t, x_t)  # ᾱ_t   (B, 1, ..., 1)
        alpha_bar_prev = self._gather(self.alpha_bars_prev, t_prev + 1, x_t)  # ᾱ_{t_prev}   (B, 1, ..., 1)
        # 2. the "predicted x0" of DDIM Eq. 12
        x0 = self.predict_x0(x_t, t, eps)  # DDPM Eq. 15: x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t
        # 3. the step's noise level, σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()  # DDIM Eq. 16
        # 4. x̂0 taken to the noise level of t_prev along the same ε: √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε
        x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps  # DDIM Eq. 12
        # 5. fresh noise σ·z, only when η > 0
        if eta != 0:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)  # z ~ N(0, I)
            _check_same_shape(x_t=x_t, noise=noise)
            x_prev = x_prev + sigma * noise  # DDIM Eq. 12: + σ·z
        return x_prev
        # END ASSIGNMENT 3

    # --- other parametrisations: SNR, v and the score ---------------------------------------

    def snr(self, t):
        """Signal-to-noise ratio ᾱ_t/(1−ᾱ_t); same shape as t (int → 0-dim tensor)."""
        t = torch.as_tensor(t, device=self.betas.device)
        # SNR(t) = ᾱ_t/(1−ᾱ_t), from √(1−ᾱ_t) made in float64 (1−ᾱ_t in float32 loses digits near t = 0)
        return (self.sqrt_alpha_bars[t] / self.sqrt_one_minus_alpha_bars[t]) ** 2

    def v_from_eps_x0(self, x0, eps, t):
        """The v-prediction target."""
        # v-pred: v = √ᾱ_t·ε − √(1−ᾱ_t)·x0
        return (self._gather(self.sqrt_alpha_bars, t, x0) * eps
                - self._gather(self.sqrt_one_minus_alpha_bars, t, x0) * x0)

    def eps_from_v(self, x_t, t, v):
        """The noise ε implied by x_t and a v (prediction)."""
        # v-pred: ε = √(1−ᾱ_t)·x_t + √ᾱ_t·v
        return (self._gather(self.sqrt_one_minus_alpha_bars, t, x_t) * x_t
                + self._gather(self.sqrt_alpha_bars, t, x_t) * v)

    def score_from_eps(self, eps, t):
        """The score ∇_{x_t} log p(x_t) that a noise prediction ε stands for."""
        # Guided Eq. 11: ∇_{x_t} log p(x_t) = −ε/√(1−ᾱ_t)
        return -eps / self._gather(self.sqrt_one_minus_alpha_bars, t, eps)

    def eps_from_score(self, score, t):
        """The noise ε that a score ∇_{x_t} log p(x_t) stands for."""
        # Guided Eq. 11, inverted: ε = −√(1−ᾱ_t)·∇_{x_t} log p(x_t)
        return -self._gather(self.sqrt_one_minus_alpha_bars, t, score) * score


# --- guidance ---------------------------------------------------------------------------------


def classifier_free_guidance(eps_cond, eps_uncond, scale):
    """Classifier-free guidance (CFG Eq. 6, with scale s = 1 + w): the guided noise prediction ε̃.

    eps_cond (ε_c) and eps_uncond (ε_u) of one shape; returns ε̃ of that shape. s = 1 gives ε_c, s = 0
    gives ε_u, s > 1 extrapolates past ε_c, away from ε_u. Bayes: ∇log p(x|c) − ∇log p(x) is the implicit
    classifier's gradient ∇log p(c|x), and CFG pushes ε along it, s times (notebook 01, Eqs. 8–12).
    """
    _check_same_shape(eps_cond=eps_cond, eps_uncond=eps_uncond)
    # BEGIN ASSIGNMENT 3: CFG Eq. 6
    return eps_uncond + scale * (eps_cond - eps_uncond)  # CFG Eq. 6: ε̃ = ε_u + s·(ε_c − ε_u)
    # END ASSIGNMENT 3


def classifier_guidance(schedule, eps, t, grad_log_p, scale):
    """Classifier guidance (Guided Eq. 14, Algorithm 2) with scale γ: the guided noise prediction ε̂.

    eps (ε) and grad_log_p (∇_{x_t} log p(y|x_t)) of one shape; t as in NoiseSchedule; returns ε̂ of that
    shape, exactly ε at γ = 0. Bayes: ∇log p(x_t|y) = ∇log p(x_t) + ∇log p(y|x_t). Guidance multiplies the
    classifier's term by γ, which gives ∇log p(x_t) + γ·∇log p(y|x_t), the score of the tilted density
    p(x_t)·p(y|x_t)^γ: the conditional score ∇log p(x_t|y) only at γ = 1 (notebook 01, Eqs. 4–7). The
    classifier's gradient is a score, so it is turned into ε units with ε = −√(1−ᾱ_t)·score (Guided Eq. 11).
    """
    _check_same_shape(eps=eps, grad_log_p=grad_log_p)
    # BEGIN ASSIGNMENT 3: Guided Eq. 14 (schedule.eps_from_score turns a score into ε units)
    # Guided Eq. 14: ε̂ = ε − γ·√(1−ᾱ_t)·∇_{x_t} log p(y|x_t)
    return eps + scale * schedule.eps_from_score(grad_log_p, t)
    # END ASSIGNMENT 3


def scale_is(scale, value):
    """True when a guidance scale, a number or a tensor of per-sample scales, equals `value` everywhere."""
    return bool((torch.as_tensor(scale) == value).all())


def scale_per_sample(scale, x):
    """A guidance scale as given (a number), or a tensor of per-sample scales (B,) shaped (B, 1, ..., 1) to
    broadcast against x (B, ...): one sampler call then sweeps the scale across its batch."""
    if not torch.is_tensor(scale):
        return scale
    if scale.ndim == 0:
        return scale.to(device=x.device, dtype=x.dtype)
    if tuple(scale.shape) != (x.shape[0],):
        raise ValueError(f"a tensor of guidance scales must have shape ({x.shape[0]},), one per sample; "
                         f"got {tuple(scale.shape)}")
    return scale.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)


def make_guided_eps(model, schedule, context=None, uncond_context=None, guidance_scale=1.0,
                    classifier_grad=None, classifier_scale=0.0, prediction="eps"):
    """The ε the samplers step with, as one function eps_fn(x_t, t) of the state and the (python int) step.

    model(x_t, t, context) -> ε (or v if prediction == "v"), t a LongTensor (B,); `context` and
    `uncond_context` (c and c_u) are passed through untouched. CFG runs when uncond_context is given and
    guidance_scale s != 1; classifier guidance when classifier_grad(x_t, t) -> ∇_{x_t} log p(y|x_t) is given
    and classifier_scale γ != 0 (it runs with grad enabled, inside the samplers' no_grad). Either scale may
    be a number or a tensor (B,) of one scale per sample (scale_per_sample).
    """
    _check_prediction(prediction)

    def model_eps(x_t, t, t_batch, c):
        out = model(x_t, t_batch, c)
        return schedule.eps_from_v(x_t, t, out) if prediction == "v" else out  # v-pred: ε from v

    def eps_fn(x_t, t):
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)  # the model takes t as (B,)
        # 1. the model's noise prediction for the prompt, ε(x_t, c)
        eps = model_eps(x_t, t, t_batch, context)
        # 2. classifier-free guidance with the empty prompt's ε(x_t, c_u): ε̃ = ε_u + s·(ε_c − ε_u)
        if uncond_context is not None and not scale_is(guidance_scale, 1):
            eps_uncond = model_eps(x_t, t, t_batch, uncond_context)
            eps = classifier_free_guidance(eps, eps_uncond, scale_per_sample(guidance_scale, eps))  # CFG Eq. 6
        # 3. classifier guidance with the classifier's ∇_{x_t} log p(y|x_t): ε̂ = ε̃ − γ·√(1−ᾱ_t)·∇
        if classifier_grad is not None and not scale_is(classifier_scale, 0):
            with torch.enable_grad():
                grad_log_p = classifier_grad(x_t.detach(), t_batch)  # ∇_{x_t} log p(y|x_t)
            eps = classifier_guidance(schedule, eps, t, grad_log_p.detach(),
                                      scale_per_sample(classifier_scale, eps))  # Guided Eq. 14
        return eps

    return eps_fn


# --- samplers ---------------------------------------------------------------------------------


def ddim_timesteps(T, steps):
    """`steps` integers evenly spaced from T−1 down to 0, both ends included (rounded half up).

    Starting at T−1 makes the first step see the noise level x_T ~ N(0, I) was drawn for; ending
    at 0 makes the last step go to ᾱ = 1, i.e. return x̂0. E.g. T=1000, steps=5: [999, 749, 500, 250, 0].
    """
    if not isinstance(steps, Integral) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..T={T}; got {steps!r}")
    if steps == 1:
        return [T - 1]
    return [((T - 1) * (steps - 1 - i) * 2 + (steps - 1)) // (2 * (steps - 1)) for i in range(steps)]


def sdedit_timesteps(T, steps, strength):
    """The DDIM steps an image-to-image edit of strength s ∈ (0, 1] runs (SDEdit Sec. 3, on DDIM's sub-sequence).

    t0 = round(s·T) − 1 (rounded half up, and at least 0: code step t0 is the paper's s·T), then every τ of
    ddim_timesteps(T, steps) with τ ≤ t0, in the same descending order. The edit starts at the first of them,
    so the strength is quantised to the DDIM grid (as diffusers does) and s = 1 runs all of them.
    E.g. T=1000, steps=5 gives [999, 749, 500, 250, 0]; s = 0.6: t0 = 599, the edit runs [500, 250, 0].
    """
    if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (1 = start from pure noise), got {strength!r}")
    t0 = max(math.floor(strength * T + 0.5), 1) - 1  # SDEdit: t0 = s·T in paper steps, code step t0 − 1
    timesteps = [t for t in ddim_timesteps(T, steps) if t <= t0]
    if not timesteps:
        raise ValueError(f"strength {strength} with {steps} DDIM step(s) runs no step: the DDIM timesteps "
                         f"{ddim_timesteps(T, steps)} all lie above t0 = {t0}; take more steps or a larger strength")
    return timesteps


def _initial_noise(schedule, shape, generator, x_T):
    """x_T ~ N(0, I) on the schedule's device and dtype, unless the caller gives x_T."""
    if x_T is None:
        betas = schedule.betas
        return torch.randn(tuple(shape), generator=generator, device=betas.device, dtype=betas.dtype)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {tuple(shape)}")
    return x_T


def _progress(timesteps, enabled):
    if not enabled:
        return timesteps
    from tqdm.auto import tqdm  # imported only when asked for, so the library needs only torch

    return tqdm(timesteps)


@torch.no_grad()
def ddpm_sample(eps_fn, schedule, shape, generator=None, x_T=None, progress=False, callback=None):
    """Ancestral sampling (DDPM Algorithm 2): x_T ~ N(0, I), then ddpm_step for t = T−1 … 0. Returns x0.

    eps_fn(x_t, t) -> ε, t a python int: the model's prediction with its guidance (make_guided_eps).
    x_T: the starting noise instead of a draw from `generator`. callback(i, t, x_t, x0_pred) sees each
    step's input x_t and its x̂0.
    """
    x_t = _initial_noise(schedule, shape, generator, x_T)  # DDPM Alg. 2 line 1: x_T ~ N(0, I)
    # BEGIN ASSIGNMENT 8: DDPM Algorithm 2 with eps_fn for ε, and the callback before each step
    for i, t in enumerate(_progress(range(schedule.T - 1, -1, -1), progress)):  # DDPM Alg. 2 line 2
        # 1. the noise prediction at step t, guidance included
        eps = eps_fn(x_t, t)
        # 2. show the caller x_t and the x̂0 it implies
        if callback is not None:
            callback(i, t, x_t, schedule.predict_x0(x_t, t, eps))  # DDPM Eq. 15
        # 3. one ancestral step x_t → x_{t−1}
        x_t = schedule.ddpm_step(x_t, t, eps, generator=generator)  # DDPM Alg. 2 lines 3–4
    return x_t
    # END ASSIGNMENT 8


@torch.no_grad()
def ddim_sample(eps_fn, schedule, shape, steps=50, eta=0.0, generator=None, x_T=None, progress=False,
                callback=None):
    """DDIM sampling: x_T ~ N(0, I), then ddim_step along ddim_timesteps(T, steps). Returns x0.

    Arguments as in ddpm_sample; eta = 0 is deterministic given x_T, and steps = T with eta = 1
    is DDPM's ancestral sampler.
    """
    timesteps = ddim_timesteps(schedule.T, steps)  # the sub-sequence τ of DDIM Sec. 4.2, T−1 … 0
    x_t = _initial_noise(schedule, shape, generator, x_T)  # x_T ~ N(0, I)
    # BEGIN ASSIGNMENT 8: DDIM along `timesteps`, t_prev = −1 after the last
    for i, t in enumerate(_progress(timesteps, progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1  # −1: the last step lands on the data
        # 1. the noise prediction at step t, guidance included
        eps = eps_fn(x_t, t)
        # 2. show the caller x_t and the x̂0 it implies
        if callback is not None:
            callback(i, t, x_t, schedule.predict_x0(x_t, t, eps))  # DDPM Eq. 15
        # 3. one DDIM step x_t → x_{t_prev}
        x_t = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, generator=generator)  # DDIM Eq. 12
    return x_t
    # END ASSIGNMENT 8


# --- training objective -----------------------------------------------------------------------


def training_timesteps(T, B, p_noisy=0.0, noisy_from=0.6, generator=None, device=None):
    """The training batch's t, (B,) long: t ~ U{0, …, T−1} (DDPM Algorithm 1), except that each row,
    with probability p_noisy, draws instead from the noisy end U{⌊noisy_from·T⌋, …, T−1}.

    Where an object goes is decided in the first, noisiest sampling steps: lower down, x_t already shows
    it. So only there does the loss reward reading the position from the caption, and with t uniform a
    small U-Net does not learn it (README, "Results"). Drawing more of the batch there is a sampling
    density over t, like SD3's logit-normal (Esser et al. 2024, Sec. 3.1). With p_noisy = 0 the draws are
    exactly DDPM's, from the same generator state.
    """
    if not 0 <= p_noisy <= 1 or not 0 <= noisy_from < 1:
        raise ValueError(f"need 0 <= p_noisy <= 1 and 0 <= noisy_from < 1; got {p_noisy}, {noisy_from}")
    t = torch.randint(0, T, (B,), generator=generator, device=device)  # t ~ U{0, …, T−1}
    if p_noisy > 0:
        noisy = torch.rand(B, generator=generator, device=device) < p_noisy  # which rows draw from the noisy end
        t_noisy = torch.randint(int(noisy_from * T), T, (B,), generator=generator, device=device)
        t = torch.where(noisy, t_noisy, t)  # (B,)
    return t


def draw_t_and_eps(schedule, x0, generator=None, t=None, eps=None):
    """(t (B,) LongTensor, ε shaped as x0) for a training batch x0 (B, ...): t ~ U{0, …, T−1} and
    ε ~ N(0, I) (DDPM Algorithm 1 lines 3–4), drawn in that order from `generator` unless given.

    The one place where training draws its noise: diffusion_loss and the classifier's loss both call it.
    A given t may be a python int (the whole batch at that step) or a (B,) tensor.
    """
    B = x0.shape[0]
    if t is None:
        t = training_timesteps(schedule.T, B, generator=generator, device=x0.device)  # t ~ U{0, …, T−1}
    t = schedule._timesteps(t, B)  # (B,) LongTensor, also when an int is given
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # ε ~ N(0, I)
    return t, eps


def diffusion_loss(model, schedule, x0, context, prediction="eps", generator=None, t=None, eps=None):
    """The simple objective (DDPM Eq. 14, L_simple): mean over all elements of (target − model(x_t, t, c))².

    t ~ Uniform{0, …, T−1} and ε ~ N(0, I) are drawn (draw_t_and_eps) unless given; target is ε,
    or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 when prediction == "v". Computed in float32.
    """
    _check_prediction(prediction)
    # BEGIN ASSIGNMENT 8: DDPM Eq. 14 (Algorithm 1), or the v target
    # 1. a step and a noise per example
    t, eps = draw_t_and_eps(schedule, x0, generator, t, eps)  # DDPM Alg. 1 lines 3–4
    # 2. noise the data to step t
    x_t = schedule.q_sample(x0, t, eps)  # DDPM Eq. 4: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
    # 3. the target, and the model's prediction of it
    target = eps if prediction == "eps" else schedule.v_from_eps_x0(x0, eps, t)  # ε, or v-pred's v
    out = model(x_t, t, context)
    _check_same_shape(model_output=out, target=target)
    # 4. the squared error, averaged
    return F.mse_loss(out.float(), target.float())  # DDPM Eq. 14: ‖ε − ε_θ(x_t, t)‖²
    # END ASSIGNMENT 8
