"""CPU throughput of the default run: where one stage-3 training step of the preset spends its CPU time,
and what channels_last, torch.compile, the thread count and the batch size change about it.

One step is the body of train_small.train_diffusion's loop, on cached latents: caption dropout, text
encoder τ_θ and U-Net forward with the loss (LatentDiffusion.forward), loss.backward(), clip_grad_norm_,
the AdamW step (two parameter groups, as there) and the EMA update (torch._foreach_lerp_). The model is
built as train_small.main() builds it (component_configs of the preset). Left out: drawing the batch from
the latent cache and the learning-rate schedule (a few µs of Python); autocast is a no-op on a CPU.

  1  profile        torch.profiler over `repeats` steps: share of self CPU time per group of ops, top ops
  2  baseline       median step time of the preset as it is (train_small.py's channels_last setting)
  3  memory order   U-Net and z0 in NCHW (torch's default) and in torch.channels_last (NHWC)
  4  compile        model.unet.compile() as train_small.py --compile: compile time, step time, payback
  5  threads        1 thread vs torch's current count (restored afterwards)
  6  batch size     images per second at B/2, B and 2B
  7  optimizer      AdamW's implementation: one tensor at a time (torch's default on a CPU), foreach
                    (one call per operation for all tensors) and fused (one kernel), same maths

Every time is a median of `repeats` after `warmup` runs; steps 2, 3, 4, 6 and 7 are timed in alternation
(common.median_times), so a change in the machine's load hits every option alike; the thread counts are
timed in a block of their own (switching the count resizes torch's thread pool, which would slow the next
option). The compile time is that of this process: a cold inductor cache takes far longer than a warm one. Every option starts from the
same weights (torch.manual_seed(seed) before each build; the global RNG is restored at the end), the same
inputs (drawn once from s.cpu_generator) and, at every step, the same t, ε and caption dropout (a step
generator re-seeded before each step, as train_small.step_generator re-seeds it). CPU only: on CUDA
every figure is None.
"""

import copy
import time

import torch
from torch.profiler import record_function

import train_small
from benchmarks.common import figure, median_time, median_times  # (not from bench: bench.py imports this module)
from tinyldm.ldm import LatentDiffusion
from tinyldm.text_encoder import BOS, PAD, train_tokenizer

# (figure name, unit), in the order of the table
NAMES = (("profile_convolution_share", ""), ("profile_matmul_share", ""), ("profile_attention_share", ""),
         ("profile_normalisation_share", ""), ("profile_optimizer_share", ""), ("profile_other_share", ""),
         ("profile_top_ops", "ms"), ("stage3_step_s", "s"), ("nchw_step_s", "s"), ("channels_last_step_s", "s"),
         ("channels_last_speedup", "x"), ("compile_cpu_time_s", "s"), ("compiled_cpu_step_s", "s"),
         ("compile_cpu_speedup", "x"), ("compile_cpu_payback_steps", "steps"), ("compile_cpu_net_s_in_run", "s"),
         ("threads_1_step_s", "s"), ("threads_n_step_s", "s"), ("threads_speedup", "x"),
         ("batch_half_images_per_s", "img/s"), ("batch_preset_images_per_s", "img/s"),
         ("batch_double_images_per_s", "img/s"), ("adamw_foreach_step_s", "s"), ("adamw_foreach_speedup", "x"),
         ("adamw_fused_step_s", "s"), ("adamw_fused_speedup", "x"))

# op groups of the profile: the first group with a substring of the lower-case op name wins; the rest is "other"
GROUPS = (
    ("normalisation", ("group_norm", "layer_norm", "groupnorm", "layernorm")),
    ("attention", ("scaled_dot_product", "scaleddotproduct", "flash", "softmax")),
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "bmm", "::mm", "mmbackward", "linear", "matmul")),
    ("optimizer", ("_foreach", "adam", "lerp", "optimizer")),
)
GROUP_NOTES = {
    "convolution": "aten::convolution, mkldnn conv and their backward",
    "matmul": "addmm, mm, bmm, linear, matmul and their backward",
    "attention": "scaled_dot_product*, flash attention, softmax (and backward)",
    "normalisation": "group_norm, layer_norm and their backward",
    "optimizer": "everything inside Optimizer.step / zero_grad, clip_grad_norm_ and the EMA _foreach_lerp_",
    "other": "elementwise ops, copies, reductions, autograd bookkeeping: every op not in a group above",
}


def build_model(s):
    """LatentDiffusion as train_small.main() builds it, with the same weights at every call.

    The tokenizer only gives the [PAD] and [BOS] ids for caption dropout, so a one-word one is trained
    (milliseconds); the text encoder's vocabulary is the preset's vocab_size all the same."""
    cfg = s.train_cfg
    torch.manual_seed(s.bc.seed)
    tokenizer = train_tokenizer(["a"], vocab_size=cfg.vocab_size)
    configs = train_small.component_configs(cfg, cfg.vocab_size)
    return LatentDiffusion(tokenizer, *configs, s.bc.image_size).to(s.device)


def draw_inputs(s, model, batch):
    """A cached-latent batch of `batch` rows: z0 (batch, 4, h, w), ids and mask (batch, L)."""
    z, L, g = model.unet_cfg.in_channels, s.train_cfg.max_length, s.cpu_generator
    side = model.image_size // model.autoencoder_cfg.downsample_factor  # h = w = image_size / f
    z0 = torch.randn(batch, z, side, side, generator=g)                       # (batch, 4, h, w)
    ids = torch.randint(3, s.train_cfg.vocab_size, (batch, L), generator=g)   # (batch, L) words
    lengths = torch.randint(2, L + 1, (batch, 1), generator=g)                # [BOS] + at least one word
    mask = torch.arange(L) < lengths                                          # (batch, L), True = real token
    ids[:, 0] = model.tokenizer.token_to_id(BOS)
    ids[~mask] = model.tokenizer.token_to_id(PAD)
    return z0.to(s.device), ids.to(s.device), mask.to(s.device)


def make_step(s, inputs, batch, channels_last=None, compile=False, adamw=None):
    """step(): one stage-3 training step of a freshly built model on the first `batch` rows of inputs,
    exactly as train_diffusion runs it. channels_last: None = the preset's setting; adamw: None (torch's
    default), "foreach" or "fused"."""
    cfg = s.train_cfg
    channels_last = cfg.channels_last if channels_last is None else channels_last
    model = build_model(s)
    model.autoencoder.requires_grad_(False)
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)  # 4-d weights (convolutions) become NHWC, as train_small.py
    ema = copy.deepcopy(model).requires_grad_(False)
    if compile:
        model.unet.compile()  # in place, as train_small.py --compile
    params = [p for p in model.parameters() if p.requires_grad]  # text encoder + U-Net
    ema_params = [p_ema for p_ema, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99), **({adamw: True} if adamw else {}))
    z0, ids, mask = (x[:batch] for x in inputs)  # (batch, 4, h, w), (batch, L), (batch, L)
    if channels_last:
        z0 = z0.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator(s.device)
    model.train()

    def step():
        generator.manual_seed(s.bc.seed)  # the same caption dropout, t and ε at every step
        loss = model(z0, ids, mask, generator)  # dropout, τ_θ, t, ε, U-Net, MSE (LatentDiffusion.forward)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer: clip_grad_norm_"):  # (labels for the profile's groups)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad(), record_function("optimizer: EMA"):  # θ_ema ← d·θ_ema + (1 − d)·θ
            torch._foreach_lerp_(ema_params, params, 1 - cfg.ema_decay)

    return step


def group_of(event):
    """The group of a profiled op: that of the nearest op, itself or one it runs inside, whose name is in a
    group (AdamW's aten::sqrt counts as optimizer, being inside Optimizer.step); "other" when none is."""
    while event is not None:
        name = event.name.lower()
        group = next((group for group, keys in GROUPS if any(key in name for key in keys)), None)
        if group:
            return group
        event = event.cpu_parent
    return "other"


def profile(s, step):
    """1. Self CPU time per op over `repeats` steps after warm-up: shares per group, and the top 6 ops."""
    for _ in range(s.bc.warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(s.bc.repeats):
            step()
    shares, self_ms = dict.fromkeys(GROUP_NOTES, 0.0), {}
    for event in prof.events():
        ms = event.self_cpu_time_total / 1e3 / s.bc.repeats  # ms per step
        shares[group_of(event)] += ms
        self_ms[event.name] = self_ms.get(event.name, 0.0) + ms
    total = sum(shares.values())
    figures = {f"profile_{group}_share": figure(ms / total, "", f"share of self CPU time: {GROUP_NOTES[group]}")
               for group, ms in shares.items()}
    top = sorted(self_ms.items(), key=lambda item: -item[1])[:6]
    figures["profile_top_ops"] = figure(total, "ms", "profiled step (profiler overhead included); top ops by self "
                                        "CPU ms per step: " + ", ".join(f"{op} {ms:.2f}" for op, ms in top))
    return figures


def compile_figures(s, inputs):
    """4. model.unet.compile(): the first step (compiles forward and backward), then the compiled step and the
    eager one (the preset's), timed in alternation."""
    names = [(name, unit) for name, unit in NAMES if name.startswith(("compile_cpu_", "compiled_cpu_"))]
    if not s.bc.compile:
        return {name: figure(None, unit, "--no-compile") for name, unit in names}
    try:
        step = make_step(s, inputs, s.bc.batch_size, compile=True)
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
        eager, compiled = median_times([make_step(s, inputs, s.bc.batch_size), step], s.device, s.bc.warmup,
                                       s.bc.repeats)
    except Exception as e:  # e.g. no C compiler for inductor: the other figures stand
        return {name: figure(None, unit, f"torch.compile failed: {e!r}"[:300]) for name, unit in names}
    saved, steps = eager - compiled, s.train_cfg.steps
    figures = {
        "compile_cpu_time_s": figure(compile_s, "s", "first step of model.unet.compile()'d model: compiles "
                                                     "forward + backward, and runs the step once"),
        "compiled_cpu_step_s": figure(compiled, "s", f"median step after the first, compiled U-Net, eager text "
                                                     f"encoder; the eager step timed with it: {eager:.4f} s"),
        "compile_cpu_speedup": figure(eager / compiled, "x", "eager step / compiled step, timed in alternation"),
        "compile_cpu_net_s_in_run": figure(saved * steps - compile_s, "s", f"(eager - compiled step) x {steps} "
                                           f"steps - compile_cpu_time_s: > 0 saved, < 0 lost over stage 3"),
    }
    figures["compile_cpu_payback_steps"] = (
        figure(compile_s / saved, "steps", "compile_cpu_time_s / (eager - compiled step)")
        if saved > 0 else figure(None, "steps", "never: the compiled step is not faster than the eager one"))
    return figures


def on_one_thread(step):
    """step() run with torch.set_num_threads(1), the thread count restored afterwards."""
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            step()
        finally:
            torch.set_num_threads(n)
    return run


def working(step):
    """step, or the error it raises on its first call (e.g. an AdamW implementation this torch lacks on a CPU)."""
    try:
        step()
    except RuntimeError as e:
        return e
    return step


def bench_cpu_speed(s):
    """7. CPU throughput of one stage-3 step: profile, channels_last, compile, threads, batch, AdamW (benchmarks/cpu_speed.py)."""
    if s.device.type != "cpu":
        return {name: figure(None, unit, "cpu only") for name, unit in NAMES}
    B, half = s.bc.batch_size, max(1, s.bc.batch_size // 2)
    with torch.random.fork_rng(devices=[]):  # the global RNG as it was, for the sections that follow
        inputs = draw_inputs(s, build_model(s), 2 * B)  # the largest batch; smaller ones are its first rows
        shape = tuple(inputs[0].shape[1:])
        n = torch.get_num_threads()
        what = f"one stage-3 step (text encoder + U-Net fwd/bwd, clip, AdamW, EMA), z0 {shape}, batch {B}"
        layout = "channels_last" if s.train_cfg.channels_last else "nchw"  # what the preset trains with
        figures = profile(s, make_step(s, inputs, B))                                      # 1
        # 2, 3, 6, 7: each option timed in alternation with the others, so a change in load hits all alike
        options = {"nchw": make_step(s, inputs, B, channels_last=False),
                   "channels_last": make_step(s, inputs, B, channels_last=True),
                   "batch_half": make_step(s, inputs, half), "batch_double": make_step(s, inputs, 2 * B),
                   "foreach": working(make_step(s, inputs, B, adamw="foreach")),
                   "fused": working(make_step(s, inputs, B, adamw="fused"))}
        runnable = {name: fn for name, fn in options.items() if callable(fn)}
        times = dict(zip(runnable, median_times(list(runnable.values()), s.device, s.bc.warmup, s.bc.repeats)))
        baseline = times[layout]
        # 5: one thread, timed in a block of its own after the others (switching the thread count resizes
        # torch's thread pool, which slows whatever runs next)
        times["threads_1"] = median_time(on_one_thread(options[layout]), s.device, s.bc.warmup, s.bc.repeats)
        figures["stage3_step_s"] = figure(baseline, "s", f"{what}, {n} thread(s), fp32, {layout} (the preset's)")
        figures["nchw_step_s"] = figure(times["nchw"], "s", "the same step, model and z0 in the default NCHW order")
        figures["channels_last_step_s"] = figure(times["channels_last"], "s", "the same step, U-Net and z0 in channels_last")
        figures["channels_last_speedup"] = figure(times["nchw"] / times["channels_last"], "x",
                                                  "nchw_step_s / channels_last_step_s")
        figures["threads_1_step_s"] = figure(times["threads_1"], "s", "the preset's step with torch.set_num_threads(1)")
        figures["threads_n_step_s"] = figure(baseline, "s", f"the preset's step at torch's thread count, n = {n} "
                                                            f"(= stage3_step_s)")
        figures["threads_speedup"] = figure(times["threads_1"] / baseline, "x", "threads_1_step_s / threads_n_step_s, "
                                            f"n = {n}" + (" (n = 1: nothing to compare)" if n == 1 else ""))
        for name, batch in (("half", half), ("preset", B), ("double", 2 * B)):
            seconds = baseline if batch == B else times[f"batch_{name}"]
            figures[f"batch_{name}_images_per_s"] = figure(batch / seconds, "img/s", f"batch {batch} / step time"
                                                           + (" (= stage3_step_s)" if batch == B else ""))
        for kind in ("foreach", "fused"):
            if kind in times:
                figures[f"adamw_{kind}_step_s"] = figure(times[kind], "s", f"the baseline step with AdamW({kind}=True)")
                figures[f"adamw_{kind}_speedup"] = figure(baseline / times[kind], "x", f"stage3_step_s / adamw_{kind}_step_s")
            else:  # an older torch without this implementation on the CPU
                figures[f"adamw_{kind}_step_s"] = figure(None, "s", f"AdamW({kind}=True) failed: {options[kind]!r}"[:300])
                figures[f"adamw_{kind}_speedup"] = figure(None, "x", "not measured (see the step time)")
        del options, runnable
        figures.update(compile_figures(s, inputs))                               # 4
    return {name: figures[name] for name, _ in NAMES}
