"""Speed and memory benchmarks: `python -m tinyldm bench` (all figures side by side in one process).

  1  latent vs pixel   the same U-Net trained on f = 4 latents (4, H/4, W/4) and on pixels (3, H, W)
  2  samplers          DDIM-50 vs DDPM-1000, classifier-free guidance (two U-Net calls per step)
  3  attention         written-out softmax(QKᵀ/√d)V vs F.scaled_dot_product_attention, same weights
  4  precision, compile, FLOPs   bf16 vs fp32 and torch.compile vs eager (CUDA), TFLOP/s and MFU
  5  diffusers         UNet2DConditionModel of the same size, only if diffusers is installed

Every time is the median of `repeats` runs after `warmup` runs, with torch.cuda.synchronize()
around each run on CUDA. One training step = diffusion_loss forward + backward + AdamW step with
a random text context (B, L, d); the text encoder and the autoencoder are left out (train_small.py
encodes the images once and caches the latents). The U-Net is the one train_small.py builds for
the chosen preset. Each figure is {"value", "unit", "note"}; a value that cannot be measured here
is None and its note says why.
"""

import importlib.util
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tinyldm.diffusion import NoiseSchedule, ddim_sample, ddpm_sample, diffusion_loss, make_beta_schedule
from tinyldm.ldm import DiffusionConfig
from tinyldm.unet import UNet, UNetConfig, attention


@dataclass
class BenchConfig:
    device: str = "auto"        # auto | cpu | cuda
    preset: str = ""            # train_small.py preset whose U-Net is measured; "" = small on CUDA, cpu on CPU
    image_size: int = 0         # pixels per side; 0 = the preset's (32 for cpu, 64 for small)
    batch_size: int = 0         # images per training step; 0 = the preset's
    sample_batch: int = 0       # images per sampling run; 0 = 64 on CUDA, 16 on CPU
    warmup: int = 0             # untimed runs before each measurement; 0 = 3 on CUDA, 1 on CPU
    repeats: int = 0            # timed runs, the median is reported; 0 = 10 on CUDA, 3 on CPU
    quick: bool = False         # DDPM over a T = ddpm_steps schedule, time extrapolated linearly to 1000 steps
    ddpm_steps: int = 100       # DDPM steps actually run with --quick
    compile: bool = True        # measure torch.compile (CUDA only; compiling takes a minute)
    tiny: bool = False          # tiny U-Net, batch 2, 16x16 images, few repeats: the whole bench in seconds
    seed: int = 0               # seeds weights, inputs and noise
    out: str = "bench.json"     # where the JSON goes


def figure(value, unit, note=""):
    """One benchmark figure; None values must say why in `note`."""
    if value is not None and not isinstance(value, int):
        value = float(value)
    return {"value": value, "unit": unit, "note": note}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup, repeats):
    """Median wall time (s) of fn() over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device, precision):
    """bf16 autocast on CUDA (what train_small.py trains with); nothing for fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# ----------------------------------------------------------------------------------------------
# The U-Net of a train_small.py preset, and one training step of it

def load_train_small():
    """The train_small.py module beside the package: its TrainConfig and PRESETS define the U-Net."""
    path = Path(__file__).resolve().parent.parent / "train_small.py"
    if not path.is_file():
        raise FileNotFoundError(f"the bench reads the presets from {path}, which does not exist")
    spec = importlib.util.spec_from_file_location("train_small", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_config(preset):
    """TrainConfig of a preset, exactly as train_small.py fills it in."""
    train_small = load_train_small()
    if preset not in train_small.PRESETS:
        raise ValueError(f"--preset must be one of {sorted(train_small.PRESETS)}; got {preset!r}")
    return train_small.TrainConfig(**train_small.PRESETS[preset], preset=preset)


def unet_config(train_cfg, channels):
    """The UNetConfig train_small.py builds, for `channels` input/output channels (4 latent, 3 pixel)."""
    return UNetConfig(in_channels=channels, out_channels=channels, model_channels=train_cfg.unet_channels,
                      channel_mult=train_cfg.unet_mult, num_res_blocks=train_cfg.unet_res_blocks,
                      attention_levels=train_cfg.unet_attention, num_heads=train_cfg.heads,
                      context_dim=train_cfg.text_width, num_groups=min(32, train_cfg.unet_channels // 4))


def build_unet(cfg, device, generator):
    """A U-Net whose zero-initialised layers get small random weights, so that outputs and gradients
    are not exactly 0 (a fresh U-Net outputs 0, which would make any comparison of outputs vacuous)."""
    unet = UNet(cfg).to(device)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator).to(device))
    return unet


def training_step(model, module, schedule, x0, context, precision, generator):
    """(step, loss_fn): step() = diffusion_loss forward + backward + AdamW step on (x0, context).

    model(x_t, t, c) -> ε̂ is what is called (e.g. a compiled U-Net); module holds the parameters."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def loss_fn():
        with autocast(x0.device, precision):
            return diffusion_loss(model, schedule, x0, context, generator=generator)  # DDPM Eq. 14

    def step():
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, loss_fn


def count_flops(unet, loss_fn):
    """FLOPs of one forward + backward (the AdamW update has no matmuls), counted with the
    written-out attention: FlopCounterMode has no formula for the CPU flash kernel; the maths is the same."""
    fused = [m.fused for m in unet.modules() if hasattr(m, "fused")]
    unet.set_fused_attention(False)
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    for m, flag in zip([m for m in unet.modules() if hasattr(m, "fused")], fused):
        m.fused = flag
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_activation_bytes(module, loss_fn):
    """Bytes of the tensors autograd saves for backward in one forward (parameters excluded)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    del loss
    return sum(storages.values())


def measure_training(model, module, ctx, x0, precision):
    """Median step time (s), peak CUDA memory (bytes or None) and saved activations (bytes) of one step."""
    bc, device = ctx["bc"], ctx["device"]
    step, loss_fn = training_step(model, module, ctx["schedule"], x0, ctx["context"], precision, ctx["generator"])
    activations = saved_activation_bytes(module, loss_fn)
    step()  # allocate the AdamW state before measuring the peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_time(step, device, bc.warmup, bc.repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak, activations, loss_fn


# ----------------------------------------------------------------------------------------------
# The benchmarks; each returns {name: figure}

def bench_latent_vs_pixel(ctx):
    """1. Same U-Net, same batch: f = 4 latents (4, H/f, W/f) vs pixels (3, H, W)."""
    bc, device, precision, B, H = ctx["bc"], ctx["device"], ctx["precision"], ctx["batch"], ctx["image_size"]
    f, figures = ctx["f"], {}
    results = {}
    for space, channels, size in (("latent", 4, H // f), ("pixel", 3, H)):
        unet = build_unet(unet_config(ctx["train_cfg"], channels), device, ctx["cpu_generator"])
        x0 = torch.randn(B, channels, size, size, generator=ctx["cpu_generator"]).to(device)  # (B, C, h, w)
        seconds, peak, activations, loss_fn = measure_training(unet, unet, ctx, x0, precision)
        results[space] = seconds
        shape = f"x0 {tuple(x0.shape)}"
        figures[f"{space}_step_s"] = figure(seconds, "s", f"{shape}, {precision}, median of {bc.repeats}")
        figures[f"{space}_images_per_s"] = figure(B / seconds, "img/s", f"batch {B}")
        figures[f"{space}_peak_memory_mib"] = (
            figure(peak / 2**20, "MiB", "torch.cuda.max_memory_allocated: weights + AdamW state + activations")
            if peak is not None else figure(None, "MiB", "cuda only (CPU has no allocator peak counter)"))
        figures[f"{space}_activations_mib"] = figure(activations / 2**20, "MiB", "tensors saved for backward")
        if space == "latent":
            ctx["latent_unet"], ctx["latent_x0"], ctx["latent_loss_fn"] = unet, x0, loss_fn
            ctx["latent_step_s"] = seconds
        del unet
    figures["pixel_over_latent"] = figure(
        results["pixel"] / results["latent"], "x",
        f"pixel step time / latent step time (target >= 8, LDM paper >= 2.7); latent step excludes the "
        f"encoder because train_small.py caches latents (f = {f})")
    return figures


def bench_sampling(ctx):
    """2. DDIM-50 vs DDPM-1000 with classifier-free guidance, scale 3 (two U-Net calls per step)."""
    bc, device, unet, x0 = ctx["bc"], ctx["device"], ctx["latent_unet"], ctx["latent_x0"]
    B, d, L = bc.sample_batch, ctx["unet_cfg"].context_dim, ctx["context"].shape[1]
    shape = (B, *x0.shape[1:])
    context = torch.randn(B, L, d, generator=ctx["cpu_generator"]).to(device)  # c (B, L, d)
    uncond_context = torch.randn(B, L, d, generator=ctx["cpu_generator"]).to(device)  # c_u (B, L, d)

    def sample(sampler, schedule, **kw):
        with autocast(device, ctx["precision"]):
            sampler(unet, schedule, shape, context, uncond_context, guidance_scale=3.0,
                    generator=ctx["generator"], **kw)

    sample(ddim_sample, ctx["schedule"], steps=2)  # warm-up
    repeats = min(bc.repeats, 3)
    ddim = median_time(lambda: sample(ddim_sample, ctx["schedule"], steps=50), device, 0, repeats)
    T = ctx["schedule"].T
    if bc.quick:
        short = NoiseSchedule(make_beta_schedule("scaled_linear", bc.ddpm_steps, 0.00085, 0.012)).to(device)
        ddpm = median_time(lambda: sample(ddpm_sample, short), device, 0, 1) * T / bc.ddpm_steps
        ddpm_note = f"EXTRAPOLATED: {bc.ddpm_steps} steps run, time x {T / bc.ddpm_steps:g} (--quick)"
    else:
        ddpm = median_time(lambda: sample(ddpm_sample, ctx["schedule"]), device, 0, 1)
        ddpm_note = f"{T} steps, one run"
    return {"ddim50_s": figure(ddim, "s", f"{B} latents {tuple(shape[1:])}, CFG 3 (100 U-Net calls), "
                                          f"median of {repeats}; decoder excluded"),
            "ddpm1000_s": figure(ddpm, "s", ddpm_note),
            "ddpm_over_ddim": figure(ddpm / ddim, "x", "DDPM-1000 time / DDIM-50 time")}


def bench_attention(ctx):
    """3. Written-out vs fused attention: the whole U-Net (same weights), and attention() alone."""
    bc, device, unet, x0 = ctx["bc"], ctx["device"], ctx["latent_unet"], ctx["latent_x0"]
    B, context, g = x0.shape[0], ctx["context"], ctx["cpu_generator"]
    t = torch.randint(0, ctx["schedule"].T, (B,), generator=g).to(device)
    times, outputs = {}, {}
    for fused in (False, True):
        unet.set_fused_attention(fused)

        def forward_backward():
            with autocast(device, ctx["precision"]):
                out = unet(x0, t, context)
            out.float().square().mean().backward()
            unet.zero_grad(set_to_none=True)

        times[fused] = median_time(forward_backward, device, bc.warmup, bc.repeats)
        with torch.no_grad():
            outputs[fused] = unet(x0, t, context).float()  # fp32: a correctness check, not a timing
    diff = (outputs[True] - outputs[False]).abs().max().item()
    reference = outputs[False].abs().max().item()

    # attention() alone, on the largest self-attention of this U-Net: (B, heads, N, d)
    cfg = ctx["unet_cfg"]
    level = min(cfg.attention_levels, default=len(cfg.channel_mult) - 1)
    N = (x0.shape[-1] // 2**level) ** 2
    width = cfg.model_channels * cfg.channel_mult[level]
    q, k, v = (torch.randn(B, cfg.num_heads, N, width // cfg.num_heads, generator=g).to(device).requires_grad_()
               for _ in range(3))
    fn_times, fn_out = {}, {}
    for fused in (False, True):
        def attend():
            with autocast(device, ctx["precision"]):
                out = attention(q, k, v, fused=fused)
            out.float().sum().backward()

        fn_times[fused] = median_time(attend, device, bc.warmup, bc.repeats)
        with torch.no_grad():
            fn_out[fused] = attention(q, k, v, fused=fused)
    shape = f"q, k, v {tuple(q.shape)}"
    return {
        "unet_written_attention_s": figure(times[False], "s", f"U-Net forward + backward, {ctx['precision']}"),
        "unet_fused_attention_s": figure(times[True], "s", "F.scaled_dot_product_attention"),
        "fused_speedup": figure(times[False] / times[True], "x", "written-out time / fused time (U-Net)"),
        "attention_max_abs_diff": {**figure(diff, "", "max |fused - written-out| of U-Net outputs, fp32"),
                                   "reference_max_abs": reference},
        "attention_fn_written_ms": figure(1e3 * fn_times[False], "ms", f"attention() fwd + bwd, {shape}"),
        "attention_fn_fused_ms": figure(1e3 * fn_times[True], "ms", f"attention(fused=True), {shape}"),
        "attention_fn_max_abs_diff": figure((fn_out[True] - fn_out[False]).abs().max().item(), "",
                                            "max |fused - written-out|, fp32"),
    }


def matmul_peak(device, dtype, n, repeats):
    """Measured matmul throughput (FLOP/s) of (n, n) @ (n, n): 2n³ FLOPs each, median of repeats."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    per_run = 10 if device.type == "cuda" else 1
    seconds = median_time(lambda: [a @ b for _ in range(per_run)], device, 2, repeats)
    return 2 * n**3 * per_run / seconds


def bench_precision_compile_flops(ctx):
    """4. bf16 vs fp32, compile vs eager (CUDA only); FLOPs, achieved TFLOP/s and MFU (any device)."""
    bc, device, unet, x0 = ctx["bc"], ctx["device"], ctx["latent_unet"], ctx["latent_x0"]
    cuda = device.type == "cuda"
    figures = {}
    latent_s = ctx["latent_step_s"]
    if cuda:
        fp32_s = measure_training(unet, unet, ctx, x0, "fp32")[0]
        figures["fp32_step_s"] = figure(fp32_s, "s", "latent step without autocast (TF32 matmuls on)")
        figures["bf16_step_s"] = figure(latent_s, "s", "latent step with bf16 autocast (= latent_step_s)")
        figures["bf16_speedup"] = figure(fp32_s / latent_s, "x", "fp32 time / bf16 time")
    else:
        for name, unit in (("fp32_step_s", "s"), ("bf16_step_s", "s"), ("bf16_speedup", "x")):
            figures[name] = figure(None, unit, "cuda only")
    if cuda and bc.compile:
        compiled = torch.compile(unet)
        step, _ = training_step(compiled, unet, ctx["schedule"], x0, ctx["context"], "bf16", ctx["generator"])
        start = time.perf_counter()
        step()  # the first call compiles forward and backward
        synchronize(device)
        compile_s = time.perf_counter() - start
        compiled_s = median_time(step, device, bc.warmup, bc.repeats)
        figures["compile_time_s"] = figure(compile_s, "s", "first compiled step (compile + one step); excluded below")
        figures["compiled_step_s"] = figure(compiled_s, "s", "torch.compile(unet), bf16, median")
        figures["compile_speedup"] = figure(latent_s / compiled_s, "x", "eager bf16 time / compiled time")
    else:
        reason = "cuda only" if not cuda else "--no-compile"
        for name, unit in (("compile_time_s", "s"), ("compiled_step_s", "s"), ("compile_speedup", "x")):
            figures[name] = figure(None, unit, reason)

    flops = count_flops(unet, ctx["latent_loss_fn"])
    achieved = flops / latent_s
    if cuda:
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = (256 if bc.tiny else 2048), torch.float32  # the CPU trains in fp32
    peak = matmul_peak(device, dtype, n, bc.repeats)
    figures["step_gflop"] = figure(flops / 1e9, "GFLOP", "latent step forward + backward (FlopCounterMode)")
    figures["achieved_tflops"] = figure(achieved / 1e12, "TFLOP/s", f"latent step, {ctx['precision']}")
    figures["matmul_peak_tflops"] = figure(peak / 1e12, "TFLOP/s",
                                           f"measured {n}x{n} {str(dtype).replace('torch.', '')} matmul")
    figures["mfu"] = figure(achieved / peak, "", f"achieved / measured {str(dtype).replace('torch.', '')} "
                                                 f"matmul peak" + ("" if cuda else " (CPU: fp32 peak)"))
    return figures


def diffusers_unet(cfg, sample_size):
    """diffusers' UNet2DConditionModel with our widths, blocks, heads and cross-attention width."""
    from diffusers import UNet2DConditionModel

    levels = range(len(cfg.channel_mult))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name: this is the number of heads
        transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.num_groups,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                               for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D"
                             for i in reversed(levels)))


def bench_diffusers(ctx):
    """5. A mainstream U-Net of the same size, trained side by side on the same latents (optional)."""
    names = (("diffusers_step_s", "s"), ("tinyldm_over_diffusers_speed", "x"), ("diffusers_params_m", "M"))
    try:
        import diffusers
    except ImportError:
        return ({name: figure(None, unit, "diffusers not installed") for name, unit in names},
                {"diffusers": None, "reason": "diffusers not installed"})
    x0 = ctx["latent_x0"]
    try:
        model = diffusers_unet(ctx["unet_cfg"], x0.shape[-1]).to(ctx["device"])
        seconds = measure_training(lambda x_t, t, c: model(x_t, t, encoder_hidden_states=c).sample, model,
                                   ctx, x0, ctx["precision"])[0]
    except Exception as e:  # a diffusers API change must not sink the other figures
        return ({name: figure(None, unit, f"diffusers failed: {e!r}") for name, unit in names},
                {"diffusers": diffusers.__version__, "reason": f"failed: {e!r}"})
    params = sum(p.numel() for p in model.parameters())
    return ({"diffusers_step_s": figure(seconds, "s", f"UNet2DConditionModel, diffusers {diffusers.__version__}"),
             "tinyldm_over_diffusers_speed": figure(seconds / ctx["latent_step_s"], "x",
                                                    "diffusers step time / tinyldm step time (> 1: tinyldm faster)"),
             "diffusers_params_m": figure(params / 1e6, "M", "parameters")},
            {"diffusers": diffusers.__version__, "config": dict(model.config)})


# ----------------------------------------------------------------------------------------------
# Command line: options, the table, the JSON

def add_arguments(parser):
    """Add the bench options (the fields of BenchConfig) to an argparse (sub)parser."""
    p = parser.add_argument
    p("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to measure")
    p("--preset", default="", help="train_small.py preset whose U-Net is measured (default: small on CUDA, cpu on CPU)")
    p("--image-size", type=int, default=0, help="pixels per side (default: the preset's)")
    p("--batch-size", type=int, default=0, help="images per training step (default: the preset's)")
    p("--sample-batch", type=int, default=0, help="images per sampling run (default: 64 on CUDA, 16 on CPU)")
    p("--warmup", type=int, default=0, help="untimed runs before each timing (default: 3 on CUDA, 1 on CPU)")
    p("--repeats", type=int, default=0, help="timed runs, median reported (default: 10 on CUDA, 3 on CPU)")
    p("--quick", action="store_true", help="DDPM runs --ddpm-steps steps; its time is extrapolated to 1000")
    p("--ddpm-steps", type=int, default=100, help="DDPM steps actually run with --quick")
    p("--no-compile", dest="compile", action="store_false", help="skip the torch.compile figures (CUDA)")
    p("--tiny", action="store_true", help="tiny U-Net and batch, few repeats: the whole bench in seconds")
    p("--seed", type=int, default=0)
    p("--out", default="bench.json", help="JSON output path")
    return parser


def resolve(bc):
    """Fill in the defaults that depend on the device and the preset; check the values."""
    if bc.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; got {bc.device!r}")
    if bc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given, but torch.cuda.is_available() is False")
    device = torch.device("cuda" if bc.device == "cuda" or (bc.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    bc.preset = bc.preset or ("tiny" if bc.tiny else "small" if cuda else "cpu")
    train_cfg = preset_config(bc.preset)
    if bc.tiny:  # smaller still than the tiny preset: the test runs the whole bench in a few seconds
        train_cfg.unet_channels, train_cfg.text_width, train_cfg.max_length = 16, 32, 8
        bc.image_size, bc.batch_size, bc.sample_batch = bc.image_size or 16, bc.batch_size or 2, bc.sample_batch or 2
        bc.warmup, bc.repeats, bc.quick, bc.ddpm_steps = bc.warmup or 1, bc.repeats or 2, True, min(bc.ddpm_steps, 20)
    bc.image_size = bc.image_size or train_cfg.image_size
    bc.batch_size = bc.batch_size or train_cfg.batch_size
    bc.sample_batch = bc.sample_batch or (64 if cuda else 16)
    bc.warmup = bc.warmup or (3 if cuda else 1)
    bc.repeats = bc.repeats or (10 if cuda else 3)
    f = 2 ** (len(train_cfg.ae_mult) - 1)  # the autoencoder's downsampling factor
    multiple = f * 2 ** (len(train_cfg.unet_mult) - 1)
    for name in ("image_size", "batch_size", "sample_batch", "warmup", "repeats", "ddpm_steps"):
        if getattr(bc, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(bc, name)}")
    if bc.image_size % multiple:
        raise ValueError(f"--image-size must be a multiple of {multiple} (f = {f} times the U-Net's "
                         f"downsampling); got {bc.image_size}")
    return device, train_cfg, f


def print_table(figures):
    print(f"{'name':<30} {'value':>12}  {'unit':<8} notes")
    for name, fig in figures.items():
        value = "None" if fig["value"] is None else f"{fig['value']:.4g}"
        print(f"{name:<30} {value:>12}  {fig['unit']:<8} {fig['note']}")


def run(args):
    """Run every benchmark, print the table, write JSON to args.out and return the results dict."""
    bc = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)})
    device, train_cfg, f = resolve(bc)
    torch.manual_seed(bc.seed)
    if device.type == "cuda":  # as train_small.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    generator = torch.Generator().manual_seed(bc.seed)  # weights and inputs: drawn on the CPU, then moved
    dc = DiffusionConfig()
    schedule = NoiseSchedule(make_beta_schedule(dc.schedule, dc.T, dc.beta_start, dc.beta_end)).to(device)
    B = bc.batch_size
    context = torch.randn(B, train_cfg.max_length, train_cfg.text_width, generator=generator).to(device)  # (B, L, d)
    ctx = {"bc": bc, "device": device, "train_cfg": train_cfg, "unet_cfg": unet_config(train_cfg, 4), "f": f,
           "precision": "bf16" if device.type == "cuda" else "fp32", "batch": B, "image_size": bc.image_size,
           "schedule": schedule, "context": context, "cpu_generator": generator,
           "generator": torch.Generator(device).manual_seed(bc.seed)}  # t, ε and x_T in the loss and samplers
    started = time.perf_counter()
    figures = {}
    figures.update(bench_latent_vs_pixel(ctx))
    figures.update(bench_sampling(ctx))
    figures.update(bench_attention(ctx))
    figures.update(bench_precision_compile_flops(ctx))
    diffusers_figures, diffusers_info = bench_diffusers(ctx)
    figures.update(diffusers_figures)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "config": {"bench": asdict(bc), "preset": bc.preset, "precision": ctx["precision"],
                   "unet": asdict(ctx["unet_cfg"]), "unet_params_m": sum(
                       p.numel() for p in ctx["latent_unet"].parameters()) / 1e6,
                   "latent_shape": list(ctx["latent_x0"].shape[1:]), "pixel_shape": [3, bc.image_size, bc.image_size],
                   "context_shape": list(context.shape), "f": f,
                   "training_step": "diffusion_loss forward + backward + AdamW step, random context; "
                                    "latent step excludes the encoder (train_small.py caches latents)"},
        "figures": figures,
        "comparison": diffusers_info,
    }
    print(f"tinyldm bench on {results['device']} ({device.type}), torch {torch.__version__}, preset {bc.preset}, "
          f"batch {B}, {bc.image_size}x{bc.image_size} images, {ctx['precision']}")
    print_table(figures)
    Path(bc.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {bc.out}")
    return results
