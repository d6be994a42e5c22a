"""How cost grows: the U-Net step against image size and f, MFU against batch, sampling against DDIM steps.

1. Image size and downsampling factor f (the LDM paper's Fig. 6 / Table 6 question): one training step
   of the preset's U-Net on inputs (C, H/f, W/f), C = 3 for f = 1 (pixels) and 4 otherwise (latents),
   at one fixed batch for every cell, and the bytes autograd keeps for backward. Only the U-Net: the
   encoder runs once per image before training (train_small.py caches latents).
2. Against the hardware: FLOPs of one step (torch's FlopCounterMode) / step time, as a share of the
   measured peak (section 4: the faster of a large matmul and a large 3×3 convolution), at the preset's
   batch B and at 2B and 4B.
3. Sampling time against DDIM steps (CFG 3, one batch), next to the caption fidelity that
   `python -m tinyldm evaluate --samplers ddim10,...` measured at the same steps on a trained run (--fidelity).
"""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.common import build_unet, count_flops, figure, measure_training, median_time, training_step
from tinyldm.__main__ import autocast
from tinyldm.diffusion import ddim_sample, make_guided_eps


def with_context(s, context):
    """A copy of the bench state `s` with another text context (B, L, d), for another batch size."""
    return SimpleNamespace(**{**vars(s), "context": context})


def grid(s):
    """(image sizes, factors f) of the growth table: 32, 64, 128 × 1, 2, 4, 8, or a small grid with --tiny."""
    return ((16, 32), (1, 2, 4)) if s.bc.tiny else ((32, 64, 128), (1, 2, 4, 8))


def bench_size_and_f(s):
    """1. Step time and activations of the preset's U-Net for every (image size, f) at one batch."""
    B = s.bc.growth_batch
    multiple = 2 ** (len(s.unet_cfg.channel_mult) - 1)  # the U-Net halves H and W this many times
    context = s.context[:1].expand(B, -1, -1).contiguous()  # (B, L, d)
    state = with_context(s, context)  # training_step reads s.context
    state.bc = replace(s.bc, repeats=min(s.bc.repeats, 3))  # the cells differ by factors; the largest takes seconds
    figures = {}
    sizes, factors = grid(s)
    for size in sizes:
        for f in factors:
            name, side = f"growth_{size}px_f{f}", size // f
            if side % multiple:
                figures[f"{name}_step_s"] = figure(None, "s", f"latent side {side} is not a multiple of {multiple}")
                figures[f"{name}_activations_mib"] = figure(None, "MiB", "not measured (see the step time)")
                continue
            channels = 3 if f == 1 else s.unet_cfg.in_channels
            unet = build_unet(replace(s.unet_cfg, in_channels=channels, out_channels=channels), s.device,
                              s.cpu_generator)
            x0 = torch.randn(B, channels, side, side, generator=s.cpu_generator).to(s.device)  # (B, C, H/f, W/f)
            try:
                seconds, _, activations = measure_training(unet, unet, state, x0, s.precision)
            except torch.cuda.OutOfMemoryError:  # one cell too large for the GPU: the others stand
                seconds = None
            if seconds is None:  # (freed outside the except clause, whose traceback holds the step's tensors)
                unet = x0 = None
                torch.cuda.empty_cache()
                figures[f"{name}_step_s"] = figure(None, "s", f"out of memory at batch {B}")
                figures[f"{name}_activations_mib"] = figure(None, "MiB", f"out of memory at batch {B}")
                continue
            figures[f"{name}_step_s"] = figure(seconds, "s", f"U-Net training step on x0 {tuple(x0.shape)}, {s.precision}")
            figures[f"{name}_activations_mib"] = figure(activations / 2**20, "MiB", "tensors saved for backward")
    return figures


def bench_mfu_by_batch(s):
    """2. Achieved FLOP/s of the latent training step / the measured peak, at B, 2B and 4B."""
    figures, peak = {}, s.peak_flops()
    for k in (1, 2, 4):
        B = k * s.x0.shape[0]
        x0 = torch.randn(B, *s.x0.shape[1:], generator=s.cpu_generator).to(s.device)  # (B, C, h, w)
        context = torch.randn(B, *s.context.shape[1:], generator=s.cpu_generator).to(s.device)  # (B, L, d)
        state = with_context(s, context)
        step, loss_fn = training_step(s.unet, s.unet, state, x0, s.precision)
        flops = count_flops(s.unet, loss_fn)
        seconds = median_time(step, s.device, s.bc.warmup, s.bc.repeats)
        s.unet.zero_grad(set_to_none=True)
        mfu = flops / seconds / peak  # MFU = achieved FLOP/s / peak FLOP/s
        figures[f"mfu_batch_{k}x"] = {**figure(mfu, "",
                                               f"batch {B}: {flops / 1e9:.3g} GFLOP per step in {seconds:.3g} s "
                                               f"= {flops / seconds / 1e12:.3g} TFLOP/s, over the measured peak "
                                               f"{peak / 1e12:.3g} TFLOP/s (bench section 4)"),
                                      "batch": B, "step_s": seconds, "gflop": flops / 1e9}
    return figures


def read_fidelity(path):
    """{steps: (all-correct share, [lo, hi], n)} of the DDIM entries of an evaluate JSON's sampler sweep."""
    sweep = json.loads(Path(path).read_text()).get("sampler_sweep") or []
    table = {}
    for entry in sweep:
        if entry.get("sampler") == "ddim":
            single = entry["fidelity"]["single"]
            table[int(entry["steps"])] = (single["all_correct"], single["all_correct_ci"], single["all_correct_n"])
    return table


def ddim_steps_list(s):
    return (2, 5) if s.bc.tiny else (10, 20, 50, 100, 1000)


def bench_ddim_steps(s):
    """3. Time to sample one batch with CFG 3 at each number of DDIM steps, and the fidelity measured for it."""
    B = s.bc.sample_batch
    L, d = s.context.shape[1:]
    shape = (B, *s.x0.shape[1:])
    context, uncond = (torch.randn(B, L, d, generator=s.cpu_generator).to(s.device) for _ in range(2))  # c, c_u (B, L, d)
    eps_fn = make_guided_eps(s.unet, s.schedule, context, uncond, guidance_scale=3.0)
    fidelity = read_fidelity(s.bc.fidelity) if s.bc.fidelity else {}
    figures = {}
    for steps in ddim_steps_list(s):
        def sample():
            with autocast(s.device, enabled=s.precision == "bf16"):
                ddim_sample(eps_fn, s.schedule, shape, steps=steps, generator=s.generator)

        seconds = median_time(sample, s.device, 0, 1 if steps >= 100 else min(s.bc.repeats, 3))
        entry = figure(seconds, "s", f"{B} latents {tuple(shape[1:])}, CFG 3 ({2 * steps} U-Net calls)")
        if steps in fidelity:
            share, ci, n = fidelity[steps]
            entry.update(fidelity=share, fidelity_ci=ci, fidelity_n=n)
            entry["note"] += f"; single-object all-right {share:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (n = {n}) in {s.bc.fidelity}"
        figures[f"ddim{steps}_sample_s"] = entry
    return figures
