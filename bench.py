"""Speed and memory benchmarks, every figure side by side in one process:

    python bench.py                  # the preset's U-Net: small on CUDA, cpu on a CPU; writes bench.json, bench.png
    python bench.py --fidelity runs/cpu/eval_samplers.json   # section 6 shows the fidelity per DDIM steps
    python bench.py --quick          # DDPM timed over 100 steps and extrapolated to 1000
    python bench.py --sections 1,5   # only some sections (1 always runs: the others use its U-Net)
    python bench.py --tiny           # everything in seconds (what the tests run)
    python bench.py --help           # every option

  1  latent vs pixel  the same U-Net trained on the preset's latents (4, H/f, W/f) and on pixels (3, H, W)
                     (f = 2 for the cpu preset, f = 4 for small; --preset small measures f = 4 on a CPU too)
  2  samplers         DDIM-50 vs DDPM-1000 with classifier-free guidance (two U-Net calls per step)
  3  attention        written-out softmax(QKᵀ/√d)V vs F.scaled_dot_product_attention, same weights
  4  precision, compile, FLOPs   bf16 vs fp32, torch.compile vs eager (CUDA); TFLOP/s and MFU
  5  diffusers        U-Net, autoencoder and DDIM loop against diffusers at equal size (benchmarks/versus_diffusers.py;
                      only if diffusers is installed: pip install -r requirements-bench.txt)
  6  growth           step time and activations against image size and f, MFU against batch, sampling time
                      against DDIM steps (benchmarks/growth.py)
  7  cpu speed        where a stage-3 step of train_small.py spends its time, and channels_last,
                      torch.compile, threads, batch size on the CPU (benchmarks/cpu_speed.py)

Every time is the median of `repeats` runs after `warmup` runs (torch.cuda.synchronize() around
each run on CUDA). One training step = diffusion_loss forward + backward + AdamW step, with a random
text context (B, L, d): the text encoder and the autoencoder are left out, because train_small.py
encodes the images once and caches the latents (section 7 times the whole stage-3 step). The U-Net is
the one train_small.py builds for the preset (train_small.component_configs). Each figure is
{"value", "unit", "note"}; a value not measurable here is None, and the note says why. bench.png
(beside --out) draws section 6 (benchmarks/plot.py). Timings are for reading, never for tests.
"""

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch

import train_small
from benchmarks.common import (build_unet, conv_peak, count_flops, figure, matmul_peak, measure_training, median_time,
                               training_step)
from benchmarks.cpu_speed import bench_cpu_speed
from benchmarks.growth import bench_ddim_steps, bench_mfu_by_batch, bench_size_and_f
from benchmarks.plot import plot
from benchmarks.versus_diffusers import bench_versus_diffusers, diffusers_version
from tinyldm.__main__ import autocast, pick_device
from tinyldm.diffusion import NoiseSchedule, ddim_sample, ddpm_sample, make_beta_schedule, make_guided_eps
from tinyldm.unet import attention


@dataclass
class BenchConfig:
    device: str = "auto"             # auto | cpu | cuda
    preset: str | None = None        # train_small.py preset whose U-Net is measured; None: small on CUDA, else cpu
    image_size: int | None = None    # pixels per side; None: the preset's (32 for cpu, 64 for small)
    batch_size: int | None = None    # images per training step; None: the preset's
    sample_batch: int | None = None  # images per sampling run; None: 64 on CUDA, 16 on CPU
    warmup: int | None = None        # untimed runs before each timing; None: 3 on CUDA, 1 on CPU
    repeats: int | None = None       # timed runs whose median is reported; None: 10 on CUDA, 7 on CPU
    quick: bool = False              # DDPM runs a T = ddpm_steps schedule; its time is extrapolated to T = 1000
    ddpm_steps: int = 100            # DDPM steps actually run with quick
    compile: bool = True             # measure torch.compile: section 4 on CUDA, section 7 on a CPU (minutes there)
    tiny: bool = False               # tiny U-Net, batch 2, 16x16 images, 2 repeats, quick: all in seconds
    seed: int = 0                    # seeds weights, inputs and noise
    out: str = "bench.json"          # where the JSON goes (bench.png beside it)
    growth_batch: int | None = None  # batch of every cell of the growth table; None: 32
    fidelity: str = ""               # an evaluate JSON with a DDIM sampler sweep: its fidelity goes beside section 6
    sections: str = "1,2,3,4,5,6,7"  # which sections to run (section 1 always runs)
    # None fields are filled in by resolve(), from the device and the preset


# ----------------------------------------------------------------------------------------------
# The U-Net of a train_small.py preset, and one training step of it

def preset_config(preset):
    """The TrainConfig of a train_small.py preset, filled in as train_small.py fills it in."""
    if preset not in train_small.PRESETS:
        raise ValueError(f"--preset must be one of {sorted(train_small.PRESETS)}; got {preset!r}")
    return train_small.parse_args(["--preset", preset])


def unet_config(train_cfg, channels):
    """The UNetConfig train_small.py builds, with `channels` in and out (4: latents, 3: pixels)."""
    _, _, unet_cfg, _ = train_small.component_configs(train_cfg, train_cfg.vocab_size)
    return replace(unet_cfg, in_channels=channels, out_channels=channels)


# ----------------------------------------------------------------------------------------------
# The benchmarks; each returns {name: figure}

def bench_latent_vs_pixel(s):
    """1. Same U-Net config, same batch: the preset's latents (4, H/f, W/f) vs pixels (3, H, W).

    If the pixel step does not fit in GPU memory, both are measured again at half the batch."""
    requested = s.bc.batch_size
    while True:
        try:
            figures = latent_vs_pixel(s)
            break
        except torch.cuda.OutOfMemoryError:
            if s.bc.batch_size == 1:
                raise
        s.unet = s.x0 = None  # (outside the except clause, so the traceback's tensors are freed too)
        torch.cuda.empty_cache()
        s.bc.batch_size //= 2
        s.context = s.context[: s.bc.batch_size]  # (B, L, d)
    if s.bc.batch_size != requested:
        figures["pixel_over_latent"]["note"] += f"; batch {requested} ran out of memory, measured at {s.bc.batch_size}"
    return figures


def latent_vs_pixel(s):
    B, H, figures, seconds = s.bc.batch_size, s.bc.image_size, {}, {}
    for space, channels, size in (("latent", 4, H // s.f), ("pixel", 3, H)):
        s.baseline = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else 0
        unet = build_unet(unet_config(s.train_cfg, channels), s.device, s.cpu_generator)
        x0 = torch.randn(B, channels, size, size, generator=s.cpu_generator).to(s.device)  # (B, C, h, w)
        seconds[space], peak, activations = measure_training(unet, unet, s, x0, s.precision)
        figures[f"{space}_step_s"] = figure(seconds[space], "s", f"x0 {tuple(x0.shape)}, {s.precision}")
        figures[f"{space}_images_per_s"] = figure(B / seconds[space], "img/s", f"batch {B}")
        figures[f"{space}_peak_memory_mib"] = figure(
            None if peak is None else peak / 2**20, "MiB",
            "cuda only (no allocator peak counter on CPU)" if peak is None
            else "torch.cuda.max_memory_allocated: weights + grads + AdamW state + activations")
        figures[f"{space}_activations_mib"] = figure(activations / 2**20, "MiB", "tensors saved for backward")
        if space == "latent":
            s.unet, s.x0, s.latent_step_s = unet, x0, seconds[space]
    figures["pixel_over_latent"] = figure(
        seconds["pixel"] / seconds["latent"], "x", f"pixel step time / latent step time (target >= 8); "
        f"the latent step excludes the encoder (f = {s.f}): train_small.py caches latents")
    return figures


def bench_sampling(s):
    """2. DDIM-50 vs DDPM-1000 for one batch, CFG scale 3; U-Net and sampler only (no text encoder, decoder)."""
    B, L, d = s.bc.sample_batch, s.context.shape[1], s.context.shape[2]
    shape = (B, *s.x0.shape[1:])
    context = torch.randn(B, L, d, generator=s.cpu_generator).to(s.device)  # c (B, L, d)
    uncond_context = torch.randn(B, L, d, generator=s.cpu_generator).to(s.device)  # c_u (B, L, d)

    def sample(sampler, schedule, **kwargs):
        with autocast(s.device, enabled=s.precision == "bf16"):
            eps_fn = make_guided_eps(s.unet, schedule, context, uncond_context, guidance_scale=3.0)
            sampler(eps_fn, schedule, shape, generator=s.generator, **kwargs)

    sample(ddim_sample, s.schedule, steps=2)  # warm-up
    repeats = 1 if s.bc.tiny else min(s.bc.repeats, 3)
    ddim = median_time(lambda: sample(ddim_sample, s.schedule, steps=50), s.device, 0, repeats)
    T = s.schedule.T
    if s.bc.quick:  # the same sampler over a shorter schedule: the time per step is the same
        dc = s.diffusion_cfg
        short = NoiseSchedule(make_beta_schedule(dc.schedule, s.bc.ddpm_steps, dc.beta_start, dc.beta_end)).to(s.device)
        ddpm = median_time(lambda: sample(ddpm_sample, short), s.device, 0, 1) * T / s.bc.ddpm_steps
        ddpm_note = f"EXTRAPOLATED: {s.bc.ddpm_steps} steps run, time x {T / s.bc.ddpm_steps:g} (quick)"
    else:
        ddpm = median_time(lambda: sample(ddpm_sample, s.schedule), s.device, 0, 1)
        ddpm_note = f"{T} steps (2000 U-Net calls), one run"
    return {"ddim50_s": figure(ddim, "s", f"{B} latents {tuple(shape[1:])}, CFG 3 (100 U-Net calls), "
                                          f"median of {repeats}"),
            "ddpm1000_s": figure(ddpm, "s", ddpm_note),
            "ddpm_over_ddim": figure(ddpm / ddim, "x", "DDPM-1000 time / DDIM-50 time")}


def max_abs_diff(written_out, fused):
    """max |fused − written-out| in strict fp32 (TF32 off for the check), and the output scale max |out|."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            a, b = written_out().float(), fused().float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return (a - b).abs().max().item(), a.abs().max().item()


def bench_attention(s):
    """3. Written-out vs fused attention: the whole U-Net (same weights), and attention() alone."""
    unet, x0, B = s.unet, s.x0, s.x0.shape[0]
    t = torch.randint(0, s.schedule.T, (B,), generator=s.cpu_generator).to(s.device)
    seconds = {}
    for fused in (False, True):
        unet.set_fused_attention(fused)

        def forward_backward():
            with autocast(s.device, enabled=s.precision == "bf16"):
                out = unet(x0, t, s.context)
            out.float().square().mean().backward()
            unet.zero_grad(set_to_none=True)

        seconds[fused] = median_time(forward_backward, s.device, s.bc.warmup, s.bc.repeats)

    def unet_with(fused):
        unet.set_fused_attention(fused)
        return unet(x0, t, s.context)

    diff, scale = max_abs_diff(lambda: unet_with(False), lambda: unet_with(True))
    # attention() alone, on the largest self-attention of this U-Net: (B, heads, N, d)
    cfg = s.unet_cfg
    level = min(cfg.attention_levels, default=len(cfg.channel_mult) - 1)
    N, width = (x0.shape[-1] // 2**level) ** 2, cfg.model_channels * cfg.channel_mult[level]
    q, k, v = (torch.randn(B, cfg.num_heads, N, width // cfg.num_heads, generator=s.cpu_generator)
               .to(s.device).requires_grad_() for _ in range(3))
    fn_seconds = {}
    for fused in (False, True):
        def attend(fused=fused):
            with autocast(s.device, enabled=s.precision == "bf16"):
                out = attention(q, k, v, fused=fused)
            out.float().sum().backward()

        fn_seconds[fused] = median_time(attend, s.device, s.bc.warmup, s.bc.repeats)
    fn_diff, _ = max_abs_diff(lambda: attention(q, k, v, fused=False), lambda: attention(q, k, v, fused=True))
    qkv = f"q, k, v {tuple(q.shape)}, {s.precision}"
    return {
        "unet_written_attention_s": figure(seconds[False], "s", f"U-Net forward + backward, {s.precision}"),
        "unet_fused_attention_s": figure(seconds[True], "s", "the same with F.scaled_dot_product_attention"),
        "fused_speedup": figure(seconds[False] / seconds[True], "x", "written-out time / fused time (U-Net)"),
        "attention_max_abs_diff": {**figure(diff, "", f"max |fused - written-out| of U-Net outputs, fp32; "
                                                      f"max |output| = {scale:.3g}"), "output_max_abs": scale},
        "attention_fn_written_ms": figure(1e3 * fn_seconds[False], "ms", f"attention() fwd + bwd, {qkv}"),
        "attention_fn_fused_ms": figure(1e3 * fn_seconds[True], "ms", f"attention(fused=True), {qkv}"),
        "attention_fn_max_abs_diff": figure(fn_diff, "", "max |fused - written-out| of attention(), fp32"),
    }


def bench_precision_compile_flops(s):
    """4. bf16 vs fp32 and compiled vs eager (CUDA only); FLOPs, achieved TFLOP/s and MFU (any device)."""
    cuda, figures = s.device.type == "cuda", {}
    if cuda:
        fp32 = measure_training(s.unet, s.unet, s, s.x0, "fp32")[0]
        figures["fp32_step_s"] = figure(fp32, "s", "latent step without autocast (TF32 matmuls, as train_small.py)")
        figures["bf16_step_s"] = figure(s.latent_step_s, "s", "latent step with bf16 autocast (= latent_step_s)")
        figures["bf16_speedup"] = figure(fp32 / s.latent_step_s, "x", "fp32 time / bf16 time")
    else:
        figures.update({name: figure(None, unit, "cuda only")
                        for name, unit in (("fp32_step_s", "s"), ("bf16_step_s", "s"), ("bf16_speedup", "x"))})
    names = (("compile_time_s", "s"), ("compiled_step_s", "s"), ("compile_speedup", "x"))
    reason = "cuda only" if not cuda else "--no-compile" if not s.bc.compile else ""
    if not reason:
        try:
            step, _ = training_step(torch.compile(s.unet), s.unet, s, s.x0, "bf16")
            start = time.perf_counter()
            step()  # the first call compiles forward and backward
            torch.cuda.synchronize(s.device)
            compile_s = time.perf_counter() - start
            compiled = median_time(step, s.device, s.bc.warmup, s.bc.repeats)
            figures["compile_time_s"] = figure(compile_s, "s", "first compiled step; not in compiled_step_s")
            figures["compiled_step_s"] = figure(compiled, "s", "torch.compile(unet), bf16")
            figures["compile_speedup"] = figure(s.latent_step_s / compiled, "x", "eager bf16 time / compiled time")
        except Exception as e:  # a compiler problem must not sink the other figures
            reason = f"torch.compile failed: {e!r}"[:300]
        s.unet.zero_grad(set_to_none=True)
    if reason:
        figures.update({name: figure(None, unit, reason) for name, unit in names})
    flops = count_flops(s.unet, training_step(s.unet, s.unet, s, s.x0, s.precision)[1])
    achieved = flops / s.latent_step_s
    peak = s.peak_flops()
    dtype_name = str(s.peak_flops.dtype).removeprefix("torch.")
    figures["step_gflop"] = figure(flops / 1e9, "GFLOP", "latent step, forward + backward (FlopCounterMode)")
    figures["achieved_tflops"] = figure(achieved / 1e12, "TFLOP/s", f"latent step, {s.precision}, eager")
    figures["matmul_peak_tflops"] = figure(s.peak_flops.matmul / 1e12, "TFLOP/s",
                                           f"measured {s.peak_flops.size}² {dtype_name} matmuls")
    figures["conv_peak_tflops"] = figure(s.peak_flops.conv / 1e12, "TFLOP/s",
                                         f"measured 3x3 {dtype_name} convolutions on {s.peak_flops.conv_shape}")
    figures["mfu"] = figure(achieved / peak, "", "achieved / the faster of the two measured peaks (MFU)")
    return figures


def setup(bc):
    """Resolve `bc` (a BenchConfig) and build the state that every benchmark reads and fills in."""
    device, train_cfg, (_, ae_cfg, unet_cfg, dc) = resolve(bc)
    torch.manual_seed(bc.seed)
    if device.type == "cuda":  # as train_small.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cpu_generator = torch.Generator().manual_seed(bc.seed)  # weights and inputs: drawn on the CPU, then moved
    peak = peak_flops_of(device, bc.tiny, bc.repeats)
    return SimpleNamespace(
        bc=bc, device=device, train_cfg=train_cfg, unet_cfg=unet_cfg, diffusion_cfg=dc, ae_cfg=ae_cfg,
        f=ae_cfg.downsample_factor,
        precision="bf16" if device.type == "cuda" else "fp32", cpu_generator=cpu_generator,
        generator=torch.Generator(device).manual_seed(bc.seed),  # t, ε, x_T in the loss and samplers
        schedule=NoiseSchedule(make_beta_schedule(dc.schedule, dc.T, dc.beta_start, dc.beta_end)).to(device),
        context=torch.randn(bc.batch_size, train_cfg.max_length, train_cfg.text_width,
                            generator=cpu_generator).to(device),  # c (B, L, d)
        baseline=0,  # CUDA bytes allocated before the model being measured was built
        peak_flops=peak,  # () -> FLOP/s, measured at the first call
        unet=None, x0=None, latent_step_s=None,  # the latent U-Net, its x0 and step time, set by section 1
        diffusers_configs={})  # the configs of section 5's diffusers models


def bench_growth(s):
    """6. How cost grows: image size and f, MFU against batch, DDIM steps (benchmarks/growth.py)."""
    return {**bench_size_and_f(s), **bench_mfu_by_batch(s), **bench_ddim_steps(s)}


SECTIONS = {"1": bench_latent_vs_pixel, "2": bench_sampling, "3": bench_attention,
            "4": bench_precision_compile_flops, "5": bench_versus_diffusers, "6": bench_growth,
            "7": bench_cpu_speed}


# ----------------------------------------------------------------------------------------------
# Command line: options, defaults, the table, the JSON

def add_arguments(parser):
    """Add the bench options (the fields of BenchConfig) to an argparse (sub)parser."""
    add = parser.add_argument
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to measure")
    add("--preset", help="train_small.py preset whose U-Net is measured: tiny, cpu or small (default: small on "
                         "CUDA, cpu on CPU; tiny with --tiny)")
    add("--image-size", type=int, help="pixels per side (default: the preset's; 16 with --tiny)")
    add("--batch-size", type=int, help="images per training step (default: the preset's; 2 with --tiny)")
    add("--sample-batch", type=int, help="images per sampling run (default: 64 on CUDA, 16 on CPU; 2 with --tiny)")
    add("--warmup", type=int, help="untimed runs before each timing (default: 3 on CUDA, 1 on CPU and with --tiny)")
    add("--repeats", type=int, help="timed runs, median reported (default: 10 on CUDA, 7 on CPU; 2 with --tiny; "
                                         "at most 3 for the growth table and the samplers)")
    add("--quick", action="store_true", help="run --ddpm-steps DDPM steps and extrapolate the time to 1000")
    add("--ddpm-steps", type=int, default=100, help="DDPM steps actually run with --quick")
    add("--no-compile", dest="compile", action="store_false",
        help="skip the torch.compile figures (section 4 on CUDA, section 7 on a CPU, where compiling takes minutes)")
    add("--tiny", action="store_true", help="tiny U-Net and batch, few repeats, --quick: the whole bench in seconds")
    add("--seed", type=int, default=0, help="seeds weights, inputs and noise")
    add("--out", default="bench.json", help="JSON output path; the plot goes beside it as .png")
    add("--growth-batch", type=int, help="batch of every cell of the growth table (default: 32; 2 with --tiny)")
    add("--fidelity", default="", help="an evaluate JSON with a DDIM sampler sweep (evaluate --samplers "
                                       "ddim10,ddim20,...): its fidelity per step count goes beside section 6")
    add("--sections", default="1,2,3,4,5,6,7", help="comma-separated sections to run; 1 always runs")
    return parser


def resolve(bc):
    """Fill in the None fields of `bc` from the device and the preset, and check every value.
    Returns (device, the preset's TrainConfig, its component configs)."""
    if bc.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {bc.device!r}")
    device = pick_device(bc.device)  # a ValueError for cuda on a machine without one
    cuda = device.type == "cuda"
    if bc.preset is None:
        bc.preset = "tiny" if bc.tiny else "small" if cuda else "cpu"
    train_cfg = preset_config(bc.preset)
    if bc.tiny:  # smaller still than the tiny preset, so that the test runs the whole bench in seconds
        train_cfg.unet_channels, train_cfg.text_width, train_cfg.max_length = 16, 32, 8
        bc.quick, bc.ddpm_steps = True, min(bc.ddpm_steps, 10)
    auto = {"image_size": 16 if bc.tiny else train_cfg.image_size,
            "batch_size": 2 if bc.tiny else train_cfg.batch_size,
            "sample_batch": 2 if bc.tiny else 64 if cuda else 16,
            "warmup": 1 if bc.tiny else 3 if cuda else 1,
            "repeats": 2 if bc.tiny else 10 if cuda else 7,
            "growth_batch": 2 if bc.tiny else 32}
    for name, value in auto.items():
        if getattr(bc, name) is None:
            setattr(bc, name, value)
    for name in ("image_size", "batch_size", "sample_batch", "warmup", "repeats", "ddpm_steps", "growth_batch"):
        if getattr(bc, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(bc, name)}")
    if not Path(bc.out).resolve().parent.is_dir():
        raise ValueError(f"--out {bc.out}: no such folder {Path(bc.out).resolve().parent}")
    if bc.fidelity and not Path(bc.fidelity).is_file():
        raise ValueError(f"--fidelity {bc.fidelity}: no such file (an evaluate JSON with a sampler sweep)")
    chosen = set(bc.sections.replace(" ", "").split(",")) - {""}
    if not chosen <= set(SECTIONS):
        raise ValueError(f"--sections takes numbers among {','.join(SECTIONS)}; got {bc.sections!r}")
    configs = train_small.component_configs(train_cfg, train_cfg.vocab_size)
    _, ae_cfg, unet_cfg, _ = configs
    f = ae_cfg.downsample_factor
    multiple = f * 2 ** (len(unet_cfg.channel_mult) - 1)
    if bc.image_size % multiple:
        raise ValueError(f"image_size must be a multiple of {multiple} (f = {f} times the U-Net's "
                         f"downsampling); got {bc.image_size}")
    return device, train_cfg, configs


def peak_flops_of(device, tiny, repeats):
    """A function that measures the peak (FLOP/s) once, the first time it is called, and then returns it:
    the faster of an (n, n) matmul and a 3×3 convolution, bf16 on CUDA (n = 8192), fp32 on a CPU (n = 2048;
    small sizes with --tiny). Its attributes say what each kernel reached (peak.matmul, peak.conv)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def peak():
        if peak.matmul is None:
            peak.matmul = matmul_peak(device, dtype, peak.size, repeats)
            peak.conv = conv_peak(device, dtype, peak.conv_shape, repeats)
        return max(peak.matmul, peak.conv)

    peak.size = 8192 if cuda else 256 if tiny else 2048
    peak.conv_shape = (64, 512, 32, 32) if cuda else (2, 32, 8, 8) if tiny else (16, 512, 16, 16)
    peak.dtype, peak.matmul, peak.conv = dtype, None, None
    return peak


def cpu_name():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} ({os.cpu_count()} cores)" if names else platform.processor() or platform.machine()


def print_table(figures):
    print(f"{'name':<26} {'value':>11}  {'unit':<8} notes")
    for name, fig in figures.items():
        value = "None" if fig["value"] is None else f"{fig['value']:.4g}"
        print(f"{name:<26} {value:>11}  {fig['unit']:<8} {fig['note']}")


def run(args):
    """Run the chosen sections, print the table, write JSON to args.out (after every section, so a crash
    keeps what was measured), draw bench.png beside it when section 6 ran, and return the results dict."""
    bc = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)})
    s = setup(bc)
    device = s.device
    started = time.perf_counter()
    chosen = {"1"} | set(bc.sections.replace(" ", "").split(","))
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()), "wall_s": None, "sections": [],
        "config": {"bench": asdict(bc), "precision": s.precision, "f": s.f,
                   "training_step": "diffusion_loss forward + backward + AdamW step on the U-Net alone, random "
                                    "context: ε-prediction, t uniform, no context mask (train_small.py: v, 9/10 of t "
                                    "from the noisiest 50 %, masked context: section 7 times that step); the "
                                    "latent step excludes the encoder (train_small.py caches latents)",
                   "peak_memory": "torch.cuda.max_memory_allocated on CUDA; None on CPU",
                   "activations": "bytes of the tensors saved for backward in one forward (any device)"},
        "figures": {},
        "diffusers": diffusers_version(),
        "diffusers_configs": s.diffusers_configs,  # the diffusers models of section 5, as built
    }
    print(f"tinyldm bench: {results['device']} ({device.type}), torch {torch.__version__}, preset {bc.preset}, "
          f"batch {bc.batch_size}, {bc.image_size}x{bc.image_size} images, {s.precision}, "
          f"median of {bc.repeats} after {bc.warmup} warm-up; load average {results['load_average'][0]:.1f}")
    for number, section in SECTIONS.items():
        if number in chosen:
            print(f"section {section.__doc__.splitlines()[0]}", flush=True)
            results["figures"].update(section(s))
            results["sections"].append(number)
            results["wall_s"] = time.perf_counter() - started
            if number == "1":
                results["config"].update(unet=asdict(s.unet_cfg), latent_shape=list(s.x0.shape[1:]),
                                         unet_params_m=sum(p.numel() for p in s.unet.parameters()) / 1e6,
                                         pixel_shape=[3, bc.image_size, bc.image_size],
                                         context_shape=list(s.context.shape))
            Path(bc.out).write_text(json.dumps(results, indent=2, default=str))
    results["load_average_end"] = list(os.getloadavg())
    print_table(results["figures"])
    Path(bc.out).write_text(json.dumps(results, indent=2, default=str))
    png = Path(bc.out).with_suffix(".png")
    if "6" in chosen:
        plot(results, png)
    print(f"wrote {bc.out}" + (f" and {png}" if "6" in chosen else ""))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
