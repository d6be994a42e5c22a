"""Mutation check of the assignments' tests: plausible wrong answers must fail, equivalent right ones pass.

A mutant is one student's answer to one marked region (course/assignments.py): new code for the
WHOLE region, so it does not depend on the reference's exact text. It is either

  "wrong"       a real mistake (wrong σ, off-by-one t, missing √, softmax over the wrong axis …):
                at least one test of its assignment must fail, or the tests let that mistake through;
  "equivalent"  a different but mathematically equal answer: every test of its assignment must pass,
                or the tests grade the reference's wording instead of the maths.

`python -m course mutants [--only N ...] [--json]` runs the check and prints a table; the repository's
own suite runs it in tests/test_mutations.py.

How it runs, in one process:
  1. compile the mutant: the enclosing function's source with the region's lines replaced;
  2. swap it in: the original function object gets the new code (`fn.__code__ = ...`), so every
     reference to it sees the mutant (methods, `from tinyldm.diffusion import ...` names in the
     tests, the torch.no_grad wrapper around the samplers);
  3. run the assignment's tests (tests/ and tests/hidden/, `--assignment N`) with pytest.main and
     `-x`: a wrong mutant needs only one failure;
  4. put the original code back.
One pytest start-up for the whole list, instead of one subprocess (~3 s) per mutant; with gc.freeze()
(pytest calls gc.collect() after each run, slow over torch's many objects) a run costs ~0.1 s.

To add a mutant: append wrong(N, "Class.method", "short-name", "the mistake in one line", body) or
equivalent(...) to MUTANTS; the body is the region's whole new code, using only what the region may
read (its function's arguments and locals before the region, `self`'s buffers, the module's names)
and defining or returning what the region does.
"""

import ast
import contextlib
import gc
import importlib
import inspect
import io
import json
import linecache
import os
import random
import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from course.assignments import NUMBERS, ROOT, graded_test_files, project_regions

WRONG, EQUIVALENT = "wrong", "equivalent"


@dataclass(frozen=True)
class Mutant:
    number: int     # the assignment
    function: str   # the region's enclosing function, e.g. "NoiseSchedule.ddim_step"
    name: str       # short and unique, e.g. "ddim-sigma-eta2-beta"
    expect: str     # WRONG: must fail a test of the assignment; EQUIVALENT: must pass them all
    why: str        # one line: the mistake, or why the other form is right
    body: str       # the region's new code, indented as if at column 0


def _m(expect, number, function, name, why, body):
    return Mutant(number, function, name, expect, why, textwrap.dedent(body).strip("\n") + "\n")


def wrong(number, function, name, why, body):
    return _m(WRONG, number, function, name, why, body)


def equivalent(number, function, name, why, body):
    return _m(EQUIVALENT, number, function, name, why, body)


# ----------------------------------------------------------------------------------------------
# The list. Each body reads and defines what its region does (see the region's BEGIN note).

# assignment 1: the three schedules written right, to combine with one wrong branch
LINEAR = """
if kind == "linear":
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
"""
SCALED = """
if kind == "scaled_linear":
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
"""
COSINE = """
if kind == "cosine":
    s = 0.008
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
"""


def schedules(linear=LINEAR, scaled=SCALED, cosine=COSINE):
    return "".join(textwrap.dedent(part).strip("\n") + "\n" for part in (linear, scaled, cosine))


# assignment 2: the gathered terms of the posterior, from the buffers that stay in NoiseSchedule
TERMS = """
beta = self._gather(self.betas, t, x_t)  # β_t
alpha = self._gather(self.alphas, t, x_t)  # α_t
alpha_bar = self._gather(self.alpha_bars, t, x_t)  # ᾱ_t
alpha_bar_prev = self._gather(self.alpha_bars_prev, t, x_t)  # ᾱ_{t−1}
"""


def posterior(mean="(alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * x0\n"
                   "        + alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t)",
              variance="(1 - alpha_bar_prev) / (1 - alpha_bar) * beta", terms=TERMS):
    return textwrap.dedent(terms).strip("\n") + f"\nmean = {mean}\nvariance = {variance}\nreturn mean, variance\n"


DRAW = """
if noise is None:
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
_check_same_shape(x_t=x_t, noise=noise)
"""


def ddpm(last="return mean + variance.sqrt() * noise", x0="self.predict_x0(x_t, t, eps)"):
    return (f"x0 = {x0}\nmean, variance = self.q_posterior(x0, x_t, t)\n"
            + textwrap.dedent(DRAW).strip("\n") + "\n" + last + "\n")


# assignment 3: the DDIM step in parts
PREV = "alpha_bar_prev = self._gather(self.alpha_bars_prev, t_prev + 1, x_t)  # ᾱ_{t_prev}, 1 at t_prev = −1"
SIGMA = "eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()"
STEP = "alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps"


def ddim(prev=PREV, sigma=SIGMA, step=STEP, noise_term="sigma * noise"):
    return (f"alpha_bar = self._gather(self.alpha_bars, t, x_t)\n{textwrap.dedent(prev).strip()}\n"
            f"x0 = self.predict_x0(x_t, t, eps)\nsigma = {sigma}\nx_prev = {step}\n"
            "if eta != 0:\n" + textwrap.indent(textwrap.dedent(DRAW).strip("\n"), "    ")
            + f"\n    x_prev = x_prev + {noise_term}\nreturn x_prev\n")


# assignment 5: the module's head split and merge
SPLIT = """
B, N, C = x.shape
c = x if context is None else context
L = c.shape[1]
d = C // self.heads
q = self.to_q(x).view(B, N, self.heads, d).transpose(1, 2)
k = self.to_k(c).view(B, L, self.heads, d).transpose(1, 2)
v = self.to_v(c).view(B, L, self.heads, d).transpose(1, 2)
"""
MERGE = """
if self.keep_weights:
    self.weights = attention_weights(q, k, mask).detach()
out = attention(q, k, v, mask=mask, fused=self.fused)
out = out.transpose(1, 2).reshape(B, N, C)
return self.to_out(out)
"""


def module_attention(split=SPLIT, merge=MERGE):
    return textwrap.dedent(split).strip("\n") + "\n" + textwrap.dedent(merge).strip("\n") + "\n"


# assignment 7: the text encoder's self-attention, with its logits line and mask line replaceable
def text_attention(logits="(q @ k.transpose(-2, -1)).float() / math.sqrt(d)",
                   masked='logits.masked_fill(~mask[:, None, None, :], float("-inf"))',
                   softmax="logits.softmax(dim=-1)", merge="(weights @ v).transpose(1, 2).reshape(B, L, D)"):
    return ("B, L, D = x.shape\nh, d = self.n_heads, D // self.n_heads\n"
            "q, k, v = self.qkv(x).split(D, dim=-1)\n"
            "q, k, v = (u.view(B, L, h, d).transpose(1, 2) for u in (q, k, v))\n"
            f"logits = {logits}\nlogits = {masked}\nweights = {softmax}.to(v.dtype)\n"
            f"y = {merge}\nreturn self.dropout(self.out(y))\n")


TEMB = """
half = dim // 2
i = torch.arange(half, device=t.device, dtype=torch.float32)
omega = torch.exp(-math.log(max_period) * i / half)
args = t.float()[:, None] * omega[None, :]
emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
if dim % 2 == 1:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
return emb
"""

RESBLOCK = """
h = self.conv1(F.silu(self.norm1(x)))
e = self.time_proj(F.silu(emb))[:, :, None, None]
if self.scale_shift:
    scale, shift = e.chunk(2, dim=1)
    h = self.norm2(h) * (1 + scale) + shift
else:
    h = self.norm2(h + e)
h = self.conv2(self.dropout(F.silu(h)))
return self.skip(x) + h
"""

DDPM_LOOP = """
for i, t in enumerate(_progress(range(schedule.T - 1, -1, -1), progress)):
    eps = eps_fn(x_t, t)
    if callback is not None:
        callback(i, t, x_t, schedule.predict_x0(x_t, t, eps))
    x_t = schedule.ddpm_step(x_t, t, eps, generator=generator)
return x_t
"""

DDIM_LOOP = """
for i, t in enumerate(_progress(timesteps, progress)):
    t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
    eps = eps_fn(x_t, t)
    if callback is not None:
        callback(i, t, x_t, schedule.predict_x0(x_t, t, eps))
    x_t = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, generator=generator)
return x_t
"""


def loss(target='eps if prediction == "eps" else schedule.v_from_eps_x0(x0, eps, t)',
         x_t="schedule.q_sample(x0, t, eps)", out="model(x_t, t, context)",
         value="F.mse_loss(out.float(), target.float())"):
    return ("t, eps = draw_t_and_eps(schedule, x0, generator, t, eps)\n"
            f"x_t = {x_t}\ntarget = {target}\nout = {out}\n"
            f"_check_same_shape(model_output=out, target=target)\nreturn {value}\n")


S, QS, QP, DS, DI = ("make_beta_schedule", "NoiseSchedule.q_sample", "NoiseSchedule.q_posterior",
                     "NoiseSchedule.ddpm_step", "NoiseSchedule.ddim_step")
CFG, CG = "classifier_free_guidance", "classifier_guidance"
SAMPLE, KL, AE = "DiagonalGaussian.sample", "DiagonalGaussian.kl", "autoencoder_loss"
AW, AF, TE, RB = "attention_weights", "Attention.forward", "timestep_embedding", "ResBlock.forward"
SA, BF, TF = "SelfAttention.forward", "Block.forward", "TextEncoder.forward"
DPS, DIS, DL = "ddpm_sample", "ddim_sample", "diffusion_loss"

MUTANTS = (
    # --- 1: β schedules and the forward process ------------------------------------------------
    wrong(1, S, "cosine-no-shift", "cosine ᾱ_t = f(t)/f(0) in code steps (no t+1 shift): ᾱ_0 = 1, β_0 = 0",
          schedules(cosine="""
          if kind == "cosine":
              s = 0.008
              u = torch.arange(T, dtype=torch.float64) / T
              alpha_bar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
              alpha_bar = alpha_bar / alpha_bar[0]
              alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
              return (1 - alpha_bar / alpha_bar_prev).clamp(max=0.999)
          """)),
    wrong(1, S, "cosine-not-clipped", "cosine β not clipped at 0.999: β_{T−1} = 1",
          schedules(cosine="""
          if kind == "cosine":
              s = 0.008
              u = torch.arange(T + 1, dtype=torch.float64) / T
              f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
              alpha_bar = f / f[0]
              return 1 - alpha_bar[1:] / alpha_bar[:-1]
          """)),
    wrong(1, S, "cosine-no-offset", "cosine with s = 0 (the offset forgotten): ᾱ off the closed form",
          schedules(cosine="""
          if kind == "cosine":
              u = torch.arange(T + 1, dtype=torch.float64) / T
              f = torch.cos(u * math.pi / 2) ** 2
              alpha_bar = f / f[0]
              return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
          """)),
    wrong(1, S, "linear-float32", "linear schedule in float32 (ᾱ = ∏(1−β) loses digits)",
          schedules(linear="""
          if kind == "linear":
              return torch.linspace(beta_start, beta_end, T)
          """)),
    wrong(1, S, "linear-endpoint-left-out", "linear β_t = β_start + (β_end−β_start)·t/T: never reaches β_end",
          schedules(linear="""
          if kind == "linear":
              return beta_start + (beta_end - beta_start) * torch.arange(T, dtype=torch.float64) / T
          """)),
    wrong(1, S, "scaled-linear-not-squared", "scaled_linear returns √β evenly spaced, without squaring",
          schedules(scaled="""
          if kind == "scaled_linear":
              return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64)
          """)),
    equivalent(1, S, "linear-by-arange", "β_start + (β_end−β_start)·t/(T−1) is linspace written out",
               schedules(linear="""
               if kind == "linear":
                   return beta_start + (beta_end - beta_start) * torch.arange(T, dtype=torch.float64) / max(T - 1, 1)
               """)),
    equivalent(1, S, "cosine-beta-from-f", "β_t = 1 − f(t+1)/f(t): f(0) cancels in ᾱ_t/ᾱ_{t−1}",
               schedules(cosine="""
               if kind == "cosine":
                   s = 0.008
                   u = torch.arange(T + 1, dtype=torch.float64) / T
                   f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
                   return (1 - f[1:] / f[:-1]).clamp(max=0.999)
               """)),

    wrong(1, QS, "q-sample-alpha-bar-not-sqrt", "ᾱ_t·x0 instead of √ᾱ_t·x0",
          "return (self._gather(self.alpha_bars, t, x0) * x0\n"
          "        + self._gather(self.sqrt_one_minus_alpha_bars, t, x0) * eps)"),
    wrong(1, QS, "q-sample-noise-not-sqrt", "(1−ᾱ_t)·ε instead of √(1−ᾱ_t)·ε",
          "return (self._gather(self.sqrt_alpha_bars, t, x0) * x0\n"
          "        + (1 - self._gather(self.alpha_bars, t, x0)) * eps)"),
    wrong(1, QS, "q-sample-alpha-not-alpha-bar", "one step's α_t instead of the product ᾱ_t",
          """
          alpha = self._gather(self.alphas, t, x0)
          return alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
          """),
    wrong(1, QS, "q-sample-t-minus-1", "ᾱ_{t−1} (paper step t read as code step t): off by one step",
          """
          alpha_bar = self._gather(self.alpha_bars_prev, t, x0)
          return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
          """),
    wrong(1, QS, "q-sample-swapped", "√(1−ᾱ_t)·x0 + √ᾱ_t·ε: the two coefficients swapped",
          "return (self._gather(self.sqrt_one_minus_alpha_bars, t, x0) * x0\n"
          "        + self._gather(self.sqrt_alpha_bars, t, x0) * eps)"),
    equivalent(1, QS, "q-sample-torch-sqrt", "√ᾱ_t and √(1−ᾱ_t) taken with torch.sqrt of the ᾱ buffer",
               """
               alpha_bar = self._gather(self.alpha_bars, t, x0)
               return torch.sqrt(alpha_bar) * x0 + torch.sqrt(1 - alpha_bar) * eps
               """),
    equivalent(1, QS, "q-sample-in-float64", "computed in float64 from the ᾱ buffer, then cast back to x0's dtype",
               """
               alpha_bar = self._gather(self.alpha_bars, t, x0).double()
               return (alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * eps.double()).to(x0.dtype)
               """),
    equivalent(1, QS, "q-sample-addcmul", "mean + std·ε with torch.addcmul",
               "return torch.addcmul(self._gather(self.sqrt_alpha_bars, t, x0) * x0,\n"
               "                     self._gather(self.sqrt_one_minus_alpha_bars, t, x0), eps)"),

    # --- 2: the posterior and the DDPM step ----------------------------------------------------
    wrong(2, QP, "posterior-mean-coefficients-swapped", "the x0 coefficient on x_t and the x_t one on x0",
          posterior(mean="(alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * x0\n"
                         "        + alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * x_t)")),
    wrong(2, QP, "posterior-mean-sqrt-alpha-bar", "√ᾱ_t instead of √α_t in the x_t coefficient",
          posterior(mean="(alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * x0\n"
                         "        + alpha_bar.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t)")),
    wrong(2, QP, "posterior-variance-beta", "β_t (DDPM's other σ_t² choice) as the posterior's variance β̃_t",
          posterior(variance="beta")),
    wrong(2, QP, "posterior-variance-std", "returns the standard deviation √β̃_t as the variance",
          posterior(variance="((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).sqrt()")),
    wrong(2, QP, "posterior-prev-wraps-at-0", "ᾱ_{t−1} as alpha_bars[t − 1]: at t = 0 it wraps to ᾱ_{T−1}, not 1",
          posterior(terms=TERMS.replace("self._gather(self.alpha_bars_prev, t, x_t)",
                                        "self.alpha_bars[torch.as_tensor(t) - 1].reshape(-1, *[1] * (x_t.ndim - 1))"))),
    equivalent(2, QP, "posterior-common-denominator", "both mean terms and the variance over one (1 − ᾱ_t)",
               posterior(mean="(alpha_bar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - alpha_bar_prev) * x_t)"
                              " / (1 - alpha_bar)",
                         variance="(1 - alpha_bar_prev) * beta / (1 - alpha_bar)")),
    equivalent(2, QP, "posterior-precisions-add", "β̃_t = 1/(1/(1−ᾱ_{t−1}) + α_t/β_t): the Bayes product's "
               "precisions add (1/0 = inf gives 0 at t = 0)",
               posterior(variance="1 / (1 / (1 - alpha_bar_prev) + alpha / beta)")),

    wrong(2, DS, "ddpm-noise-at-t0", "σ_t = √β_t: noise is added at the last step t = 0 too",
          ddpm("return mean + self._gather(self.betas, t, x_t).sqrt() * noise")),
    wrong(2, DS, "ddpm-variance-not-sqrt", "σ_t² = β̃_t used as σ_t: the noise scaled by the variance",
          ddpm("return mean + variance * noise")),
    wrong(2, DS, "ddpm-x0-eps-sign", "x̂0 = (x_t + √(1−ᾱ_t)·ε)/√ᾱ_t: the noise added, not removed",
          ddpm(x0="(x_t + self._gather(self.sqrt_one_minus_alpha_bars, t, x_t) * eps)"
                  " / self._gather(self.sqrt_alpha_bars, t, x_t)")),
    wrong(2, DS, "ddpm-ignores-noise", "always draws fresh noise, ignoring the `noise` argument",
          "x0 = self.predict_x0(x_t, t, eps)\nmean, variance = self.q_posterior(x0, x_t, t)\n"
          "z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)\n"
          "return mean + variance.sqrt() * z\n"),
    wrong(2, DS, "ddpm-alg2-eps-coef-not-sqrt", "Algorithm 2 with β_t/(1−ᾱ_t)·ε instead of β_t/√(1−ᾱ_t)·ε",
          textwrap.dedent(TERMS).strip("\n") + "\n" + textwrap.dedent(DRAW).strip("\n") + "\n"
          "sigma = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).sqrt()\n"
          "return (x_t - beta / (1 - alpha_bar) * eps) / alpha.sqrt() + sigma * noise\n"),
    equivalent(2, DS, "ddpm-algorithm-2-direct", "DDPM Algorithm 2 line 4 written directly: "
               "(x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + √β̃_t·z",
               textwrap.dedent(TERMS).strip("\n") + "\n" + textwrap.dedent(DRAW).strip("\n") + "\n"
               "sigma = ((1 - alpha_bar_prev) / (1 - alpha_bar) * beta).sqrt()\n"
               "return (x_t - beta / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt() + sigma * noise\n"),

    # --- 3: the DDIM step and both guidance rules ----------------------------------------------
    wrong(3, DI, "ddim-sigma-eta2-beta", "σ = η²·√((1−ᾱ_prev)/(1−ᾱ_t)·β_t): right only at η = 1 on consecutive steps",
          ddim(sigma="eta**2 * ((1 - alpha_bar_prev) / (1 - alpha_bar) * self._gather(self.betas, t, x_t)).sqrt()")),
    wrong(3, DI, "ddim-sigma-beta", "σ with β_t instead of 1 − ᾱ_t/ᾱ_prev: right only on consecutive steps",
          ddim(sigma="eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * self._gather(self.betas, t, x_t)).sqrt()")),
    wrong(3, DI, "ddim-sigma-eta-squared", "σ scaled by η² instead of η: right only at η ∈ {0, 1}",
          ddim(sigma="eta**2 * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()")),
    wrong(3, DI, "ddim-prev-of-t", "ᾱ_prev = ᾱ_{t−1} whatever t_prev is: right only on consecutive steps",
          ddim(prev="alpha_bar_prev = self._gather(self.alpha_bars_prev, t, x_t)")),
    wrong(3, DI, "ddim-prev-is-alpha-bar-t", "ᾱ_t used for ᾱ_prev: the step stays at the noise level of t",
          ddim(prev="alpha_bar_prev = alpha_bar")),
    wrong(3, DI, "ddim-minus-one-not-handled", "ᾱ_prev = alpha_bars[t_prev]: t_prev = −1 is an error or ᾱ_{T−1}",
          ddim(prev="alpha_bar_prev = self._gather(self.alpha_bars, t_prev, x_t)")),
    wrong(3, DI, "ddim-crash-on-int-t-prev", "t_prev handled as a tensor only (t_prev.clamp): crashes on an int",
          ddim(prev="alpha_bar_prev = torch.where(t_prev < 0, torch.ones(()), "
                    "self.alpha_bars[t_prev.clamp(min=0)]).reshape(-1, *[1] * (x_t.ndim - 1))")),
    wrong(3, DI, "ddim-direction-without-sigma", "√(1−ᾱ_prev)·ε for the direction: the −σ² forgotten",
          ddim(step="alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps")),
    wrong(3, DI, "ddim-noise-times-variance", "σ²·z added instead of σ·z",
          ddim(noise_term="sigma**2 * noise")),
    equivalent(3, DI, "ddim-without-x0", "x_prev = √(ᾱ_prev/ᾱ_t)·(x_t − √(1−ᾱ_t)·ε) + √(1−ᾱ_prev−σ²)·ε + σz",
               ddim(step="(alpha_bar_prev / alpha_bar).sqrt() * (x_t - (1 - alpha_bar).sqrt() * eps)"
                         " + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps")),
    equivalent(3, DI, "ddim-where-last-step", "ᾱ_prev = 1 where t_prev < 0, else ᾱ[t_prev], for an int or a tensor",
               ddim(prev="tp = torch.as_tensor(t_prev, device=x_t.device)\n"
                         "alpha_bar_prev = torch.where(tp >= 0, self.alpha_bars[tp.clamp(min=0)], "
                         "torch.ones((), device=x_t.device)).reshape(-1, *[1] * (x_t.ndim - 1))")),

    wrong(3, CFG, "cfg-swapped", "ε_c and ε_u swapped: ε_c + s·(ε_u − ε_c) pushes away from the prompt",
          "return eps_cond + scale * (eps_uncond - eps_cond)"),
    wrong(3, CFG, "cfg-w-for-s", "ε_c + s·(ε_c − ε_u): the (1+w) form with s put for w, so s = 1 is not ε_c",
          "return eps_cond + scale * (eps_cond - eps_uncond)"),
    wrong(3, CFG, "cfg-difference-only", "s·(ε_c − ε_u): the unconditional base forgotten",
          "return scale * (eps_cond - eps_uncond)"),
    equivalent(3, CFG, "cfg-mixture", "s·ε_c + (1−s)·ε_u = ε_u + s·(ε_c − ε_u)",
               "return scale * eps_cond + (1 - scale) * eps_uncond"),
    equivalent(3, CFG, "cfg-lerp", "torch.lerp(ε_u, ε_c, s) = ε_u + s·(ε_c − ε_u)",
               "return torch.lerp(eps_uncond, eps_cond, scale)"),

    wrong(3, CG, "guidance-sign", "ε + s·√(1−ᾱ_t)·∇log p(y|x_t): pushes away from the class",
          "return eps - scale * schedule.eps_from_score(grad_log_p, t)"),
    wrong(3, CG, "guidance-without-sqrt-one-minus-alpha-bar", "ε − s·∇log p(y|x_t): the score not turned into ε units",
          "return eps - scale * grad_log_p"),
    wrong(3, CG, "guidance-one-minus-alpha-bar-not-sqrt", "(1−ᾱ_t) instead of √(1−ᾱ_t)",
          "return eps - scale * (1 - schedule._gather(schedule.alpha_bars, t, eps)) * grad_log_p"),
    wrong(3, CG, "guidance-sqrt-alpha-bar", "√ᾱ_t instead of √(1−ᾱ_t)",
          "return eps - scale * schedule._gather(schedule.sqrt_alpha_bars, t, eps) * grad_log_p"),
    equivalent(3, CG, "guidance-written-out", "ε − s·√(1−ᾱ_t)·∇ with the buffer gathered by hand",
               "return eps - scale * schedule._gather(schedule.sqrt_one_minus_alpha_bars, t, eps) * grad_log_p"),
    equivalent(3, CG, "guidance-through-the-score", "ε̂ from the guided score: eps_from_score(score_from_eps(ε) + s·∇)",
               "return schedule.eps_from_score(schedule.score_from_eps(eps, t) + scale * grad_log_p, t)"),

    # --- 4: the diagonal Gaussian, its KL and the autoencoder loss -----------------------------
    wrong(4, SAMPLE, "reparam-variance", "z = μ + σ²·ε: the variance instead of the standard deviation",
          """
          eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
          return self.mean + self.var * eps
          """),
    wrong(4, SAMPLE, "reparam-ignores-generator", "ε drawn from the global generator, not `generator`",
          """
          eps = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
          return self.mean + self.std * eps
          """),
    wrong(4, SAMPLE, "reparam-mode", "returns μ: no sample at all",
          "return self.mean + 0 * self.logvar"),
    wrong(4, SAMPLE, "reparam-detached", "z drawn without the trick: no gradient reaches μ and log σ²",
          """
          eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
          return (self.mean + self.std * eps).detach()
          """),
    equivalent(4, SAMPLE, "reparam-exp-half-logvar", "σ = exp(½·log σ²) computed in place",
               """
               eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
               return self.mean + torch.exp(0.5 * self.logvar) * eps
               """),
    equivalent(4, SAMPLE, "reparam-sqrt-var", "σ = √(σ²)",
               """
               eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
               return self.mean + self.var.sqrt() * eps
               """),

    wrong(4, KL, "kl-without-half", "Σ(μ² + σ² − 1 − log σ²) without the ½",
          """
          mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
          return torch.sum(mean.pow(2) + var - 1.0 - logvar, dim=list(range(1, mean.dim())))
          """),
    wrong(4, KL, "kl-summed-over-batch", "summed over the batch too: one number, not one per image",
          """
          mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
          return 0.5 * torch.sum(mean.pow(2) + var - 1.0 - logvar)
          """),
    wrong(4, KL, "kl-mean-over-dims", "averaged over C, H, W instead of summed",
          """
          mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
          return 0.5 * torch.mean(mean.pow(2) + var - 1.0 - logvar, dim=list(range(1, mean.dim())))
          """),
    wrong(4, KL, "kl-plus-logvar", "+ log σ² instead of − log σ²",
          """
          mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
          return 0.5 * torch.sum(mean.pow(2) + var - 1.0 + logvar, dim=list(range(1, mean.dim())))
          """),
    wrong(4, KL, "kl-std-for-var", "σ instead of σ² in the KL",
          """
          mean, std, logvar = self.mean.float(), self.std.float(), self.logvar.float()
          return 0.5 * torch.sum(mean.pow(2) + std - 1.0 - logvar, dim=list(range(1, mean.dim())))
          """),
    equivalent(4, KL, "kl-through-log-sigma", "½Σ(μ² + σ² − 1) − Σ log σ: log σ instead of ½ log σ²",
               """
               mean, var, std = self.mean.float(), self.var.float(), self.std.float()
               dims = list(range(1, mean.dim()))
               return 0.5 * torch.sum(mean.pow(2) + var - 1.0, dim=dims) - torch.sum(torch.log(std), dim=dims)
               """),
    equivalent(4, KL, "kl-torch-distributions", "torch.distributions' KL(N(μ, σ) ‖ N(0, 1)), summed per image",
               """
               mean, std = self.mean.float(), self.std.float()
               kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                      torch.distributions.Normal(0.0, 1.0))
               return kl.sum(dim=list(range(1, mean.dim())))
               """),
    equivalent(4, KL, "kl-flatten", "the terms flattened per image, then summed",
               """
               mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
               return (0.5 * (mean**2 + var - 1.0 - logvar)).flatten(1).sum(1)
               """),

    wrong(4, AE, "ae-kl-not-per-pixel", "L_rec + w·KL without dividing the KL by C·H·W",
          """
          x_hat, posterior = model(x, sample_posterior=True, generator=generator)
          rec = reconstruction_loss(x, x_hat, cfg.recon_loss)
          kl = kl_loss(posterior)
          loss = rec + cfg.kl_weight * kl
          """),
    wrong(4, AE, "ae-kl-per-latent-value", "the KL divided by the latent's size instead of the image's",
          """
          x_hat, posterior = model(x, sample_posterior=True, generator=generator)
          rec = reconstruction_loss(x, x_hat, cfg.recon_loss)
          kl = kl_loss(posterior)
          loss = rec + cfg.kl_weight * kl / posterior.mean[0].numel()
          """),
    wrong(4, AE, "ae-kl-summed-over-batch", "the per-image KL summed over the batch, not averaged",
          """
          x_hat, posterior = model(x, sample_posterior=True, generator=generator)
          rec = reconstruction_loss(x, x_hat, cfg.recon_loss)
          kl = posterior.kl().sum()
          loss = rec + cfg.kl_weight * kl / x[0].numel()
          """),
    wrong(4, AE, "ae-decodes-the-mode", "x̂ decoded from μ, not from a sample z ~ q(z|x)",
          """
          x_hat, posterior = model(x, sample_posterior=False, generator=generator)
          rec = reconstruction_loss(x, x_hat, cfg.recon_loss)
          kl = kl_loss(posterior)
          loss = rec + cfg.kl_weight * kl / x[0].numel()
          """),
    wrong(4, AE, "ae-always-l2", "L2 reconstruction whatever cfg.recon_loss says",
          """
          x_hat, posterior = model(x, sample_posterior=True, generator=generator)
          rec = (x - x_hat).pow(2).mean()
          kl = kl_loss(posterior)
          loss = rec + cfg.kl_weight * kl / x[0].numel()
          """),
    equivalent(4, AE, "ae-kl-by-shape", "C·H·W from x.shape, the batch's KL mean written out",
               """
               x_hat, posterior = model(x, sample_posterior=True, generator=generator)
               rec = reconstruction_loss(x, x_hat, cfg.recon_loss)
               kl = posterior.kl().mean()
               loss = rec + cfg.kl_weight * kl / (x.shape[1] * x.shape[2] * x.shape[3])
               """),

    # --- 5: attention and cross-attention ------------------------------------------------------
    wrong(5, AW, "softmax-over-queries", "softmax over the queries (dim −2) instead of the keys",
          """
          logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
          if mask is not None:
              logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
          return logits.softmax(dim=-2)
          """),
    wrong(5, AW, "attention-no-scale", "softmax(QKᵀ) without the 1/√d",
          """
          logits = (q @ k.transpose(-2, -1)).float()
          if mask is not None:
              logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
          return logits.softmax(dim=-1)
          """),
    wrong(5, AW, "attention-scale-by-d", "1/d instead of 1/√d",
          """
          logits = (q @ k.transpose(-2, -1)).float() / q.shape[-1]
          if mask is not None:
              logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
          return logits.softmax(dim=-1)
          """),
    wrong(5, AW, "attention-mask-ignored", "the padding mask ignored",
          """
          logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
          return logits.softmax(dim=-1)
          """),
    wrong(5, AW, "attention-mask-inverted", "the real tokens masked out instead of the padding",
          """
          logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
          if mask is not None:
              logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
          return logits.softmax(dim=-1)
          """),
    wrong(5, AW, "attention-mask-on-queries", "the mask applied to the query rows instead of the key columns",
          """
          logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
          if mask is not None:
              logits = logits.masked_fill(~mask[:, None, :, None], float("-inf"))
          return logits.softmax(dim=-1)
          """),
    wrong(5, AW, "attention-mask-to-zero", "masked logits set to 0 instead of −∞: padding keeps weight",
          """
          logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
          if mask is not None:
              logits = logits.masked_fill(~mask[:, None, None, :], 0.0)
          return logits.softmax(dim=-1)
          """),
    wrong(5, AW, "attention-softmax-in-input-dtype", "the softmax in the input dtype (bf16), not float32",
          """
          logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
          if mask is not None:
              logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
          return logits.softmax(dim=-1)
          """),
    equivalent(5, AW, "attention-scale-q-first", "(Q/√d)Kᵀ: the scale applied to Q before the product",
               """
               logits = ((q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)).float()
               if mask is not None:
                   logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
               return logits.softmax(dim=-1)
               """),
    equivalent(5, AW, "attention-log-softmax-exp", "exp(log_softmax(l)): the same weights through the log domain",
               """
               logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
               if mask is not None:
                   logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
               return logits.log_softmax(dim=-1).exp()
               """),
    equivalent(5, AW, "attention-softmax-by-hand", "exp(l − max l)/Σexp(l − max l) with torch.where for the mask",
               """
               logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
               if mask is not None:
                   logits = torch.where(mask[:, None, None, :], logits, float("-inf"))
               w = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
               return w / w.sum(dim=-1, keepdim=True)
               """),

    wrong(5, AF, "heads-split-by-reshape", "heads split with reshape(B, heads, N, d): mixes positions and channels",
          module_attention(split="""
          B, N, C = x.shape
          c = x if context is None else context
          L = c.shape[1]
          d = C // self.heads
          q = self.to_q(x).reshape(B, self.heads, N, d)
          k = self.to_k(c).reshape(B, self.heads, L, d)
          v = self.to_v(c).reshape(B, self.heads, L, d)
          """)),
    wrong(5, AF, "heads-merged-without-transpose", "heads merged with reshape(B, N, C) straight from (B, heads, N, d)",
          module_attention(merge="""
          if self.keep_weights:
              self.weights = attention_weights(q, k, mask).detach()
          out = attention(q, k, v, mask=mask, fused=self.fused)
          return self.to_out(out.reshape(B, N, C))
          """)),
    wrong(5, AF, "cross-attention-ignores-context", "K and V from x even when a context is given",
          module_attention(split=SPLIT.replace("c = x if context is None else context", "c = x")
                           .replace("L = c.shape[1]", "L = N"))),
    wrong(5, AF, "attention-no-output-projection", "the heads' output returned without W_O",
          module_attention(merge="""
          if self.keep_weights:
              self.weights = attention_weights(q, k, mask).detach()
          out = attention(q, k, v, mask=mask, fused=self.fused)
          return out.transpose(1, 2).reshape(B, N, C)
          """)),
    wrong(5, AF, "attention-mask-dropped", "the padding mask not passed on to `attention`",
          module_attention(merge=MERGE.replace("attention(q, k, v, mask=mask, fused=self.fused)",
                                               "attention(q, k, v, fused=self.fused)"))),
    equivalent(5, AF, "heads-by-unflatten-permute",
               "heads split with unflatten + permute, merged with permute + flatten",
               module_attention(split="""
               B, N, C = x.shape
               c = x if context is None else context
               q = self.to_q(x).unflatten(-1, (self.heads, -1)).permute(0, 2, 1, 3)
               k = self.to_k(c).unflatten(-1, (self.heads, -1)).permute(0, 2, 1, 3)
               v = self.to_v(c).unflatten(-1, (self.heads, -1)).permute(0, 2, 1, 3)
               """, merge="""
               if self.keep_weights:
                   self.weights = attention_weights(q, k, mask).detach()
               out = attention(q, k, v, mask=mask, fused=self.fused)
               return self.to_out(out.permute(0, 2, 1, 3).flatten(2))
               """)),

    # --- 6: timestep embedding and the ResBlock ------------------------------------------------
    wrong(6, TE, "temb-sin-first", "[sin, cos] instead of [cos, sin]",
          TEMB.replace("[torch.cos(args), torch.sin(args)]", "[torch.sin(args), torch.cos(args)]")),
    wrong(6, TE, "temb-frequencies-over-dim", "ω_i = P^(−i/dim) instead of P^(−i/half)",
          TEMB.replace("* i / half", "* i / dim")),
    wrong(6, TE, "temb-frequencies-over-half-minus-1", "ω_i = P^(−i/(half−1)) (another code base's shift)",
          TEMB.replace("* i / half", "* i / max(half - 1, 1)")),
    wrong(6, TE, "temb-interleaved", "cos and sin interleaved per frequency instead of in two halves",
          TEMB.replace("torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
                       "torch.stack([torch.cos(args), torch.sin(args)], dim=-1).flatten(1)")),
    wrong(6, TE, "temb-odd-dim-not-padded", "no zero column for an odd dim: (B, dim − 1)",
          TEMB.replace("if dim % 2 == 1:", "if False:")),
    equivalent(6, TE, "temb-pow-and-pad", "ω_i = P**(−i/half) with a power; the odd column with F.pad",
               """
               half = dim // 2
               omega = max_period ** (-torch.arange(half, device=t.device, dtype=torch.float32) / half)
               args = t.float()[:, None] * omega[None, :]
               return F.pad(torch.cat([args.cos(), args.sin()], dim=-1), (0, dim % 2))
               """),

    wrong(6, RB, "resblock-no-skip", "returns h: the skip connection forgotten",
          RESBLOCK.replace("return self.skip(x) + h", "return h")),
    wrong(6, RB, "resblock-no-time", "the time embedding never added (the additive form)",
          RESBLOCK.replace("h = self.norm2(h + e)", "h = self.norm2(h)")),
    wrong(6, RB, "resblock-time-without-silu", "W·e_t instead of W·SiLU(e_t)",
          RESBLOCK.replace("self.time_proj(F.silu(emb))", "self.time_proj(emb)")),
    wrong(6, RB, "resblock-time-after-conv2", "the time embedding added after the second conv",
          """
          h = self.conv1(F.silu(self.norm1(x)))
          h = self.conv2(self.dropout(F.silu(self.norm2(h))))
          h = h + self.time_proj(F.silu(emb))[:, :, None, None]
          return self.skip(x) + h
          """),
    wrong(6, RB, "resblock-silu-before-norm", "SiLU then GroupNorm instead of GroupNorm then SiLU",
          RESBLOCK.replace("F.silu(self.norm1(x))", "self.norm1(F.silu(x))")
          .replace("self.norm2(h + e)", "self.norm2(F.silu(h + e))")
          .replace("self.norm2(h) * (1 + scale) + shift", "self.norm2(F.silu(h)) * (1 + scale) + shift")
          .replace("self.dropout(F.silu(h))", "self.dropout(h)")),
    wrong(6, RB, "resblock-adagn-scale-without-one", "AdaGN as s·GN(h) + b instead of (1 + s)·GN(h) + b",
          RESBLOCK.replace("* (1 + scale)", "* scale")),
    wrong(6, RB, "resblock-adagn-halves-swapped", "AdaGN with the projection's halves read as (shift, scale)",
          RESBLOCK.replace("scale, shift = e.chunk(2, dim=1)", "shift, scale = e.chunk(2, dim=1)")),
    wrong(6, RB, "resblock-adagn-before-norm", "AdaGN applied before GN₂, which then normalises it away",
          RESBLOCK.replace("self.norm2(h) * (1 + scale) + shift", "self.norm2(h * (1 + scale) + shift)")),
    equivalent(6, RB, "resblock-sigmoid-and-unsqueeze", "SiLU written as x·σ(x); the embedding unsqueezed twice",
               """
               a = self.norm1(x)
               h = self.conv1(a * torch.sigmoid(a))
               e = self.time_proj(emb * torch.sigmoid(emb)).unsqueeze(-1).unsqueeze(-1)
               if self.scale_shift:
                   C = e.shape[1] // 2
                   b = torch.addcmul(e[:, C:], self.norm2(h), 1 + e[:, :C])
               else:
                   b = self.norm2(h + e)
               return self.skip(x) + self.conv2(self.dropout(b * torch.sigmoid(b)))
               """),

    # --- 7: the text encoder -------------------------------------------------------------------
    wrong(7, SA, "text-mask-ignored", "[PAD] keys not masked", text_attention(masked="logits")),
    wrong(7, SA, "text-no-scale", "softmax(QKᵀ) without 1/√d",
          text_attention(logits="(q @ k.transpose(-2, -1)).float()")),
    wrong(7, SA, "text-softmax-over-queries", "softmax over the queries (dim −2)",
          text_attention(softmax="logits.softmax(dim=-2)")),
    wrong(7, SA, "text-mask-on-queries", "the mask applied to the query rows instead of the key columns",
          text_attention(masked='logits.masked_fill(~mask[:, None, :, None], float("-inf"))')),
    wrong(7, SA, "text-heads-merged-without-transpose", "heads merged with reshape straight from (B, h, L, d)",
          text_attention(merge="(weights @ v).reshape(B, L, D)")),
    equivalent(7, SA, "text-sdpa", "torch's scaled_dot_product_attention with the same boolean mask",
               """
               B, L, D = x.shape
               q, k, v = self.qkv(x).split(D, dim=-1)
               q, k, v = (u.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for u in (q, k, v))
               y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
               return self.dropout(self.out(y.transpose(1, 2).flatten(2)))
               """),
    equivalent(7, SA, "text-scale-q-first", "(Q/√d)Kᵀ: the scale applied to Q before the product",
               text_attention(logits="((q / math.sqrt(d)) @ k.transpose(-2, -1)).float()")),

    wrong(7, BF, "block-post-ln", "post-LN: LN(x + Attn(x)), then LN(x + MLP(x))",
          """
          x = self.ln1(x + self.attn(x, mask))
          return self.ln2(x + self.mlp(x))
          """),
    wrong(7, BF, "block-no-attention-residual", "x = Attn(LN(x)) without the residual",
          """
          x = self.attn(self.ln1(x), mask)
          return x + self.mlp(self.ln2(x))
          """),
    wrong(7, BF, "block-parallel", "MLP of the block's input, in parallel with attention (not in sequence)",
          "return x + self.attn(self.ln1(x), mask) + self.mlp(self.ln2(x))"),
    wrong(7, BF, "block-one-layernorm", "the first LayerNorm used twice; ln2 never used",
          """
          x = x + self.attn(self.ln1(x), mask)
          return x + self.mlp(self.ln1(x))
          """),
    equivalent(7, BF, "block-named-steps", "the same block with each LayerNorm's output named",
               """
               h = self.ln1(x)
               x = x + self.attn(h, mask)
               h = self.ln2(x)
               return x + self.mlp(h)
               """),

    wrong(7, TF, "text-no-final-layernorm", "no final LayerNorm",
          """
          x = self.token_embedding(token_ids) + self.position_embedding[:L]
          for block in self.blocks:
              x = block(x, mask)
          return x
          """),
    wrong(7, TF, "text-no-positions", "no position embedding: the tokens are a bag of words",
          """
          x = self.token_embedding(token_ids)
          for block in self.blocks:
              x = block(x, mask)
          return self.ln_final(x)
          """),
    wrong(7, TF, "text-mask-not-passed", "the blocks get an all-True mask: [PAD] attended to",
          """
          x = self.token_embedding(token_ids) + self.position_embedding[:L]
          for block in self.blocks:
              x = block(x, torch.ones_like(mask))
          return self.ln_final(x)
          """),
    equivalent(7, TF, "text-embedding-by-index", "the embeddings looked up by index: weight[ids] + P[arange(L)]",
               """
               x = self.token_embedding.weight[token_ids] + self.position_embedding[torch.arange(L)]
               for block in self.blocks:
                   x = block(x, mask)
               return self.ln_final(x)
               """),

    # --- 8: the training loss and the sampling loops -------------------------------------------
    wrong(8, DPS, "ddpm-sample-skips-t0", "the loop stops at t = 1: the last, noise-free step is never taken",
          DDPM_LOOP.replace("range(schedule.T - 1, -1, -1)", "range(schedule.T - 1, 0, -1)")),
    wrong(8, DPS, "ddpm-sample-from-T", "paper steps T … 1 fed to the model as code steps (off by one)",
          DDPM_LOOP.replace("range(schedule.T - 1, -1, -1)", "range(schedule.T, 0, -1)")
          .replace("schedule.ddpm_step(x_t, t, eps", "schedule.ddpm_step(x_t, t - 1, eps")),
    wrong(8, DPS, "ddpm-sample-callback-after-step", "the callback sees x_{t−1} (after the step), not x_t",
          """
          for i, t in enumerate(_progress(range(schedule.T - 1, -1, -1), progress)):
              eps = eps_fn(x_t, t)
              x0_pred = schedule.predict_x0(x_t, t, eps)
              x_t = schedule.ddpm_step(x_t, t, eps, generator=generator)
              if callback is not None:
                  callback(i, t, x_t, x0_pred)
          return x_t
          """),
    wrong(8, DPS, "ddpm-sample-no-generator", "the steps' noise not drawn from `generator`: not reproducible",
          DDPM_LOOP.replace("schedule.ddpm_step(x_t, t, eps, generator=generator)", "schedule.ddpm_step(x_t, t, eps)")),
    equivalent(8, DPS, "ddpm-sample-reversed-range", "the steps as reversed(range(T))",
               DDPM_LOOP.replace("range(schedule.T - 1, -1, -1)", "reversed(range(schedule.T))")),

    wrong(8, DIS, "ddim-sample-stops-at-0", "steps only between the timesteps: the last step to t_prev = −1 missing",
          """
          for i, (t, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
              eps = eps_fn(x_t, t)
              if callback is not None:
                  callback(i, t, x_t, schedule.predict_x0(x_t, t, eps))
              x_t = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, generator=generator)
          return x_t
          """),
    wrong(8, DIS, "ddim-sample-consecutive-t-prev", "t_prev = t − 1 instead of the next of `timesteps`",
          DDIM_LOOP.replace("timesteps[i + 1] if i + 1 < len(timesteps) else -1", "t - 1")),
    wrong(8, DIS, "ddim-sample-eta-dropped", "η not passed on: every DDIM step deterministic",
          DDIM_LOOP.replace("eta=eta, ", "")),
    wrong(8, DIS, "ddim-sample-no-generator", "the steps' noise not drawn from `generator`: not reproducible",
          DDIM_LOOP.replace(", generator=generator)", ")")),
    equivalent(8, DIS, "ddim-sample-zip-pairs", "(t, t_prev) pairs from zip(timesteps, timesteps[1:] + [−1])",
               """
               pairs = list(zip(timesteps, timesteps[1:] + [-1]))
               for i, (t, t_prev) in enumerate(_progress(pairs, progress)):
                   eps = eps_fn(x_t, t)
                   if callback is not None:
                       callback(i, t, x_t, schedule.predict_x0(x_t, t, eps))
                   x_t = schedule.ddim_step(x_t, t, t_prev, eps, eta=eta, generator=generator)
               return x_t
               """),

    wrong(8, DL, "loss-target-x0", "the ε-model trained to predict x0",
          loss(target='x0 if prediction == "eps" else schedule.v_from_eps_x0(x0, eps, t)')),
    wrong(8, DL, "loss-v-sign", "v = √(1−ᾱ)·x0 − √ᾱ·ε: the v target with its sign flipped",
          loss(target='eps if prediction == "eps" else -schedule.v_from_eps_x0(x0, eps, t)')),
    wrong(8, DL, "loss-fresh-noise", "x_t noised with a fresh ε, not the ε of the target",
          loss(x_t="schedule.q_sample(x0, t, torch.randn_like(x0))")),
    wrong(8, DL, "loss-summed-over-batch", "mean per example, then summed over the batch",
          loss(value="((out.float() - target.float()) ** 2).flatten(1).mean(1).sum()")),
    wrong(8, DL, "loss-model-sees-t-plus-1", "the model given paper step t+1 for code step t",
          loss(out="model(x_t, t + 1, context)")),
    wrong(8, DL, "loss-l1", "|ε − ε_θ| instead of (ε − ε_θ)²",
          loss(value="(out.float() - target.float()).abs().mean()")),
    equivalent(8, DL, "loss-written-out", "((ε_θ − ε)²).mean() written out; v from the gathered buffers",
               loss(target='eps if prediction == "eps" else (schedule._gather(schedule.sqrt_alpha_bars, t, x0) * eps'
                           ' - schedule._gather(schedule.sqrt_one_minus_alpha_bars, t, x0) * x0)',
                    value="((target.float() - out.float()) ** 2).mean()")),
)


# ----------------------------------------------------------------------------------------------
# Compiling a mutant and swapping it in


def region_of(mutant, regions=None):
    """The one region of the mutant's assignment in its function; ValueError if none or several."""
    found = [r for r in (regions or project_regions()) if r.number == mutant.number and r.function == mutant.function]
    if len(found) != 1:
        raise ValueError(f"mutant {mutant.name}: assignment {mutant.number} has {len(found)} regions in "
                         f"{mutant.function}; need exactly one")
    return found[0]


def _function_node(tree, qualname):
    """The ast node of the function `qualname` ("Class.method" or "function") at the module's top."""
    body, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None)
        if node is None:
            raise ValueError(f"no {qualname} in the module")
        body = node.body
    return node


def mutated_code(mutant, regions=None):
    """The code object of the mutant's function: its source with the region's lines replaced by the body."""
    region = region_of(mutant, regions)
    source = (ROOT / region.path).read_text()
    node = _function_node(ast.parse(source), mutant.function)
    lines = source.splitlines(keepends=True)
    first = node.lineno - 1  # the `def` line (decorators are above it and stay out)
    function = lines[first:node.end_lineno]
    body = textwrap.indent(mutant.body, region.indent)
    function[region.begin - first:region.end - 1 - first] = [body]  # the code between the two markers
    margin = " " * node.col_offset
    text = "".join(line[len(margin):] if line.startswith(margin) else line
                   for line in "".join(function).splitlines(keepends=True))
    filename = f"<mutant {mutant.name} of {region.path}:{mutant.function}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)  # for tracebacks
    module = compile(text, filename, "exec", dont_inherit=True)
    return next(c for c in module.co_consts if inspect.iscode(c) and c.co_name == node.name)


def target_function(mutant):
    """The live function object the mutant replaces (inside a decorator's wrapper, if any)."""
    region = region_of(mutant)
    obj = importlib.import_module(region.path[:-3].replace("/", "."))
    for part in mutant.function.split("."):
        obj = vars(obj)[part] if inspect.isclass(obj) else getattr(obj, part)
    return inspect.unwrap(obj)


@contextlib.contextmanager
def swapped(mutant):
    """Inside the block, every call of the mutant's function runs the mutant's code."""
    function, code = target_function(mutant), mutated_code(mutant)
    old = function.__code__
    if code.co_freevars != old.co_freevars or code.co_varnames[:code.co_argcount] != old.co_varnames[:old.co_argcount]:
        raise ValueError(f"mutant {mutant.name}: its code does not fit {mutant.function} "
                         "(other arguments or closure variables)")
    function.__code__ = code
    try:
        yield function
    finally:
        function.__code__ = old


# ----------------------------------------------------------------------------------------------
# Running the tests of an assignment


def assignment_test_files(number):
    """The files `grade` runs (tests/ and tests/hidden/) that hold tests of assignment `number`, as absolute paths."""
    marker = re.compile(rf"mark\.assignment\(\s*{number}\s*\)")
    files = [ROOT / f for f in graded_test_files(ROOT)]
    return [str(f) for f in files if marker.search(f.read_text())]


class _Outcomes:
    """A pytest plugin that keeps each test's outcome and the first failure's message."""

    def __init__(self):
        self.passed, self.failed, self.broken = 0, [], []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
            self.failed.append((report.nodeid, " | ".join(message.strip().splitlines()[:2])[:240]))
        elif report.passed and report.when == "call":
            self.passed += 1

    def pytest_collectreport(self, report):
        if report.failed:  # a test file that cannot be imported: no verdict on the mutant
            self.broken.append((report.nodeid, "collection error: " + str(report.longrepr).strip().splitlines()[-1]))


def run_assignment_tests(number, stop_at_first=True):
    """Run assignment `number`'s tests here, in this process: ("passed" | "failed" | "error", test, message)."""
    import pytest
    import torch

    gc.collect()
    gc.freeze()  # what lives now is never garbage: pytest's own gc.collect() calls then skip it (~0.5 s a run)
    random.seed(0)
    torch.manual_seed(0)  # the same global random state for every run, whatever ran before
    outcomes = _Outcomes()
    # as `grade` runs them: the repository's ini, no plugins from the environment, no cache
    args = [*assignment_test_files(number), "-c", str(ROOT / "pytest.ini"), "--rootdir", str(ROOT),
            "-m", "assignment", "--assignment", str(number), "-q", "-p", "no:cacheprovider", "--tb=line",
            *(["-x"] if stop_at_first else [])]
    autoload = os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = pytest.main(args, plugins=[outcomes])
    finally:
        if autoload is None:
            del os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"]
        else:
            os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = autoload
    if outcomes.broken:
        return ("error", *outcomes.broken[0])
    if outcomes.failed:
        return ("failed", *outcomes.failed[0])
    if code == 0 and outcomes.passed:
        return ("passed", f"{outcomes.passed} tests", "")
    return ("error", f"pytest exit code {int(code)}", out.getvalue().strip()[-300:])


def check(only=None):
    """Run the reference and every mutant of the assignments in `only` (default: all); one row per run.

    A row: number, mutant ("reference" for the unchanged project), expect ("pass" for the reference),
    got ("passed" | "failed" | "error"), test (the first failing one), message, ok, seconds.
    """
    only = sorted(set(only or NUMBERS))
    unknown = sorted(set(only) - set(NUMBERS))
    if unknown:
        raise ValueError(f"unknown assignment(s) {unknown}; the assignments are {NUMBERS}")
    rows = []
    for number in only:
        runs = [(None, "reference", "pass")] + [(m, m.name, m.expect) for m in MUTANTS if m.number == number]
        for mutant, name, expect in runs:
            start = time.perf_counter()
            try:
                with swapped(mutant) if mutant else contextlib.nullcontext():
                    got, test, message = run_assignment_tests(number, stop_at_first=expect == WRONG)
            except Exception as e:  # the mutant does not compile, or does not fit its function
                got, test, message = "error", "", f"{type(e).__name__}: {e}"
            ok = got == "failed" if expect == WRONG else got == "passed"
            rows.append({"number": number, "mutant": name, "function": mutant.function if mutant else "",
                         "expect": expect, "got": got, "test": test if got != "passed" else "", "message": message,
                         "ok": ok, "seconds": round(time.perf_counter() - start, 2)})
    return rows


WHY = {m.name: m.why for m in MUTANTS}


def print_rows(rows):
    print(f"{'':>2} {'mutant':<44} {'expected':<10} {'got':<7} {'':<3} first failing test")
    for r in rows:
        expected = {WRONG: "to fail", EQUIVALENT: "to pass", "pass": "to pass"}[r["expect"]]
        print(f"{r['number']:>2} {r['mutant']:<44} {expected:<10} {r['got']:<7} {'ok' if r['ok'] else 'BAD':<3} "
              f"{r['test']}")
        if not r["ok"]:
            print(f"{'':>3} {WHY[r['mutant']] if r['mutant'] in WHY else ''}  {r['message']}")
    print(summary(rows))


def summary(rows):
    """One line: how many wrong mutants were caught and equivalent ones passed, and what is not."""
    wrong_rows = [r for r in rows if r["expect"] == WRONG]
    same_rows = [r for r in rows if r["expect"] == EQUIVALENT]
    reference = [r for r in rows if r["expect"] == "pass"]
    return (f"{sum(r['ok'] for r in wrong_rows)}/{len(wrong_rows)} wrong mutants fail their assignment, "
            f"{sum(r['ok'] for r in same_rows)}/{len(same_rows)} equivalent ones pass, "
            f"reference passes {sum(r['ok'] for r in reference)}/{len(reference)} assignments "
            f"({sum(r['seconds'] for r in rows):.0f} s)")


def command(args):
    """`python -m course mutants`: the table (or JSON); exit 0 only if every row is as expected."""
    try:
        rows = check(args.only)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_rows(rows)
    raise SystemExit(0 if all(r["ok"] for r in rows) else 1)


def add_command(commands):
    """The `mutants` subcommand, added to `python -m course`'s subparsers."""
    p = commands.add_parser("mutants", help="check that wrong answers fail the assignments' tests and "
                                            "equivalent right ones pass")
    p.add_argument("--only", type=int, nargs="+", metavar="N", help="only the mutants of these assignments")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run_command=command)
