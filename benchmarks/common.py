"""What every benchmark section shares: a figure, a median time, a U-Net with non-zero weights, one training
step of it, the bytes it keeps for backward, its FLOPs, and the measured matmul peak."""

import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tinyldm.__main__ import autocast
from tinyldm.diffusion import diffusion_loss
from tinyldm.unet import UNet


def figure(value, unit, note=""):
    """One benchmark figure; a None value must say why in `note`."""
    return {"value": None if value is None else float(value), "unit": unit, "note": note}


def median_times(fns, device, warmup, repeats):
    """Median wall time (s) of each fn in `fns`, after `warmup` untimed rounds; the fns are timed in
    alternation (A, B, A, B, ...), so a change in the machine's load hits every one of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, kept in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            kept.append(time.perf_counter() - start)
    return [statistics.median(kept) for kept in times]


def median_time(fn, device, warmup, repeats):
    """Median wall time (s) of fn() over `repeats` runs, after `warmup` untimed runs."""
    return median_times([fn], device, warmup, repeats)[0]


def build_unet(cfg, device, generator):
    """A U-Net whose zero-initialised layers get small random weights: a fresh U-Net outputs exactly
    0, which would make any comparison of outputs vacuous (the work per step is the same)."""
    unet = UNet(cfg).to(device)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    return unet


def optimizer_step(module, loss_fn):
    """step(): loss_fn() forward, backward, and one AdamW step on module's parameters."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_step(model, module, s, x0, precision):
    """(step, loss_fn): step() = diffusion_loss forward + backward + AdamW step on x0 and s.context.

    model(x_t, t, c) -> ε̂ is what gets called (e.g. a compiled U-Net); module holds the parameters."""
    def loss_fn():
        with autocast(s.device, enabled=precision == "bf16"):
            return diffusion_loss(model, s.schedule, x0, s.context, generator=s.generator)  # DDPM Eq. 14

    return optimizer_step(module, loss_fn), loss_fn


def saved_activation_bytes(module, loss_fn):
    """Bytes of the tensors autograd saves for backward in one forward pass (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return sum(storages.values())


def measure_training(model, module, s, x0, precision):
    """(median step time s, CUDA peak bytes above what was allocated before or None, activation bytes)."""
    step, loss_fn = training_step(model, module, s, x0, precision)
    activations = saved_activation_bytes(module, loss_fn)
    step()  # allocates the AdamW state
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    seconds = median_time(step, s.device, s.bc.warmup, s.bc.repeats)
    peak = torch.cuda.max_memory_allocated(s.device) - s.baseline if s.device.type == "cuda" else None
    module.zero_grad(set_to_none=True)
    return seconds, peak, activations


def count_flops(unet, loss_fn):
    """FLOPs of one forward + backward (AdamW has no matmuls), counted on the written-out attention:
    FlopCounterMode has no formula for the CPU flash kernel, and the maths is the same."""
    unet.set_fused_attention(False)
    try:
        with FlopCounterMode(display=False) as counter:
            loss_fn().backward()
    finally:
        unet.set_fused_attention(unet.cfg.fused_attention)
        unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device, dtype, n, repeats):
    """Measured matmul throughput (FLOP/s) of (n, n) @ (n, n), 2n³ FLOPs each."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    per_run = 10 if device.type == "cuda" else 1
    seconds = median_time(lambda: [a @ b for _ in range(per_run)], device, 2, repeats)
    return 2 * n**3 * per_run / seconds


def conv_peak(device, dtype, shape, repeats):
    """Measured 3×3 convolution throughput (FLOP/s) on x of `shape` (B, C, H, W), C -> C channels:
    2·B·C·C·9·H·W FLOPs. On a CPU, torch runs convolutions with oneDNN and matmuls with a BLAS; either
    can be the faster of the two, so a peak for the U-Net (mostly convolutions) must measure both."""
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)  # (B, C, H, W)
    w = torch.randn(C, C, 3, 3, device=device, dtype=dtype)  # (C_out, C_in, 3, 3)
    per_run = 10 if device.type == "cuda" else 1
    seconds = median_time(lambda: [F.conv2d(x, w, padding=1) for _ in range(per_run)], device, 2, repeats)
    return 2 * B * C * C * 9 * H * W * per_run / seconds
