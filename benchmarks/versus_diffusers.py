"""tinyldm against diffusers, side by side in one process: the library a practitioner would otherwise use.

    pip install -r requirements-bench.txt     # diffusers: a benchmark extra, never needed by tinyldm
    python bench.py                           # section 5 runs when diffusers is importable

1. U-Net: tinyldm's UNet against UNet2DConditionModel built to the same widths, levels, ResBlocks per
   level, heads, attention levels, GroupNorm groups and context size (the pooled-context path maps to
   diffusers' class_embed_type="simple_projection", one Linear, fed the mean context vector; scale_shift to
   resnet_time_scale_shift="scale_shift"). Both get the same weights' shapes, not the same values; the
   parameter counts are reported side by side.
   Training step (diffusion_loss forward + backward + AdamW) and inference forward (no grad).
2. Autoencoder: tinyldm's Autoencoder against AutoencoderKL of the same widths, levels, blocks, groups
   and latent channels. Training step (L_rec + KL, LDM Eq. 25 without the GAN: forward + backward + AdamW)
   and inference (encode to the posterior mean, decode; no grad).
3. DDIM loop: 50 DDIM steps with CFG of tinyldm's U-Net driven by tinyldm's ddim_sample, by diffusers'
   DDIMScheduler, and the same 50 guided U-Net calls with no sampler at all: the sampler's own cost is
   the difference. A correctness check first: tinyldm's ddim_step on diffusers' timesteps gives
   diffusers' x_{t_prev} (same betas).

Each pair is timed in alternation (A, B, A, B, ...: common.median_times) and the medians compared, so a
change in the machine's load hits both sides. fp32 on the CPU, bf16 autocast on CUDA (the project's one precision rule).
"""

import torch

from benchmarks.common import build_unet, figure, median_times, optimizer_step, training_step
from tinyldm.__main__ import autocast
from tinyldm.autoencoder import Autoencoder, autoencoder_loss
from tinyldm.diffusion import ddim_sample, ddim_timesteps, make_guided_eps

NAMES = {  # figure name -> unit
    "unet_params_tinyldm_m": "M", "unet_params_diffusers_m": "M",
    "unet_train_step_tinyldm_s": "s", "unet_train_step_diffusers_s": "s", "unet_train_ratio": "x",
    "unet_forward_tinyldm_s": "s", "unet_forward_diffusers_s": "s", "unet_forward_ratio": "x",
    "ae_params_tinyldm_m": "M", "ae_params_diffusers_m": "M",
    "ae_train_step_tinyldm_s": "s", "ae_train_step_diffusers_s": "s", "ae_train_ratio": "x",
    "ae_forward_tinyldm_s": "s", "ae_forward_diffusers_s": "s", "ae_forward_ratio": "x",
    "ddim_loop_max_rel_diff": "", "ddim_unet_calls_s": "s", "ddim_loop_tinyldm_s": "s",
    "ddim_loop_diffusers_s": "s", "ddim_overhead_tinyldm_ms_per_step": "ms",
    "ddim_overhead_diffusers_ms_per_step": "ms", "ddim_loop_ratio": "x",
}


def millions(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


def side_by_side(part, ours, theirs, train, infer, train_what, infer_what, their_name):
    """The eight figures of one model compared: parameters, training step and inference, each with tinyldm's
    and diffusers' value and the ratio diffusers time / tinyldm time (>= 1: tinyldm as fast or faster)."""
    ratio = "diffusers time / tinyldm time (>= 1: tinyldm as fast or faster)"
    return {
        f"{part}_params_tinyldm_m": figure(millions(ours), "M", f"tinyldm {type(ours).__name__} parameters"),
        f"{part}_params_diffusers_m": figure(millions(theirs), "M", f"{their_name} parameters, same config"),
        f"{part}_train_step_tinyldm_s": figure(train[0], "s", train_what),
        f"{part}_train_step_diffusers_s": figure(train[1], "s", f"the same step with {their_name}"),
        f"{part}_train_ratio": figure(train[1] / train[0], "x", ratio),
        f"{part}_forward_tinyldm_s": figure(infer[0], "s", infer_what),
        f"{part}_forward_diffusers_s": figure(infer[1], "s", f"the same with {their_name}"),
        f"{part}_forward_ratio": figure(infer[1] / infer[0], "x", ratio),
    }


def diffusers_unet(diffusers, cfg, size, device):
    """UNet2DConditionModel with tinyldm's UNetConfig `cfg`, for inputs of side `size`."""
    levels = range(len(cfg.channel_mult))
    return diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name: this is the number of heads
        transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.num_groups,
        class_embed_type="simple_projection" if cfg.pooled_context else None,
        projection_class_embeddings_input_dim=cfg.context_dim if cfg.pooled_context else None,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default",
        down_block_types=tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                               for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D"
                             for i in reversed(levels))).to(device)


def diffusers_autoencoder(diffusers, cfg, size, device):
    """AutoencoderKL with tinyldm's AutoencoderConfig `cfg`, for images of side `size`."""
    n = len(cfg.channel_mult)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.z_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.num_groups, sample_size=size,
        mid_block_add_attention=cfg.mid_attention).to(device)


def compare_unets(s, diffusers):
    """1. The U-Net: training step and inference forward, tinyldm vs diffusers, same inputs."""
    cfg, x0, context = s.unet_cfg, s.x0, s.context
    ours = build_unet(cfg, s.device, s.cpu_generator)
    theirs = diffusers_unet(diffusers, cfg, x0.shape[-1], s.device)
    s.diffusers_configs["unet"] = dict(theirs.config)
    pooled = cfg.pooled_context

    def theirs_fn(x_t, t, c):  # ε̂ = their U-Net(x_t, t, c), the pooled context as their "class" input
        return theirs(x_t, t, encoder_hidden_states=c, class_labels=c.mean(1) if pooled else None).sample

    step_ours, _ = training_step(ours, ours, s, x0, s.precision)
    step_theirs, _ = training_step(theirs_fn, theirs, s, x0, s.precision)
    train = median_times([step_ours, step_theirs], s.device, s.bc.warmup, s.bc.repeats)
    t = torch.randint(0, s.schedule.T, (x0.shape[0],), generator=s.cpu_generator).to(s.device)

    @torch.no_grad()
    def forward(fn):
        with autocast(s.device, enabled=s.precision == "bf16"):
            fn(x0, t, context)

    infer = median_times([lambda: forward(ours), lambda: forward(theirs_fn)], s.device, s.bc.warmup, s.bc.repeats)
    what = f"x0 {tuple(x0.shape)}, context {tuple(context.shape)}, {s.precision}"
    return side_by_side("unet", ours, theirs, train, infer, f"diffusion_loss fwd + bwd + AdamW, {what}",
                        f"one forward, no grad, {what}", "UNet2DConditionModel")


def compare_autoencoders(s, diffusers):
    """2. The autoencoder: training step (L_rec + KL) and inference (encode → mean → decode)."""
    cfg, size = s.ae_cfg, s.bc.image_size
    B = 2 if s.bc.tiny else s.train_cfg.ae_batch_size
    x = (2 * torch.rand(B, cfg.in_channels, size, size, generator=s.cpu_generator) - 1).to(s.device)  # (B, 3, H, W)
    ours = Autoencoder(cfg).to(s.device)
    theirs = diffusers_autoencoder(diffusers, cfg, size, s.device)
    s.diffusers_configs["autoencoder"] = dict(theirs.config)

    def loss_theirs():  # LDM Eq. 25 without the GAN, per pixel value, as autoencoder_loss
        posterior = theirs.encode(x).latent_dist
        x_hat = theirs.decode(posterior.sample(generator=s.generator)).sample
        return (x - x_hat).pow(2).mean() + cfg.kl_weight * posterior.kl().mean() / x[0].numel()

    def loss_ours():
        return autoencoder_loss(ours, x, 0, generator=s.generator)[0]

    def with_precision(loss_fn):  # bf16 autocast on CUDA, as train_small.py
        def loss():
            with autocast(s.device, enabled=s.precision == "bf16"):
                return loss_fn()
        return loss

    train = median_times([optimizer_step(ours, with_precision(loss_ours)),
                          optimizer_step(theirs, with_precision(loss_theirs))], s.device, s.bc.warmup, s.bc.repeats)

    @torch.no_grad()
    def reconstruct_ours():
        with autocast(s.device, enabled=s.precision == "bf16"):
            ours.decode(ours.encode(x).mode())

    @torch.no_grad()
    def reconstruct_theirs():
        with autocast(s.device, enabled=s.precision == "bf16"):
            theirs.decode(theirs.encode(x).latent_dist.mode())

    infer = median_times([reconstruct_ours, reconstruct_theirs], s.device, s.bc.warmup, s.bc.repeats)
    what = f"images {tuple(x.shape)}, f = {cfg.downsample_factor}, {s.precision}"
    return side_by_side("ae", ours, theirs, train, infer, f"L_rec + KL fwd + bwd + AdamW, {what}",
                        f"encode → posterior mean → decode, no grad, {what}; mid attention: SDPA on both sides",
                        "AutoencoderKL")


def compare_ddim(s, diffusers, steps=50):
    """3. The DDIM loop: tinyldm's sampler, diffusers' scheduler and the bare U-Net calls, same U-Net."""
    B = s.bc.sample_batch
    L, d = s.context.shape[1:]
    shape = (B, *s.x0.shape[1:])
    context, uncond = (torch.randn(B, L, d, generator=s.cpu_generator).to(s.device) for _ in range(2))  # c, c_u (B, L, d)
    eps_fn = make_guided_eps(s.unet, s.schedule, context, uncond, guidance_scale=3.0)  # 2 U-Net calls per step
    x_T = torch.randn(shape, generator=s.cpu_generator).to(s.device)  # (B, C, h, w)
    # "trailing" spacing: 999, 979, ..., 19, each step going to t − T/steps and the last to ᾱ = 1, as tinyldm's
    # own loop starts at T − 1 and ends on the data (its steps are spaced 999/49 apart instead of 20)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=s.schedule.T, trained_betas=s.schedule.betas.cpu().numpy(),
                                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                        prediction_type="epsilon")

    @torch.no_grad()
    def loop_theirs():
        with autocast(s.device, enabled=s.precision == "bf16"):
            scheduler.set_timesteps(steps)  # on the CPU: no device sync for the step's integers
            x_t = x_T
            for t in scheduler.timesteps.tolist():
                x_t = scheduler.step(eps_fn(x_t, t), t, x_t).prev_sample  # DDIM Eq. 12, diffusers' code
            return x_t

    # 1. the check: tinyldm's ddim_step along diffusers' timesteps, the whole loop, from the same x_T
    with torch.no_grad(), autocast(s.device, enabled=s.precision == "bf16"):
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.tolist()
        x_t = x_T
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1  # −1: the last step lands on the data
            x_t = s.schedule.ddim_step(x_t, t, t_prev, eps_fn(x_t, t))  # DDIM Eq. 12, tinyldm's code
        theirs = loop_theirs()
        worst = ((x_t - theirs).abs().max() / theirs.abs().max()).item()  # relative to the output's scale

    # 2. the times: the same 2·steps guided U-Net calls alone, tinyldm's sampler, diffusers' loop
    ours_timesteps = ddim_timesteps(s.schedule.T, steps)

    @torch.no_grad()
    def unet_calls():  # the network work alone: the same guided calls, no update of x
        with autocast(s.device, enabled=s.precision == "bf16"):
            for t in ours_timesteps:
                eps_fn(x_T, t)

    def loop_ours():
        with autocast(s.device, enabled=s.precision == "bf16"):
            ddim_sample(eps_fn, s.schedule, shape, steps=steps, x_T=x_T)

    calls, ours_s, theirs_s = median_times([unet_calls, loop_ours, loop_theirs], s.device, 1, s.bc.repeats)
    what = f"{B} latents {tuple(shape[1:])}, CFG 3: {2 * steps} U-Net calls"
    return {
        "ddim_loop_max_rel_diff": figure(worst, "", f"max |x0 of tinyldm's ddim_step − x0 of DDIMScheduler.step| / "
                                                    f"max |x0| over a whole {steps}-step loop on diffusers' timesteps, "
                                                    f"same x_T and U-Net (the same maths: float rounding only)"),
        "ddim_unet_calls_s": figure(calls, "s", f"the U-Net calls alone, {what}"),
        "ddim_loop_tinyldm_s": figure(ours_s, "s", f"tinyldm ddim_sample, {steps} steps, {what}"),
        "ddim_loop_diffusers_s": figure(theirs_s, "s", f"DDIMScheduler, {steps} steps, the same U-Net and CFG"),
        "ddim_overhead_tinyldm_ms_per_step": figure(1e3 * (ours_s - calls) / steps, "ms",
                                                    "(tinyldm loop − U-Net calls) / steps: the sampler's own cost"),
        "ddim_overhead_diffusers_ms_per_step": figure(1e3 * (theirs_s - calls) / steps, "ms",
                                                      "(diffusers loop − U-Net calls) / steps"),
        "ddim_loop_ratio": figure(theirs_s / ours_s, "x", "diffusers loop time / tinyldm loop time"),
    }


def diffusers_version():
    """diffusers' version string, or None when it is not installed."""
    try:
        import diffusers
    except Exception:  # not installed, or an install that does not import with this torch
        return None
    return diffusers.__version__


def bench_versus_diffusers(s):
    """5. tinyldm against diffusers at equal size: U-Net, autoencoder, DDIM loop (None when not installed)"""
    try:
        import diffusers
    except Exception:  # not installed, or an install that does not import with this torch
        return {name: figure(None, unit, "diffusers not installed: pip install -r requirements-bench.txt")
                for name, unit in NAMES.items()}
    figures = {}
    for part, prefix in ((compare_unets, "unet_"), (compare_autoencoders, "ae_"), (compare_ddim, "ddim_")):
        try:
            figures.update(part(s, diffusers))
        except Exception as e:  # a diffusers API change must not sink the other figures
            names = [name for name in NAMES if name.startswith(prefix)]
            figures.update({name: figure(None, NAMES[name], f"diffusers {diffusers.__version__} failed: {e!r}"[:300])
                            for name in names})
    return figures
