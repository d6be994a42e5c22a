"""Train tinyldm end to end, from nothing: tokenizer, autoencoder, then text encoder + U-Net.

    python train_small.py                        # preset "auto": "small" on a CUDA GPU, else "cpu"
    python train_small.py --preset tiny          # every stage in under a minute on a laptop CPU
    python train_small.py --data my_images/      # your own images (+ metadata.jsonl) instead of Shapes
    python train_small.py FLAGS --resume         # the same FLAGS: continue an interrupted run where it stopped
    torchrun --nproc_per_node=2 train_small.py   # data parallel over 2 GPUs (or 2 CPU processes)
    python train_small.py --help                 # every setting; any of them can be overridden

Stages, one function each below, each one visible loop; main() at the bottom calls them in order:
  0  data         Shapes (or --data) as one uint8 tensor in memory; a tokenizer trained on its captions
  1  autoencoder  L2 reconstruction (--recon-loss l1: L1) + KL (+ optional patch GAN), validation PSNR,
                  the latent shift and scale (per channel, --latent-norm)
  2  latents      the training set encoded once: posterior mean and log-variance, captions as ids
  3  diffusion    text encoder + U-Net on the ε or v objective, caption dropout, EMA, AdamW, warm-up + cosine
  4  classifier   a noise-aware latent classifier p(y | z_t) for classifier guidance (Shapes only)

This script is the only place that knows about compile, DDP and the training files of a run folder:
  runs/NAME/  model.json  tokenizer.json  model.pt   the trained model (EMA weights): LatentDiffusion.save
              train_config.json  checkpoint.pt (until the run is complete)  log.jsonl  metrics.json
              running.lock (while a process trains the run: a second start is refused)
              loss.png  reconstructions.png  samples_*.png
              classifier.json  classifier.pt  classifier_accuracy.png   the classifier (stage 4): save_classifier
Devices and precision follow tinyldm's one rule (pick_device, autocast in tinyldm/__main__.py).

Randomness: the batch and noise of step s of stage k come from a generator seeded with
(seed, k, s, rank), so a resumed run draws exactly what an uninterrupted run would have drawn.
"""

import argparse
import copy
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from tinyldm.__main__ import autocast, pick_device, save_grid
from tinyldm.autoencoder import (AutoencoderConfig, DiagonalGaussian, PatchDiscriminator, autoencoder_loss,
                                 check_autoencoder_config, discriminator_loss, latent_channel_stats,
                                 latent_scale_factor)
from tinyldm.classifier import (ClassifierConfig, LatentClassifier, accuracy_by_timestep, classifier_loss,
                                labels_from_scenes, save_classifier)
from tinyldm.data import (DataError, ImageFolderDataset, ShapesConfig, ShapesDataset, describe, to_float,
                          to_uint8)
from tinyldm.diffusion import DiffusionConfig
from tinyldm.ldm import LatentDiffusion, write_atomic
from tinyldm.text_encoder import TextEncoderConfig, check_text_encoder_config, tokenize, train_tokenizer
from tinyldm.unet import UNetConfig, check_unet_config


@dataclass
class TrainConfig:
    preset: str = "auto"            # tiny | cpu | small | auto (small on CUDA, else cpu); fields below override it
    name: str = ""                  # run folder is runs_dir/name (default: the preset's name)
    runs_dir: str = "runs"          # where run folders go
    data: str = ""                  # a folder of images + metadata.jsonl; empty = the Shapes dataset
    resume: bool = False            # continue the run in runs_dir/name from its last checkpoint
    overwrite: bool = False         # delete an existing run folder of the same name first
    seed: int = 0                   # seeds the dataset, the weights and every batch
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    compile: bool = False           # torch.compile the U-Net (CUDA; pays off only for long runs; on a CPU, never)
    channels_last: bool = True      # stage 3 on a CPU: U-Net and latents in NHWC memory order (faster: bench.py)
    threads: int = 0                # CPU threads for torch; 0 = the cores not already busy (see cpu_threads)
    # data
    image_size: int = 32            # pixels per side (Shapes: 32 or 64)
    num_train: int = 20000          # Shapes training images
    num_val: int = 1000             # Shapes validation images
    vocab_size: int = 1000          # tokenizer vocabulary, special tokens included
    max_length: int = 24            # tokens per prompt
    p_position: float = 0.8         # Shapes: share of single-object captions that name the position
    two_object_prob: float = 0.25   # Shapes: share of scenes with two objects (captions that bind attributes)
    # stage 1: autoencoder
    ae_channels: int = 16           # base width of encoder/decoder
    ae_mult: tuple = (1, 2)         # width multipliers per level; f = 2^(len-1): f=2, 16x16 latents at 32 px
    ae_steps: int = 800             # training steps
    ae_batch_size: int = 32         # images per step (per process)
    ae_lr: float = 1e-3             # Adam learning rate
    recon_loss: str = "l2"          # reconstruction loss, l2 or l1 (see autoencoder.py)
    latent_norm: str = "channel"    # z0 = (z − μ_c)/σ_c per latent channel ("channel"), or z/σ ("global", CompVis)
    kl_weight: float = 1e-6         # weight of the KL term (LDM's KL-reg autoencoders use 1e-6)
    disc_weight: float = 0.0        # patch-GAN weight (0 = off: the runs train on recon_loss + KL alone)
    disc_start: int = 0             # step from which the GAN term is on
    # stage 3: text encoder + U-Net
    text_width: int = 128           # text encoder width = U-Net context_dim
    text_layers: int = 1            # text transformer blocks
    unet_channels: int = 32         # U-Net base width
    unet_mult: tuple = (1, 2, 2)    # U-Net width multipliers per level
    unet_res_blocks: int = 1        # ResBlocks per level
    unet_attention: tuple = (2,)    # levels with self- and cross-attention (the middle always has it)
    heads: int = 4                  # attention heads (text encoder and U-Net)
    pooled_context: bool = True     # U-Net: the mean text vector joins the time embedding (see unet.py)
    coord_channels: bool = False    # U-Net: x, y coordinate input channels (see unet.py)
    scale_shift: bool = True        # U-Net: the embedding scales and shifts each ResBlock's GN₂ (AdaGN, see unet.py)
    schedule: str = "scaled_linear"  # beta schedule
    prediction: str = "v"           # eps or v (v weights the high-noise steps, where layout is decided)
    p_uncond: float = 0.1           # caption dropout probability (for classifier-free guidance)
    p_noisy_t: float = 0.9          # share of training t drawn from the noisy end (where layout is decided)
    noisy_t_from: float = 0.5       # the noisy end starts at noisy_t_from * T (see diffusion.training_timesteps)
    steps: int = 3540               # U-Net training steps
    batch_size: int = 64            # latents per step (per process)
    lr: float = 1e-3                # AdamW peak learning rate
    warmup: int = 100               # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.01      # AdamW weight decay
    grad_clip: float = 1.0          # max gradient norm
    ema_decay: float = 0.995        # EMA of text encoder + U-Net weights, used for sampling
    # stage 4: noise-aware latent classifier (Shapes only), for classifier guidance
    classifier_steps: int = 400     # training steps (0 = no classifier)
    classifier_channels: int = 32   # classifier base width
    classifier_lr: float = 1e-3     # AdamW learning rate
    # outputs
    log_every: int = 25             # steps between log.jsonl lines (and NaN checks)
    checkpoint_every: int = 200     # steps between checkpoints
    sample_every: int = 1000        # steps between sample grids during training (0 = only at the end)
    sample_steps: int = 50          # DDIM steps for sample grids
    guidance_scale: float = 3.0     # CFG scale for sample grids


PRESETS = {
    "tiny": dict(num_train=512, num_val=64, vocab_size=200, ae_steps=120, text_width=64, text_layers=1,
                 unet_channels=32, steps=260, batch_size=32, warmup=10, ema_decay=0.99, classifier_steps=40,
                 log_every=10, checkpoint_every=50, sample_every=0, sample_steps=10),
    "cpu": dict(),  # the TrainConfig defaults are the CPU preset: 32x32, all stages in 9-15 min on 2 cores (README)
    "small": dict(image_size=64, num_train=50000, num_val=2000, ae_channels=64, ae_mult=(1, 2, 2), ae_steps=3000,
                  ae_batch_size=128, text_width=256, text_layers=4, unet_channels=128, unet_res_blocks=2,
                  unet_mult=(1, 2, 2), unet_attention=(1, 2), heads=8, steps=10000, batch_size=256,
                  lr=3e-4, warmup=500, ema_decay=0.999, classifier_steps=2000, classifier_channels=64,
                  checkpoint_every=1000, sample_every=2500, channels_last=False),
}
# what a train_config.json written before a setting existed meant by leaving it out (the code of its time)
BEFORE_IT_EXISTED = {"scale_shift": False}
# where the run folder is (it may be moved or renamed), how it is watched and how it computes (compile, memory
# order, threads: the last bits only), not what it trains
RESUME_MAY_CHANGE = {"name", "runs_dir", "resume", "overwrite", "device", "compile", "channels_last", "threads",
                     "log_every", "checkpoint_every", "sample_every", "sample_steps", "guidance_scale"}


# ----------------------------------------------------------------------------------------------
# Every setting checked at once, before any file is read, written or deleted

# what each TrainConfig number accepts: (fields, test, what the flag accepts); a NaN fails every test
RANGES = [
    (("ae_steps", "steps", "num_train", "num_val", "ae_batch_size", "batch_size", "log_every", "checkpoint_every",
      "sample_steps", "classifier_channels"), lambda v: v >= 1, "an integer >= 1"),
    (("seed", "warmup", "disc_start", "classifier_steps", "sample_every", "threads"), lambda v: v >= 0,
     "an integer >= 0"),
    (("vocab_size",), lambda v: v >= 4, "an integer >= 4 (3 special tokens and at least one word)"),
    (("max_length",), lambda v: v >= 2, "an integer >= 2 (the start token and at least one word)"),
    (("image_size",), lambda v: v >= 16, "an integer >= 16 (pixels a side)"),
    (("lr", "ae_lr", "classifier_lr", "grad_clip"), lambda v: 0 < v < math.inf, "a finite number > 0"),
    (("weight_decay", "kl_weight", "disc_weight"), lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    (("ema_decay",), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (("p_position", "two_object_prob"), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    (("guidance_scale",), lambda v: -math.inf < v < math.inf, "a finite number"),
    (("latent_norm",), lambda v: v in ("channel", "global"), "channel or global"),
]
# the components' names for the settings they check, as the flags that set them
COMPONENT_FLAGS = {
    "text encoder": {"vocab_size": "--vocab-size", "max_length": "--max-length", "d_model": "--text-width",
                     "n_layers": "--text-layers", "n_heads": "--heads"},
    "autoencoder": {"base_channels": "--ae-channels", "num_groups": "--ae-channels", "channel_mult": "--ae-mult",
                    "recon_loss": "--recon-loss", "kl_weight": "--kl-weight", "disc_weight": "--disc-weight",
                    "disc_start": "--disc-start", "image_size": "--image-size"},
    "U-Net": {"model_channels": "--unet-channels", "num_groups": "--unet-channels", "channel_mult": "--unet-mult",
              "num_res_blocks": "--unet-res-blocks", "attention_levels": "--unet-attention",
              "num_heads": "--heads", "context_dim": "--text-width"},
    "diffusion": {"schedule": "--schedule", "prediction": "--prediction", "p_uncond": "--p-uncond",
                  "p_noisy_t": "--p-noisy-t", "noisy_t_from": "--noisy-t-from"},
}


def flag_of(field):
    """The command-line flag of a TrainConfig field: ae_steps -> --ae-steps."""
    return "--" + field.replace("_", "-")


def check_config(cfg):
    """Raise SystemExit, one line naming the flag and what it accepts, for any setting that cannot work.
    main() calls it first, so that a typo never costs a run folder (not even with --overwrite)."""
    name = cfg.name
    if name in ("", ".", "..") or Path(name).name != name or "/" in name or "\\" in name:
        raise SystemExit(f"--name must be one folder name inside --runs-dir (no /, not . or ..); got {name!r}")
    for names, ok, accepts in RANGES:
        for field in names:
            if not ok(getattr(cfg, field)):
                raise SystemExit(f"{flag_of(field)} must be {accepts}; got {getattr(cfg, field)!r}")
    try:
        device = pick_device(cfg.device)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"no {device}")
    except (RuntimeError, ValueError):  # an unknown name, or a GPU torch does not see
        raise SystemExit(f"--device must be auto, cpu, or cuda / cuda:N where torch.cuda.is_available(); "
                         f"got {cfg.device!r}")
    try:  # the components' own checks, in their words, with each name they use turned into its flag
        component = "diffusion"
        text_cfg, ae_cfg, unet_cfg, diffusion_cfg = component_configs(cfg, cfg.vocab_size)  # checks diffusion
        component = "text encoder"
        check_text_encoder_config(text_cfg)
        component = "autoencoder"
        check_autoencoder_config(ae_cfg, cfg.image_size)
        component = "U-Net"  # its inputs are the latents: the image side over the autoencoder's f
        latent_size = cfg.image_size // ae_cfg.downsample_factor
        unet_f = 2 ** (len(cfg.unet_mult) - 1)
        if latent_size % unet_f:
            raise SystemExit(f"--image-size must be divisible by {ae_cfg.downsample_factor * unet_f} (the "
                             f"autoencoder's f={ae_cfg.downsample_factor} times the U-Net's {unet_f} from "
                             f"--unet-mult); got {cfg.image_size}")
        check_unet_config(unet_cfg, latent_size)
    except ValueError as e:
        raise SystemExit(f"{component}: {in_flags(str(e), COMPONENT_FLAGS[component])}")
    if cfg.sample_steps > diffusion_cfg.T:
        raise SystemExit(f"--sample-steps must be at most the {diffusion_cfg.T} diffusion steps; "
                         f"got {cfg.sample_steps}")


def in_flags(message, names):
    """`message` with each component setting it names written as the flag that sets it."""
    for name, flag in names.items():
        message = re.sub(rf"\b{name}\b", flag, message)
    return message


def parse_args(argv=None):
    """Every TrainConfig field is a flag; a preset fills in the fields the command line leaves."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments()
    for f in fields(TrainConfig):
        flag, defaults = "--" + f.name.replace("_", "-"), _defaults(f)
        text = comments.get(f.name, "") + (f" ({defaults})" if defaults else "")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = (lambda s: tuple(int(v) for v in s.split(","))) if f.type is tuple else f.type
            parser.add_argument(flag, type=kind, default=None, metavar="1,2,2" if f.type is tuple else None,
                                help=text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "small" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        parser.error(f"--preset must be one of tiny, cpu, small, auto; got {preset!r}")
    cfg = TrainConfig(**{**PRESETS[preset], **given, "preset": preset})
    cfg.name = cfg.name or preset
    return cfg


def _field_comments():
    """The comment after each TrainConfig field, for --help (read from this file)."""
    comments = {}
    for line in Path(__file__).read_text().splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def _defaults(field):
    """'default: 3540; tiny: 260, small: 10000': the TrainConfig default (the cpu preset), then each preset
    that sets the field to another value, written as the flag takes it. An empty default is explained
    by the field's comment."""
    def show(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    presets = ", ".join(f"{name}: {show(values[field.name])}" for name, values in PRESETS.items()
                        if values.get(field.name, field.default) != field.default)
    default = f"default: {show(field.default)}" if field.default != "" else ""
    return "; ".join(part for part in (default, presets) if part)


def num_groups(width):
    """GroupNorm groups of a network whose narrowest width is `width`: a quarter of it, at most 32."""
    return min(32, width // 4)


def component_configs(cfg, vocab_size):
    """The configs a TrainConfig makes of the four components: (text encoder, autoencoder, U-Net,
    diffusion). main() builds the model from them; bench.py measures the same U-Net."""
    text_cfg = TextEncoderConfig(vocab_size=vocab_size, max_length=cfg.max_length, d_model=cfg.text_width,
                                 n_layers=cfg.text_layers, n_heads=cfg.heads)
    ae_cfg = AutoencoderConfig(base_channels=cfg.ae_channels, channel_mult=cfg.ae_mult, recon_loss=cfg.recon_loss,
                               num_groups=num_groups(cfg.ae_channels), kl_weight=cfg.kl_weight,
                               disc_weight=cfg.disc_weight, disc_start=cfg.disc_start)
    unet_cfg = UNetConfig(in_channels=ae_cfg.z_channels, out_channels=ae_cfg.z_channels,
                          model_channels=cfg.unet_channels, channel_mult=cfg.unet_mult,
                          num_res_blocks=cfg.unet_res_blocks, attention_levels=cfg.unet_attention,
                          num_heads=cfg.heads, context_dim=cfg.text_width, num_groups=num_groups(cfg.unet_channels),
                          pooled_context=cfg.pooled_context, coord_channels=cfg.coord_channels,
                          scale_shift=cfg.scale_shift)
    diffusion_cfg = DiffusionConfig(schedule=cfg.schedule, prediction=cfg.prediction, p_uncond=cfg.p_uncond,
                                    p_noisy_t=cfg.p_noisy_t, noisy_t_from=cfg.noisy_t_from)
    return text_cfg, ae_cfg, unet_cfg, diffusion_cfg


# ----------------------------------------------------------------------------------------------
# Helpers the stages share: step seeds, learning rate, checkpoints, logs, Ctrl-C, plots

def step_generator(generator, cfg, stage, step, rank):
    """Re-seed `generator` for (stage, step, rank): resumable randomness without saving RNG state."""
    return generator.manual_seed(((cfg.seed * 10 + stage) * 10_000_019 + step) * 1009 + rank)


def learning_rate(step, peak, warmup, total):
    """Linear warm-up to `peak`, then cosine decay to 0 (SGDR, Loshchilov & Hutter 2017)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(run_dir, state):
    try:
        write_atomic(run_dir / "checkpoint.pt", lambda p: torch.save(state, p))
    except RuntimeError as e:  # torch.save on a full disk says "unexpected pos": make it the OSError it is
        raise OSError(errno.ENOSPC if _disk_full(run_dir) else errno.EIO, str(e).splitlines()[0],
                      str(run_dir / "checkpoint.pt")) from e


def _disk_full(folder, margin=16 * 2**20):
    """True when the disk holding `folder` has less than `margin` bytes free."""
    return shutil.disk_usage(folder).free < margin


def cannot_write(run_dir, error, resume):
    """One line for an OSError while writing the run folder: a full disk, a folder that is not writable, or
    what else the system said; the last good checkpoint (write_atomic never leaves half of one) is kept."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT) or (run_dir.exists() and _disk_full(run_dir)):
        why = "the disk is full"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the folder is not writable"
    else:
        why = error.strerror or str(error)
    where = error.filename or run_dir
    kept = "the last good checkpoint is kept; continue with: " + resume if (run_dir / "checkpoint.pt").is_file() \
        else "no checkpoint was written yet"
    return f"cannot write {where}: {why}. Stopping; {kept}"


def save_good_checkpoint(run, state):
    """Write checkpoint.pt, unless a weight or optimiser value in `state` is NaN or inf: a NaN loss between
    two log lines spreads to the weights, and such a checkpoint must never replace the last good one."""
    if not all(torch.isfinite(t).all() for t in _float_tensors(state)):
        raise SystemExit(f"stage {state['stage']}, step {state['step']}: the weights are not finite (NaN or "
                         f"inf), so they were not saved. Stopping; {_last_good(run)}. Lower the learning "
                         "rate and start again.")
    save_checkpoint(run.dir, state)
    run.saved = (state["stage"], state["step"])


def _float_tensors(value):
    """Every floating-point tensor in a (nested) checkpoint state."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in _float_tensors(item)]


def _last_good(run):
    if run.saved is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint, stage {run.saved[0]}, step {run.saved[1]}, is {run.dir / 'checkpoint.pt'}"


def check_finite(loss, stage, step, run):
    """Stop with a clear message on NaN/inf; every checkpoint on disk was checked when it was written."""
    if not math.isfinite(loss):
        raise SystemExit(f"stage {stage}, step {step}: the loss is {loss} (not finite). Stopping; "
                         f"{_last_good(run)}. Lower the learning rate and start again.")


class Log:
    """log.jsonl: one JSON object per line, appended (only rank 0 writes)."""

    def __init__(self, path, enabled, resume_from=None):
        """resume_from: (stage, step) of the checkpoint a resume starts from, (0, 0) without one; the lines
        past it are dropped (that part is trained again), and so is a line torn by a crash mid-write."""
        self.path, self.enabled = path, enabled
        if enabled and resume_from is not None and path.exists():
            keep = [line for line, record in map(self._parse, path.read_text().splitlines())
                    if record is not None and (record["stage"], record["step"]) <= resume_from]
            write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))

    @staticmethod
    def _parse(line):
        try:
            return line, json.loads(line)
        except json.JSONDecodeError:  # the last line, half written when the run was killed
            return line, None

    def __call__(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary, so the checkpoint is exact.
    (Under torchrun, Ctrl-C stops all processes; resume from the last periodic checkpoint.)"""

    def __init__(self, install):
        self.requested = False
        self.on_request = "saving a checkpoint at the end of this step"  # what Ctrl-C does now: true to it
        if install:
            signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nCtrl-C: {self.on_request} (Ctrl-C again to quit now)", file=sys.stderr)

    @staticmethod
    def save_and_exit(run, state):
        if run.main_process:
            save_good_checkpoint(run, state)
        raise SystemExit(f"interrupted at stage {state['stage']}, step {state['step']}: checkpoint saved. "
                         f"Continue with: {run.resume_command}")


LOCK = "running.lock"  # in the run folder while a process trains it: {"pid": ..., "host": ...}


class RunLock:
    """running.lock in the run folder while this process writes to it: a second start of the same run is
    refused, instead of the two interleaving their checkpoints and logs. A lock left by a process that is
    gone (kill -9, a power cut) is taken over; the lock is removed when the run ends, however it ends."""

    def __init__(self, run_dir, enabled):
        self.path = run_dir / LOCK if enabled else None

    def __enter__(self):
        if self.path is None:  # only the process that writes files (rank 0) takes the lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one process wins
            except FileExistsError:
                self._remove_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            return self
        raise SystemExit(f"{self.path.parent} is already running: another process took {self.path} just now.")

    def _remove_if_stale(self):
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), holder["host"]
        except FileNotFoundError:
            return  # its process just ended
        except (ValueError, KeyError, TypeError):  # unreadable: its writer died between open and write
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and os.name == "posix" and not _alive(pid):
            self.path.unlink(missing_ok=True)
            return
        raise SystemExit(f"{self.path.parent} is already running (process {pid} on {host} holds {self.path}). "
                         f"Wait for it to end; if no process trains this run any more, delete {self.path}.")

    def __exit__(self, *exc):
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def resume_command(argv):
    """The command that continues this run: the flags it was started with (so the same settings, the same
    folder), with --resume in place of --overwrite."""
    kept = [a for a in argv if a not in ("--resume", "--no-resume", "--overwrite", "--no-overwrite")]
    return shlex.join(["python", "train_small.py", *kept, "--resume"])


@dataclass
class Run:
    """What every stage reads: the settings, where this process runs, and where the run is written."""
    cfg: TrainConfig
    device: torch.device
    rank: int                   # this process, 0 to world - 1 (0 without torchrun)
    world: int                  # processes in all
    dir: Path                   # the run folder, runs_dir/name
    log: Log
    stop: StopFlag
    generator: torch.Generator  # re-seeded at every step by step_generator
    metrics: dict               # what metrics.json will hold, filled in stage by stage
    resume_command: str         # printed when the run is interrupted
    saved: tuple | None = None  # (stage, step) of checkpoint.pt, None while there is none

    @property
    def main_process(self):
        return self.rank == 0  # the only process that writes files

    def parallel(self, module):
        """The module to train: wrapped in DDP under torchrun (it averages gradients), else itself."""
        return DDP(module, broadcast_buffers=False) if self.world > 1 else module


@dataclass
class Latents:
    """Stage 2's cache: the posterior q(z|x) of every training image, and its caption as token ids."""
    mean: torch.Tensor    # (N, z, h, w)
    logvar: torch.Tensor  # (N, z, h, w)
    ids: torch.Tensor     # (N, L)
    mask: torch.Tensor    # (N, L)

    def sample_z0(self, idx, model, generator):
        """A fresh z0 = (z − shift)·scale, z ~ q(z|x) = N(μ, σ²), for cached images idx (each epoch sees
        new latents)."""
        posterior = DiagonalGaussian(self.mean[idx], self.logvar[idx])      # (B, z, h, w) each
        return model.normalize_latents(posterior.sample(generator))        # VAE reparametrisation; LDM Sec. 4.3.2


def fmt_latent(value):
    """A latent shift or scale for the console: one number, or one per channel."""
    return f"{value:.4f}" if isinstance(value, float) else "(" + ", ".join(f"{v:.3f}" for v in value) + ")"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(run_dir, cfg):
    """loss.png: the logged losses of stages 1 and 3, each titled with what it is."""
    plt = _pyplot()
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    ae_loss = f"{cfg.recon_loss.upper()} + KL" + (" + GAN" if cfg.disc_weight > 0 else "")
    for ax, stage, title in ((axes[0], 1, f"stage 1: autoencoder ({ae_loss})"),
                             (axes[1], 3, f"stage 3: diffusion loss ({cfg.prediction} MSE)")):
        rows = [r for r in records if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set(title=title, xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=80)
    plt.close(fig)


def plot_classifier_accuracy(by_t, path):
    plt = _pyplot()
    centres = [(lo + hi) / 2 for lo, hi in by_t["bins"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("shape", "colour", "size", "position", "all"):
        ax.plot(centres, by_t[name], "o-", label=name)
    ax.set(xlabel="timestep t", ylabel="accuracy on noisy validation latents", ylim=(0, 1.02),
           title="latent classifier p(y | z_t)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


SAMPLE_PROMPTS = [describe("circle", "red", "large", "top left"), describe("square", "blue", "small", "center"),
                  describe("triangle", "green", "large", "bottom right"), describe("cross", "yellow", "small", "left"),
                  describe("circle", "purple", "large", "bottom"), describe("triangle", "cyan"),
                  describe("triangle", "red", "large"), describe("circle", "blue", "large", "right"),
                  "a red circle left of a blue square", "a big green cross above a small purple triangle"]


def prompts_for(cfg, train_set):
    """The prompts of the sample grids: SAMPLE_PROMPTS on Shapes, the first captions of --data."""
    return train_set.captions[:8] if cfg.data else SAMPLE_PROMPTS


def save_samples(model, prompts, path, cfg, device, per_prompt=4):
    generator = torch.Generator(device).manual_seed(cfg.seed)
    with autocast(device):
        images = model.generate([p for p in prompts for _ in range(per_prompt)], steps=cfg.sample_steps,
                                guidance_scale=cfg.guidance_scale, generator=generator)
    titles = [p if i % per_prompt == 0 else "" for p in prompts for i in range(per_prompt)]
    save_grid(to_uint8(images), titles, path, cols=2 * per_prompt)


# ----------------------------------------------------------------------------------------------
# The run folder: check it before anything is trained, write it once the data and configs are good

def open_run_folder(cfg, run_dir, device):
    """The checkpoint to continue from (None: a fresh start), once --resume, --overwrite and what is
    already in run_dir agree; a clear error where they do not. Writes nothing."""
    if not cfg.resume:
        if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()) and not cfg.overwrite:
            raise SystemExit(f"{run_dir} already exists. Use --resume to continue it, --name to start "
                             "another run, or --overwrite to replace it.")
        return None
    if not (run_dir / "train_config.json").is_file():
        raise SystemExit(f"--resume: {run_dir} holds no run to resume (no train_config.json)")
    saved = {**BEFORE_IT_EXISTED, **json.loads((run_dir / "train_config.json").read_text())}
    now = json.loads(json.dumps(asdict(cfg)))
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k])
    if changed:
        raise SystemExit(f"--resume: {run_dir} was made with other settings: "
                         + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in changed))
    if (run_dir / "checkpoint.pt").is_file():
        return torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)
    if (run_dir / "model.pt").is_file() and (run_dir / "metrics.json").is_file():  # save_run got to its end
        print(f"--resume: {run_dir} is finished (model.pt, metrics.json): nothing left to train. Sample it with "
              f"python -m tinyldm sample --run {run_dir} \"a red circle\", or train it again with --overwrite.")
        raise SystemExit(0)
    return None  # killed before its first checkpoint: it starts again from step 0


def start_run_folder(cfg, run_dir, tokenizer):
    """(Re)make run_dir with the settings and the tokenizer: the first files of a run."""
    if cfg.overwrite and run_dir.exists() and not cfg.resume:  # all but our lock
        for path in run_dir.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "train_config.json", lambda p: p.write_text(json.dumps(asdict(cfg), indent=2)))
    write_atomic(run_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)))


# ----------------------------------------------------------------------------------------------
# The stages, in the order main() runs them

def load_data(cfg, device):
    """Stage 0: (train_set, val_set, train_images (N, 3, H, W) uint8 on device, val_images); val_set is
    None for --data, whose first 256 training images then stand in for validation."""
    try:
        if cfg.data:
            train_set, val_set = ImageFolderDataset(cfg.data, cfg.image_size), None
        else:
            shapes = ShapesConfig(image_size=cfg.image_size, num_train=cfg.num_train, num_val=cfg.num_val,
                                  seed=cfg.seed, p_position=cfg.p_position,
                                  two_object_prob=cfg.two_object_prob)
            train_set, val_set = ShapesDataset(shapes, "train"), ShapesDataset(shapes, "val")
        train_images = train_set.images_uint8().to(device)                # (N, 3, H, W) uint8
        val_images = (val_set.images_uint8() if val_set else train_images[:256].cpu()).to(device)
    except DataError as e:
        raise SystemExit(f"--data: {e}")
    return train_set, val_set, train_images, val_images


def resume_autoencoder(run, model, opt, disc, disc_opt, checkpoint):
    """The step stage 1 starts from: 0 fresh; mid-stage, the saved weights and optimiser states; past
    stage 1, cfg.ae_steps (nothing left to train) with the saved weights and scale factor."""
    if checkpoint is None:
        return 0
    model.autoencoder.load_state_dict(checkpoint["autoencoder"])
    if checkpoint["stage"] > 1:
        model.scale_factor = checkpoint["scale_factor"]
        model.latent_shift = checkpoint.get("latent_shift", 0.0)
        return run.cfg.ae_steps
    opt.load_state_dict(checkpoint["ae_opt"])
    if disc:
        disc.load_state_dict(checkpoint["discriminator"])
        disc_opt.load_state_dict(checkpoint["disc_opt"])
    return checkpoint["step"]


def train_autoencoder(run, model, train_images, val_images, checkpoint):
    """Stage 1: the autoencoder (reconstruction + KL, optional patch GAN); then its validation PSNR and
    the latent shift and scale, into run.metrics, model.latent_shift and model.scale_factor."""
    cfg, device, timer = run.cfg, run.device, time.time()
    ae, ae_cfg = model.autoencoder, model.autoencoder_cfg
    ae_train = run.parallel(ae)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.ae_lr, betas=(0.5, 0.9))  # CompVis' betas
    disc = PatchDiscriminator(3, ae_cfg.disc_channels, ae_cfg.disc_layers).to(device) if cfg.disc_weight > 0 else None
    disc_train = run.parallel(disc) if disc else None
    disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.ae_lr, betas=(0.5, 0.9)) if disc else None
    start = resume_autoencoder(run, model, opt, disc, disc_opt, checkpoint)

    def state(step):  # a stage-1 checkpoint
        return {"stage": 1, "step": step, "autoencoder": ae.state_dict(), "ae_opt": opt.state_dict(),
                **({"discriminator": disc.state_dict(), "disc_opt": disc_opt.state_dict()} if disc else {})}

    bar = tqdm(range(start, cfg.ae_steps), desc="stage 1: autoencoder", disable=not run.main_process,
               initial=start, total=cfg.ae_steps)
    ae.train()
    for step in bar:
        if run.stop.requested:
            run.stop.save_and_exit(run, state(step))
        # 1. batch: images drawn with the generator of (stage 1, step, rank)
        generator = step_generator(run.generator, cfg, 1, step, run.rank)
        idx = torch.randint(len(train_images), (cfg.ae_batch_size,), generator=generator, device=device)
        x = to_float(train_images[idx])                                   # (B, 3, H, W) in [-1, 1]
        # 2. learning rate: warm-up over the first 5 % of the steps, then cosine
        lr = learning_rate(step, cfg.ae_lr, cfg.ae_steps // 20, cfg.ae_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        # 3. forward, backward, update: reconstruction + KL (+ GAN), autoencoder.py
        with autocast(device):
            loss, parts, x_hat = autoencoder_loss(ae_train, x, step, disc_train, generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # 4. the discriminator's own step (hinge loss), once the GAN term is on
        if disc is not None and step >= cfg.disc_start:
            with autocast(device):
                d_loss = discriminator_loss(disc_train, x, x_hat)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        # 5. log, checkpoint
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.ae_steps:
            value = loss.item()
            check_finite(value, 1, step, run)
            parts = {k: float(v) for k, v in parts.items()}
            run.log(stage=1, step=step + 1, loss=value, lr=lr, **parts)
            bar.set_postfix(loss=f"{value:.4f}", rec=f"{parts['rec']:.4f}")
        if run.main_process and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.ae_steps:
            check_finite(loss.item(), 1, step, run)
            save_good_checkpoint(run, state(step + 1))
    bar.close()

    # validation PSNR, written out: evaluate.psnr's 10·log10(1/MSE) rounds differently in the last digit
    ae.eval()
    with torch.no_grad(), autocast(device):
        recon = torch.cat([ae(to_float(val_images[i:i + 256]), sample_posterior=False)[0]
                           for i in range(0, len(val_images), 256)]).float().clamp(-1, 1)
    mse = ((recon - to_float(val_images)) / 2).pow(2).flatten(1).mean(1)       # per image, [0, 1] range
    run.metrics["autoencoder_psnr_db"] = float((-10 * torch.log10(mse.clamp(min=1e-10))).mean())
    if start < cfg.ae_steps:  # a fresh stage 1: shift and scale from a first batch of latents (scale_by_std)
        with torch.no_grad(), autocast(device):
            z = ae.encode(to_float(train_images[:512])).sample(step_generator(run.generator, cfg, 2, 0, 0))
        if cfg.latent_norm == "channel":  # z0 = (z − μ_c) / σ_c per channel
            model.latent_shift, model.scale_factor = latent_channel_stats(z.float())
        else:                             # z0 = z / σ, one σ over all values
            model.latent_shift, model.scale_factor = 0.0, latent_scale_factor(z.float())
    run.metrics["scale_factor"], run.metrics["latent_shift"] = model.scale_factor, model.latent_shift
    run.metrics["time_autoencoder_s"] = time.time() - timer
    if run.main_process:
        print(f"autoencoder: validation PSNR {run.metrics['autoencoder_psnr_db']:.2f} dB, "
              f"latent shift {fmt_latent(model.latent_shift)}, scale {fmt_latent(model.scale_factor)}")
        pairs = torch.stack([val_images[:16].cpu(), to_uint8(recon[:16]).cpu()], 1).flatten(0, 1)  # (32, 3, H, W)
        save_grid(pairs, ["original", "reconstruction"] * 16, run.dir / "reconstructions.png", cols=8)


def encode_training_set(run, model, train_images, captions, tokenizer):
    """Stage 2: encode every training image once, q(z|x) = N(μ, σ²), and tokenize every caption."""
    timer = time.time()
    with torch.no_grad(), autocast(run.device):
        posteriors = [model.autoencoder.encode(to_float(train_images[i:i + 512]))
                      for i in range(0, len(train_images), 512)]
    mean = torch.cat([p.mean for p in posteriors]).float()                    # (N, z, h, w)
    logvar = torch.cat([p.logvar for p in posteriors]).float()                # (N, z, h, w)
    del posteriors
    ids, mask = tokenize(tokenizer, captions, run.cfg.max_length)
    latents = Latents(mean, logvar, ids.to(run.device), mask.to(run.device))  # ids, mask (N, L)
    run.metrics["time_latents_s"] = time.time() - timer
    return latents


def resume_diffusion(model, ema, opt, checkpoint):
    """The step stage 3 starts from: 0 unless the checkpoint is a stage-3 one, whose weights, EMA weights
    and optimiser state it then restores."""
    if checkpoint is None or checkpoint["stage"] != 3:
        return 0
    for name in ("text_encoder", "unet"):
        getattr(model, name).load_state_dict(checkpoint[name])
        getattr(ema, name).load_state_dict(checkpoint["ema_" + name])
    opt.load_state_dict(checkpoint["opt"])
    return checkpoint["step"]


def train_diffusion(run, model, latents, prompts, checkpoint):
    """Stage 3: text encoder + U-Net on the cached latents (the autoencoder stays frozen). Returns the EMA
    copy of the model, the one that is sampled from and saved."""
    cfg, device, timer = run.cfg, run.device, time.time()
    model.autoencoder.requires_grad_(False)
    nhwc = cfg.channels_last and device.type == "cpu"  # measured on a CPU only (bench.py section 7)
    if nhwc:  # NHWC: oneDNN's convolutions skip a reorder per call (same maths, last bits differ)
        model.unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)  # its text encoder and U-Net follow the EMA
    denoiser = run.parallel(model)  # forward() = the loss on latents (ldm.py)
    if cfg.compile:
        model.unet.compile()  # in place: state_dict keys stay the same
    params = [p for p in model.parameters() if p.requires_grad]  # text encoder + U-Net
    ema_params = [p_ema for p_ema, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]  # same order
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99))  # no decay on biases and norms (GPT-2 practice)
    start = resume_diffusion(model, ema, opt, checkpoint)
    if start and "final_loss" in checkpoint:  # the loss of the last step, were it already trained
        run.metrics["final_loss"] = checkpoint["final_loss"]

    def state(step):  # a stage-3 checkpoint: all a resume needs, stage 1's result included
        return {"stage": 3, "step": step, "autoencoder": model.autoencoder.state_dict(),
                "scale_factor": model.scale_factor, "latent_shift": model.latent_shift,
                "text_encoder": model.text_encoder.state_dict(),
                "unet": model.unet.state_dict(), "ema_text_encoder": ema.text_encoder.state_dict(),
                "ema_unet": ema.unet.state_dict(), "opt": opt.state_dict(),
                **({"final_loss": run.metrics["final_loss"]} if "final_loss" in run.metrics else {})}

    if run.main_process and start == 0:
        save_good_checkpoint(run, state(0))  # from here on, stage 1 is never trained again
    bar = tqdm(range(start, cfg.steps), desc="stage 3: diffusion", disable=not run.main_process,
               initial=start, total=cfg.steps)
    model.train()
    for step in bar:
        if run.stop.requested:
            run.stop.save_and_exit(run, state(step))
        # 1. batch: cached images drawn with the generator of (stage 3, step, rank), a fresh z0 of each
        generator = step_generator(run.generator, cfg, 3, step, run.rank)
        idx = torch.randint(len(latents.mean), (cfg.batch_size,), generator=generator, device=device)
        z0 = latents.sample_z0(idx, model, generator)                           # (B, z, h, w)
        if nhwc:
            z0 = z0.contiguous(memory_format=torch.channels_last)               # (B, z, h, w) in NHWC order
        # 2. learning rate: linear warm-up, then cosine
        lr = learning_rate(step, cfg.lr, cfg.warmup, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        # 3. forward, backward, update: caption dropout, t, ε, the ε or v MSE (LatentDiffusion.forward)
        with autocast(device):
            loss = denoiser(z0, latents.ids[idx], latents.mask[idx], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        # 4. EMA: θ_ema ← d·θ_ema + (1 − d)·θ, with d warming up from 0.1
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - d)  # one fused call for every tensor
        # 5. log, checkpoint, samples
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            value = loss.item()
            check_finite(value, 3, step, run)
            run.log(stage=3, step=step + 1, loss=value, lr=lr)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}")
            run.metrics["final_loss"] = value
        if run.main_process and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            check_finite(loss.item(), 3, step, run)
            save_good_checkpoint(run, state(step + 1))
        if run.main_process and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < cfg.steps:
            save_samples(ema, prompts, run.dir / f"samples_{step + 1:06d}.png", cfg, device)
    bar.close()
    run.metrics["time_diffusion_s"] = time.time() - timer
    if run.main_process:  # stage 3 is done: a resume from here on only redoes stage 4 (it is short)
        save_good_checkpoint(run, state(cfg.steps))
    return ema


def train_classifier(run, model, latents, train_set, val_set, val_images):
    """Stage 4 (Shapes only): a noise-aware latent classifier p(y | z_t) on the single-object images, for
    classifier guidance; then its accuracy on noisy validation latents by timestep. Saves it beside the model."""
    cfg, device, timer = run.cfg, run.device, time.time()
    labels, keep = labels_from_scenes(train_set.scenes)                 # single-object images only
    labels, keep = labels.to(device), keep.to(device)                   # (M, 4) shape, colour, size, position
    classifier = LatentClassifier(ClassifierConfig(in_channels=model.autoencoder_cfg.z_channels,
                                                   channels=cfg.classifier_channels,
                                                   num_groups=num_groups(cfg.classifier_channels))).to(device)
    classifier_train = run.parallel(classifier)
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.classifier_lr)
    run.stop.on_request = "stopping at the end of this step; --resume trains stage 4 again from its start"
    bar = tqdm(range(cfg.classifier_steps), desc="stage 4: classifier", disable=not run.main_process)
    for step in bar:
        if run.stop.requested:
            raise SystemExit(f"interrupted in stage 4 (stages 1-3 are saved in checkpoint.pt): "
                             f"continue with: {run.resume_command}")
        # 1. batch: single-object images drawn with the generator of (stage 4, step, rank), a fresh z0 of each
        generator = step_generator(run.generator, cfg, 4, step, run.rank)
        j = torch.randint(len(keep), (cfg.batch_size,), generator=generator, device=device)
        z0 = latents.sample_z0(keep[j], model, generator)                      # (B, z, h, w)
        # 2. learning rate: warm-up over the first 5 % of the steps, then cosine
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg.classifier_lr, cfg.classifier_steps // 20, cfg.classifier_steps)
        # 3. forward, backward, update: cross-entropy of each head on z_t = q_sample(z0, t, ε)
        with autocast(device):
            loss, accuracy = classifier_loss(classifier_train, model.schedule, z0, labels[j], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # 4. log
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.classifier_steps:
            value = loss.item()
            check_finite(value, 4, step, run)
            run.log(stage=4, step=step + 1, loss=value, **{k: float(v) for k, v in accuracy.items()})
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()

    # accuracy on noisy validation latents, by timestep: it falls as t grows
    val_labels, val_keep = labels_from_scenes(val_set.scenes)
    with torch.no_grad(), autocast(device):
        z_val = model.normalize_latents(torch.cat([model.autoencoder.encode(to_float(val_images[chunk.to(device)])).mode()
                                                   for chunk in val_keep.split(512)]).float())  # (M, z, h, w)
        by_t = accuracy_by_timestep(classifier, model.schedule, z_val, val_labels.to(device), t_bins=10,
                                    generator=step_generator(run.generator, cfg, 4, cfg.classifier_steps, 0))
    run.metrics["classifier_accuracy_by_t"] = by_t
    run.metrics["time_classifier_s"] = time.time() - timer
    if run.main_process:
        save_classifier(classifier, run.dir)  # classifier.json + classifier.pt, beside the model
        plot_classifier_accuracy(by_t, run.dir / "classifier_accuracy.png")


def save_run(run, model, prompts):
    """The end: the trained model, a last sample grid, the loss plot and metrics.json; no checkpoint."""
    if not run.main_process:
        return
    run.stop.on_request = ("finishing: saving the model, the samples and metrics.json, and then the run "
                           "is complete; --resume after a second Ctrl-C saves them again")
    model.save(run.dir)
    timer = time.time()
    save_samples(model, prompts, run.dir / "samples_final.png", run.cfg, run.device)
    run.metrics["time_samples_s"] = time.time() - timer
    run.metrics["time_total_s"] = sum(v for k, v in run.metrics.items() if k.startswith("time_"))
    plot_losses(run.dir, run.cfg)
    write_atomic(run.dir / "metrics.json", lambda p: p.write_text(json.dumps(run.metrics, indent=2)))
    (run.dir / "checkpoint.pt").unlink(missing_ok=True)  # complete: model.pt holds the result
    print(json.dumps({k: v for k, v in run.metrics.items() if k != "classifier_accuracy_by_t"}, indent=2))
    print(f"done: {run.dir}   sample with: python -m tinyldm sample --run {run.dir} \"a red circle\"")


# ----------------------------------------------------------------------------------------------

def busy_cores(seconds=0.25):
    """How many cores other processes keep busy now: from /proc/stat over `seconds` on Linux, less what this
    process's own threads use meanwhile; elsewhere the 1-minute load average (which lags by about a minute)."""
    def idle_and_total():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]  # the "cpu" line: user nice system idle iowait ...
        return values[3] + values[4], sum(values)

    try:
        idle0, total0 = idle_and_total()
        own0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(seconds)
        idle1, total1 = idle_and_total()
        own = (time.process_time() - own0) / (time.perf_counter() - wall0)  # our own threads, still spinning
        cores = len(os.sched_getaffinity(0))
        return max(0.0, cores * (1 - (idle1 - idle0) / max(1, total1 - total0)) - own)
    except (OSError, AttributeError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cpu_threads(requested, processes=1):
    """torch's CPU threads: `requested`, or with 0 the cores that other processes leave free (at least 1),
    shared among this machine's `processes` training processes (torchrun's LOCAL_WORLD_SIZE): they start
    together, so each sees every core free.
    torch's default, one thread per core, spin-waits when another process holds a core: on this project's
    2-core machine with one other process spinning, the tiny preset (60 + 60 steps) took 190 s with 2
    threads and 29 s with 1; idle, 19 s with 2 and 29 s with 1 (README)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = min(cores, cores - int(busy_cores() + 0.25))  # a core counts as taken when >= 75 % busy
    return max(1, free // processes)


def main(argv=None):
    from_command_line = argv is None  # a caller in this process (tests, a notebook) keeps its thread setting
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    check_config(cfg)  # every setting, before anything is written or deleted
    # 1. devices and processes (torchrun sets WORLD_SIZE, RANK and LOCAL_RANK)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and (cfg.threads or from_command_line):  # process-wide: only when asked, or ours
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine (torchrun)
        torch.set_num_threads(cpu_threads(cfg.threads, local))  # (other thread counts may change the last bits)
    torch.manual_seed(cfg.seed)  # the initial weights (identical on every rank)

    # 2. the run folder: a checkpoint to continue from, or a clear error, before any work
    run_dir = Path(cfg.runs_dir) / cfg.name
    checkpoint = open_run_folder(cfg, run_dir, device)

    # 3. stage 0: the data, a tokenizer trained on its captions, the model
    metrics, timer = {"device": str(device), "torch": torch.__version__, "world_size": world}, time.time()
    train_set, val_set, train_images, val_images = load_data(cfg, device)
    tokenizer = train_tokenizer(train_set.captions, vocab_size=cfg.vocab_size)
    metrics["time_data_s"] = time.time() - timer
    model = LatentDiffusion(tokenizer, *component_configs(cfg, tokenizer.get_vocab_size()), cfg.image_size)
    model = model.to(device)

    # 4. only now, with data and configs known to be good, touch the run folder
    try:
        with RunLock(run_dir, enabled=rank == 0):  # a second start of this run is refused
            saved = (checkpoint["stage"], checkpoint["step"]) if checkpoint else None
            resume_point = (saved or (0, 0)) if cfg.resume else None  # a resume drops the log past its checkpoint
            run = Run(cfg, device, rank, world, run_dir, log=Log(run_dir / "log.jsonl", rank == 0, resume_point),
                      stop=StopFlag(install=world == 1), generator=torch.Generator(device), metrics=metrics,
                      resume_command=resume_command(argv), saved=saved)
            if run.main_process:
                start_run_folder(cfg, run_dir, tokenizer)
            prompts = prompts_for(cfg, train_set)

            # 5. the stages, each one loop
            train_autoencoder(run, model, train_images, val_images, checkpoint)                     # stage 1
            latents = encode_training_set(run, model, train_images, train_set.captions, tokenizer)  # stage 2
            ema = train_diffusion(run, model, latents, prompts, checkpoint)                         # stage 3
            if cfg.classifier_steps and not cfg.data:                                               # stage 4
                train_classifier(run, model, latents, train_set, val_set, val_images)

            # 6. save the EMA model, sample, plot
            save_run(run, ema, prompts)
            if world > 1:
                dist.barrier()
                dist.destroy_process_group()
    except OSError as e:  # a full disk or a folder that is not writable: one line, the good checkpoint kept
        raise SystemExit(cannot_write(run_dir, e, resume_command(argv))) from None


if __name__ == "__main__":
    main()
