"""A noise-aware classifier p_φ(y | z_t, t) on latents, and classifier guidance with it.

Papers, and the tags the comments use for them
  Guided   Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (Sec. 4, App. F)
  DDPM     Ho, Jain & Abbeel 2020 (the forward process q(x_t | x0), DDPM Eq. 4)
  LDM      Rombach et al. 2022; its code base trains the same kind of classifier on noisy latents

Classifier guidance in four lines
  Bayes' rule p(x_t|y) = p(x_t)·p(y|x_t)/p(y); p(y) does not depend on x_t, so taking ∇_{x_t} log:
      ∇ log p(x_t|y) = ∇ log p(x_t) + ∇ log p(y|x_t)                           # Guided Eq. 12
  The diffusion model gives the first term (its ε is a scaled score: ∇ log p(x_t) = −ε/√(1−ᾱ_t),
  Guided Eq. 11); a classifier trained on noisy inputs gives the second. A scale γ sharpens it:
      ∇ log p(x_t) + γ·∇ log p(y|x_t) = ∇ log [p(x_t)·p(y|x_t)^γ] + const      # Guided Sec. 4.3
  so sampling draws from ∝ p(x)·p(y|x)^γ: γ > 1 trades diversity for samples the classifier is
  surer about. In ε units (what the samplers step with) this is
      ε̂ = ε − γ·√(1−ᾱ_t)·∇_{x_t} log p_φ(y|x_t)                                # Guided Eq. 14
  which `diffusion.classifier_guidance` computes; this file only supplies ∇_{x_t} log p_φ(y|x_t).

Why the classifier must see noisy inputs
  The gradient is taken at x_t at every step of sampling, from pure noise (t = T−1) down to
  nearly clean (t = 0). A classifier trained on clean x0 has never seen anything like x_t for
  large t, and its gradient there is meaningless. So it is trained on x_t = q_sample(x0, t, ε),
  the same forward process the diffusion model is trained on, and it is told t (Guided Sec. 4).
  Its accuracy falls as t grows (less signal is left); `accuracy_by_timestep` shows by how much.

The network is ADM's classifier cut down: the U-Net's encoder half (conv_in, ResBlocks with the
timestep embedding, stride-2 downsampling), then GroupNorm, SiLU, global average pooling and one
linear head per Shapes attribute (ADM pools with attention and has one head). `ResBlock`,
`Downsample` and `timestep_embedding` are imported from unet.py, not rewritten.

Targets (what to guide towards) are one representation throughout: a LongTensor (B, 4) of class
indices in the column order HEADS = (shape, colour, size, position), with −1 for "not specified";
row b is image b's target, so a batch of prompts can ask for different things.

The classifier is an add-on to a trained LatentDiffusion, not one of its components: it lives in its
own files beside the model in a run folder (classifier.json, classifier.pt; `save_classifier`,
`load_classifier`), and reaches the sampler as the gradient function `make_classifier_grad` returns.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyldm.data import ATTRIBUTES, COLOUR_NAMES, POSITIONS, SHAPES, SIZES
from tinyldm.diffusion import draw_t_and_eps
from tinyldm.ldm import RunFolderError, config_from_json, load_state_into, load_weights, read_json, write_atomic
from tinyldm.unet import Downsample, ResBlock, timestep_embedding

HEADS = ATTRIBUTES  # column order of labels and targets: (shape, colour, size, position)
CLASSES = (SHAPES, COLOUR_NAMES, SIZES, POSITIONS)  # the class names of each head, same order


@dataclass
class ClassifierConfig:
    in_channels: int = 4  # channels of the input z_t (the autoencoder's latent channels)
    channels: int = 64  # base width; level i has width channels·channel_mult[i]
    channel_mult: tuple = (1, 2)  # width multiplier per level; every level but the last halves H, W
    num_res_blocks: int = 1  # ResBlocks per level
    num_groups: int = 8  # GroupNorm groups; must divide every width
    time_dim: int = 256  # width of the timestep-embedding MLP (ADM: 4·channels)
    dropout: float = 0.0  # dropout inside the ResBlocks

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # JSON gives lists
        if len(self.channel_mult) == 0 or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        for name in ("in_channels", "channels", "num_res_blocks", "num_groups", "time_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        widths = [self.channels * m for m in self.channel_mult]
        for w in [self.channels] + widths:
            if w % self.num_groups != 0:
                raise ValueError(f"num_groups={self.num_groups} must divide every width "
                                 f"(channels={self.channels}, widths {widths}); it does not divide {w}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LatentClassifier(nn.Module):
    """p_φ(y | z_t, t) for the four Shapes attributes. forward(z_t, t) -> {head: logits (B, K_head)}.

    As in the U-Net, the last conv of every ResBlock starts at zero, so at initialisation the
    network is conv_in → pool → heads, and the ResBlocks switch on after the first update.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.time_embed = nn.Sequential(nn.Linear(ch, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(ch, cfg.channels * mult, cfg.time_dim, cfg.num_groups, cfg.dropout))
                ch = cfg.channels * mult
            if level != len(cfg.channel_mult) - 1:
                self.blocks.append(Downsample(ch))
        self.norm_out = nn.GroupNorm(cfg.num_groups, ch, eps=1e-6)
        self.heads = nn.ModuleDict({name: nn.Linear(ch, len(classes)) for name, classes in zip(HEADS, CLASSES)})

    def forward(self, z_t, t):
        """z_t (B, C, H, W), t a LongTensor (B,) or a python int -> {head: logits (B, K_head)}."""
        if z_t.ndim != 4 or z_t.shape[1] != self.cfg.in_channels:
            raise ValueError(f"z_t must have shape (B, {self.cfg.in_channels}, H, W), got {tuple(z_t.shape)}")
        B, C, H, W = z_t.shape
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(f"H and W must be divisible by 2**(len(channel_mult)-1) = {factor}, got H={H}, W={W}")
        t = torch.as_tensor(t, device=z_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must be an int or have shape ({B},), got shape {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels).to(z_t.dtype))  # (B, time_dim)
        h = self.conv_in(z_t)  # (B, channels, H, W)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # global average pool, (B, C_last)
        return {name: head(h) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------------------------
# Training and evaluation on noisy latents


def _check_labels(labels, B, allow_unspecified):
    """labels/targets must be a LongTensor (B, 4) of valid class indices (−1 allowed for targets)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or tuple(labels.shape) != (B, len(HEADS)):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        dtype = labels.dtype if isinstance(labels, torch.Tensor) else None
        raise ValueError(f"expected a LongTensor of shape ({B}, {len(HEADS)}) in the order {HEADS}; "
                         f"got {got} with dtype {dtype}")
    low = -1 if allow_unspecified else 0
    for k, (name, classes) in enumerate(zip(HEADS, CLASSES)):
        column = labels[:, k]
        if bool(((column < low) | (column >= len(classes))).any()):
            raise ValueError(f"{name} indices must be in {low}..{len(classes) - 1}; got values "
                             f"{sorted(set(column.tolist()))}")


def classifier_loss(classifier, schedule, z0, labels, generator=None, t=None, eps=None):
    """Cross-entropy of the four heads on noisy latents, summed over heads; returns (loss, accuracy).

    t ~ U{0, …, T−1} and ε ~ N(0, I) are drawn as the diffusion loss draws them (diffusion.draw_t_and_eps)
    unless given, and z_t = q_sample(z0, t, ε): the diffusion model's own forward process. labels (B, 4)
    LongTensor, columns HEADS. accuracy: {head: 0-dim tensor}, detached (call .item() to log it; no GPU
    sync here).
    """
    B = z0.shape[0]
    _check_labels(labels, B, allow_unspecified=False)
    labels = labels.to(z0.device)
    t, eps = draw_t_and_eps(schedule, z0, generator, t, eps)  # t ~ U{0, …, T−1} (B,), ε ~ N(0, I)
    z_t = schedule.q_sample(z0, t, eps)  # DDPM Eq. 4: z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε
    logits = classifier(z_t, t)
    loss, accuracy = 0.0, {}
    for k, name in enumerate(HEADS):
        # −log p_φ(y_head | z_t, t), averaged over the batch, summed over heads
        loss = loss + F.cross_entropy(logits[name].float(), labels[:, k])
        accuracy[name] = (logits[name].argmax(dim=-1) == labels[:, k]).float().mean().detach()
    return loss, accuracy


@torch.no_grad()
def accuracy_by_timestep(classifier, schedule, z0, labels, t_bins=10, generator=None, batch_size=256):
    """Per-head accuracy on noisy copies of z0 for t drawn uniformly inside each bin.

    t_bins: an int n (n equal bins over 0..T−1) or increasing edges [e_0, e_1, …, e_n] meaning the
    bins [e_0, e_1), [e_1, e_2), …. Every latent gets one t and one ε per bin. Returns
    {"bins": [(lo, hi), …], "shape": [acc per bin], "colour": …, "size": …, "position": …,
     "all": [share with all four heads right]}; accuracy should fall as t grows.
    """
    T = schedule.T
    edges = (np.linspace(0, T, t_bins + 1).round().astype(int).tolist() if isinstance(t_bins, int)
             else [int(e) for e in t_bins])
    if len(edges) < 2 or edges[0] < 0 or edges[-1] > T or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"t_bins must be a positive int or strictly increasing edges within 0..{T}; got {t_bins!r}")
    N = z0.shape[0]
    _check_labels(labels, N, allow_unspecified=False)
    labels = labels.to(z0.device)
    was_training = classifier.training
    classifier.eval()
    result = {"bins": list(zip(edges[:-1], edges[1:]))}
    result.update({name: [] for name in HEADS + ("all",)})
    for lo, hi in result["bins"]:
        correct = torch.zeros(N, len(HEADS), dtype=torch.bool, device=z0.device)  # (N, 4)
        for start in range(0, N, batch_size):
            z = z0[start:start + batch_size]
            n = z.shape[0]
            t = torch.randint(lo, hi, (n,), generator=generator, device=z0.device)  # t ~ U{lo, …, hi−1}
            eps = torch.randn(z.shape, generator=generator, device=z0.device, dtype=z0.dtype)  # ε ~ N(0, I)
            logits = classifier(schedule.q_sample(z, t, eps), t)  # DDPM Eq. 4
            for k, name in enumerate(HEADS):
                correct[start:start + n, k] = logits[name].argmax(dim=-1) == labels[start:start + n, k]
        for k, name in enumerate(HEADS):
            result[name].append(correct[:, k].float().mean().item())
        result["all"].append(correct.all(dim=1).float().mean().item())
    classifier.train(was_training)
    return result


# ----------------------------------------------------------------------------------------------
# Guidance: log p_φ(y | z_t) and its gradient with respect to z_t


def log_prob(classifier, z_t, t, target):
    """Σ over the heads that target mentions of log p_φ(y_head | z_t, t) (log-softmax), shape (B,).

    target: LongTensor (B, 4) (or (1, 4), used for every image), columns HEADS, −1 = not specified;
    a row with no heads specified has log-probability 0 (and gradient 0: no guidance).
    """
    B = z_t.shape[0]
    if isinstance(target, torch.Tensor) and target.ndim == 2 and target.shape[0] == 1:
        target = target.expand(B, -1)
    _check_labels(target, B, allow_unspecified=True)
    target = target.to(z_t.device)
    logits = classifier(z_t, t)
    dtype = torch.promote_types(z_t.dtype, torch.float32)  # float32 under bf16 autocast, float64 stays
    total = torch.zeros(B, device=z_t.device, dtype=dtype)
    for k, name in enumerate(HEADS):
        y = target[:, k]  # (B,)
        specified = y >= 0
        log_p = F.log_softmax(logits[name].to(dtype), dim=-1)  # log p_φ(y | z_t, t) for every class, (B, K)
        picked = log_p.gather(1, y.clamp(min=0)[:, None])[:, 0]  # log p_φ(y_b | z_t, t), (B,)
        # log p(y|z_t) = Σ_heads log p(y_head|z_t): the heads are treated as independent given z_t
        total = total + torch.where(specified, picked, torch.zeros_like(picked))
    return total


def make_classifier_grad(classifier, target):
    """The `classifier_grad(x_t, t)` the samplers accept: x_t ↦ ∇_{x_t} Σ_b log p_φ(y_b | x_t, t).

    target as in `log_prob`. Each image's log-probability depends only on its own x_t, so the
    gradient of the sum is every image's own gradient. Works with grad on inside a no_grad sampler;
    the result is detached and has x_t's shape. Put the classifier in eval mode first (dropout).
    The conversion to ε units (Guided Eq. 14) is done by diffusion.classifier_guidance, not here.
    """

    def classifier_grad(x_t, t):
        with torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            total = log_prob(classifier, x, t, target).sum()  # Σ_b log p_φ(y_b | x_t, t)
            (grad,) = torch.autograd.grad(total, x)  # ∇_{x_t} Σ_b log p_φ(y_b | x_t, t), (B, C, H, W)
        return grad.detach().to(x_t.dtype)

    return classifier_grad


# ----------------------------------------------------------------------------------------------
# Its own files in a run folder, beside the model's


def save_classifier(classifier, run_dir):
    """Write classifier.json (its config) and classifier.pt (its state dict) into run_dir, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "classifier.json", lambda p: p.write_text(json.dumps(asdict(classifier.cfg), indent=2)))
    write_atomic(run_dir / "classifier.pt", lambda p: torch.save(classifier.state_dict(), p))


def load_classifier(run_dir, map_location="cpu"):
    """The classifier saved in run_dir, in eval mode, or None when the run has none.

    Reads classifier.json and classifier.pt (weights_only). A run folder saved before the classifier
    had its own files keeps it in model.json's "classifier" entry and model.pt's "classifier" state
    dict; that loads too. Move the result with `.to(device)`, as the model. A broken file is a
    RunFolderError naming it, as for the model (`LatentDiffusion.load`).
    """
    run_dir = Path(run_dir)
    if (run_dir / "classifier.json").is_file():
        config_file, weights_file = run_dir / "classifier.json", run_dir / "classifier.pt"
        if not weights_file.is_file():
            raise FileNotFoundError(f"run folder {run_dir} is incomplete: classifier.json without classifier.pt")
        cfg = config_from_json(ClassifierConfig, {"classifier": read_json(config_file)}, "classifier", config_file)
        state = {"classifier": load_weights(weights_file, map_location)}
    else:  # the older layout, inside the model's own files
        config_file, weights_file = run_dir / "model.json", run_dir / "model.pt"
        entries = read_json(config_file) if config_file.is_file() else {}
        if not entries.get("classifier"):
            return None
        cfg = config_from_json(ClassifierConfig, entries, "classifier", config_file)
        state = load_weights(weights_file, map_location)
    try:
        classifier = LatentClassifier(cfg)
    except (ValueError, TypeError, AssertionError) as e:
        raise RunFolderError(f"{config_file}: {e}") from None
    load_state_into(classifier, state, "classifier", weights_file)
    return classifier.eval()


# ----------------------------------------------------------------------------------------------
# From the dataset's ground truth and from attribute names to labels and targets


def labels_from_scenes(scenes, single_object_only=True):
    """(labels (N, 4) LongTensor in HEADS order, indices (N,) LongTensor) from a data.Scenes.

    single_object_only: keep only the one-object images (the classifier's labels are about one
    object); False keeps every image and labels it by its first object.
    """
    keep = np.nonzero(scenes.n_objects == 1)[0] if single_object_only else np.arange(len(scenes))
    columns = [scenes.shape[keep, 0], scenes.colour[keep, 0], scenes.size[keep, 0], scenes.cell[keep, 0]]
    labels = torch.as_tensor(np.stack(columns, axis=1), dtype=torch.long)  # (N, 4)
    return labels, torch.as_tensor(keep, dtype=torch.long)


def classifier_targets(attributes):
    """Attribute names -> targets (B, 4) LongTensor, −1 where an attribute is None or missing.

    attributes: one dict or a list of dicts (one per image), each either an object
    {"shape": "circle", "colour": "red", "size": None, ...} or an evaluate.prompt_set target
    {"objects": [object], ...} with exactly one object. E.g.
    classifier_targets({"colour": "red", "shape": "circle"}) -> tensor([[0, 0, -1, -1]]).
    """
    if isinstance(attributes, dict):
        attributes = [attributes]
    rows = []
    for i, item in enumerate(attributes):
        if not isinstance(item, dict):
            raise ValueError(f"item {i}: expected a dict of attribute names, got {item!r}")
        if "objects" in item:
            if len(item["objects"]) != 1:
                raise ValueError(f"item {i}: the classifier guides single-object targets; "
                                 f"got {len(item['objects'])} objects")
            item = item["objects"][0]
        unknown = set(item) - set(HEADS) - {"cx", "cy"}
        if unknown:
            raise ValueError(f"item {i}: unknown attribute(s) {sorted(unknown)}; expected keys {HEADS}")
        row = []
        for name, classes in zip(HEADS, CLASSES):
            value = item.get(name)
            if value is not None and value not in classes:
                raise ValueError(f"item {i}: {name} {value!r} is not one of {classes}")
            row.append(-1 if value is None else classes.index(value))
        rows.append(row)
    if not rows:
        raise ValueError("expected at least one dict of attributes, got an empty list")
    return torch.tensor(rows, dtype=torch.long)  # (B, 4)
