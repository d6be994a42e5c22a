"""The LDM U-Net ε_θ(z_t, t, τ(y)) with timestep embedding, ResBlocks and cross-attention.

Rombach et al. 2022 ("LDM") condition the denoiser on a caption by cross-attention (LDM
Sec. 3.3, an unnumbered formula; LDM Eq. 3 is the conditional loss it is trained with): the image
features φ(z_t) ask the queries, the text features τ(y) give the keys and values. The layout
follows CompVis `openaimodel.py` + `attention.py`, cut to the parts LDM uses:

    x ─conv_in─► [ResBlock (+SpatialTransformer)]×n, Downsample ─► ... ─► middle ─► ...
      ... ─► [concat skip, ResBlock (+SpatialTransformer)]×(n+1), Upsample ─► GN, SiLU, conv_out

Zero-initialised layers (as in CompVis): the last conv of every ResBlock, the proj_out of every
SpatialTransformer and conv_out. So at initialisation every residual branch is the identity and
the whole U-Net outputs exactly 0; gradient descent switches the branches on.

The modules assert what they assume; `check_unet_config`, at the end of the file, is the full check
with advice, for the code a user calls (LatentDiffusion).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    in_channels: int = 4  # channels of the input z_t (latent channels; 3 for pixel space)
    out_channels: int = 4  # channels of the prediction ε̂ (normally = in_channels)
    model_channels: int = 64  # base width; level i has width model_channels·channel_mult[i]
    channel_mult: tuple = (1, 2, 2)  # width multiplier per resolution level (halving H, W each level)
    num_res_blocks: int = 2  # ResBlocks per level on the way down (the way up has one more)
    attention_levels: tuple = (1, 2)  # indices into channel_mult of levels with a SpatialTransformer
    # after each ResBlock; the middle block always has one
    num_heads: int = 4  # attention heads; head dim = width // num_heads
    transformer_depth: int = 1  # TransformerBlocks inside each SpatialTransformer
    context_dim: int = 128  # feature size d of the text context τ(y) (B, L, d)
    dropout: float = 0.0  # dropout in ResBlocks and feed-forward layers
    num_groups: int = 32  # GroupNorm groups; must divide every width
    fused_attention: bool = True  # True: F.scaled_dot_product_attention; False: written-out softmax(QKᵀ/√d)V
    pooled_context: bool = False  # also add a projection of the mean context vector to the time embedding
    # (a global path for the caption into every ResBlock, as Imagen and SDXL do with a pooled text embedding)
    coord_channels: bool = False  # give conv_in two more input channels, the pixel's x and y in [-1, 1]
    # (CoordConv, Liu et al. 2018): the denoiser knows where each feature is, so "top left" can mean a place
    scale_shift: bool = False  # ResBlocks: the embedding scales and shifts GN₂'s output (AdaGN, Dhariwal & Nichol
    # 2021, §3: y_s·GN(h) + y_b) instead of one shift per channel before it (CompVis's use_scale_shift_norm,
    # off in the LDM configs); with pooled_context the caption can then scale features, not only offset them

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # JSON turns tuples into lists
        self.attention_levels = tuple(int(i) for i in self.attention_levels)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of timesteps (Transformer §3.5, used by DDPM/ADM): t (B,) -> (B, dim).

    With half = dim // 2 and frequencies ω_i = max_period^(−i/half), i = 0..half−1, the embedding is
    [cos(t·ω_0), …, cos(t·ω_{half−1}), sin(t·ω_0), …, sin(t·ω_{half−1})] (the CompVis order), with
    one zero column appended when dim is odd. t may be integer or float (fractional steps are fine).
    """
    # BEGIN ASSIGNMENT 6: the sinusoidal embedding, cos half first
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    omega = torch.exp(-math.log(max_period) * i / half)  # ω_i = max_period^(−i/half)
    args = t.float()[:, None] * omega[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb
    # END ASSIGNMENT 6


def attention_weights(q, k, mask=None):
    """The attention weights (Transformer Eq. 1): softmax(QKᵀ/√d) over the keys, in float32.

    q (B, heads, Lq, d), k (B, heads, Lk, d) -> (B, heads, Lq, Lk), each row sums to 1.
    mask (B, Lk) bool, True = attend, False = ignore (padding tokens). Every row of the mask must
    have at least one True (the tokenizer always emits a begin token): a row of only False makes
    the softmax 0/0, undefined (NaN).

    The text encoder (SelfAttention) and the autoencoder (AttnBlock, fused=False; by default it calls
    F.scaled_dot_product_attention) write attention out again instead of importing this, so that each
    file's assignment stands alone; the written-out paths keep one precision policy: QKᵀ in the input
    dtype, then the scale, the mask and the softmax in float32.
    """
    # BEGIN ASSIGNMENT 5: Transformer Eq. 1, the softmax part, in float32
    d = q.shape[-1]
    logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(d)  # Transformer Eq. 1: QKᵀ/√d, (B, heads, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))  # padding keys get weight exp(−∞) = 0
    return logits.softmax(dim=-1)  # softmax over keys, (B, heads, Lq, Lk)
    # END ASSIGNMENT 5


def attention(q, k, v, mask=None, fused=False):
    """Scaled dot-product attention (Transformer Eq. 1): softmax(QKᵀ/√d)·V.

    q (B, heads, Lq, d), k and v (B, heads, Lk, d) -> (B, heads, Lq, d); mask as in attention_weights.
    fused=True calls F.scaled_dot_product_attention (flash/memory-efficient kernels on GPU);
    fused=False is the written-out reference, with the softmax in float32 for bf16 safety.
    """
    if fused:
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk), broadcasts over heads, Lq
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return attention_weights(q, k, mask).to(v.dtype) @ v  # Transformer Eq. 1: weights·V, (B, heads, Lq, d)


class Attention(nn.Module):
    """Multi-head attention: self-attention when context is None, cross-attention otherwise.

    LDM Sec. 3.3 (unnumbered): Q = W_Q·φ(z_t), K = W_K·τ(y), V = W_V·τ(y). The flag `fused` is read at every
    forward call (UNet.set_fused_attention flips it). With `keep_weights` True (UNet.keep_attention_weights
    sets it), each call also stores its softmax weights in `self.weights`, (B, heads, N, L), for plots.
    """

    def __init__(self, query_dim, context_dim=None, heads=4, fused=True):
        super().__init__()
        self.is_cross = context_dim is not None  # cross-attention: keys and values come from the text
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.fused = fused
        self.keep_weights, self.weights = False, None
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)  # W_Q
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)  # W_K
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)  # W_V
        self.to_out = nn.Linear(query_dim, query_dim)  # W_O, mixes the heads
        assert query_dim % heads == 0, f"num_heads={heads} must divide the width {query_dim}"

    def forward(self, x, context=None, mask=None):
        """x (B, N, C), context (B, L, context_dim) or None, mask (B, L) bool or None -> (B, N, C)."""
        # BEGIN ASSIGNMENT 5: LDM Sec. 3.3 attention with heads; `attention` does the rest
        B, N, C = x.shape
        c = x if context is None else context
        L = c.shape[1]
        d = C // self.heads
        q = self.to_q(x).view(B, N, self.heads, d).transpose(1, 2)  # LDM Sec. 3.3: Q = W_Q·φ(z_t), (B, heads, N, d)
        k = self.to_k(c).view(B, L, self.heads, d).transpose(1, 2)  # LDM Sec. 3.3: K = W_K·τ(y), (B, heads, L, d)
        v = self.to_v(c).view(B, L, self.heads, d).transpose(1, 2)  # LDM Sec. 3.3: V = W_V·τ(y), (B, heads, L, d)
        if self.keep_weights:
            self.weights = attention_weights(q, k, mask).detach()  # (B, heads, N, L), kept for plots
        out = attention(q, k, v, mask=mask, fused=self.fused)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C), heads concatenated
        return self.to_out(out)
        # END ASSIGNMENT 5


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020, "GLU Variants"): (value · GELU(gate))·W_2, 4× hidden width."""

    def __init__(self, dim, dropout=0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * 4 * dim)  # [value, gate] in one matmul
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)  # each (B, N, 4·dim)
        return self.proj_out(self.dropout(value * F.gelu(gate)))  # GEGLU: value ⊙ GELU(gate)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim, dropout=0.0, fused=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, None, heads, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, context_dim, heads, fused)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x, context, mask=None):
        x = x + self.self_attn(self.norm1(x))  # pixels attend to pixels
        x = x + self.cross_attn(self.norm2(x), context, mask)  # LDM Sec. 3.3: pixels attend to the caption
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Runs TransformerBlocks over the H·W positions of a feature map; residual, identity at init."""

    def __init__(self, channels, heads, depth, context_dim, num_groups, dropout=0.0, fused=True):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim, dropout, fused) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)  # zero-init: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))  # (B, C, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C): one token per position
        for block in self.blocks:
            h = block(h, context, mask)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class ResBlock(nn.Module):
    """GN, SiLU, conv3×3; + time embedding per channel; GN, SiLU, dropout, conv3×3 (zero-init); + skip.

    With scale_shift (AdaGN, Dhariwal & Nichol 2021, §3) the time projection gives two numbers per channel,
    W·SiLU(e) = [s, b] (s the first C_out values, b the last), and the embedding enters after GN₂ instead:
    GN₂(h)·(1 + s) + b (y_s = 1 + s, so that s = 0 leaves GN₂'s output as it is).
    """

    def __init__(self, in_channels, out_channels, time_dim, num_groups, dropout=0.0, scale_shift=False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # zero-init: the block starts as its skip path
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        """x (B, C_in, H, W), emb (B, time_dim) -> (B, C_out, H, W)."""
        # BEGIN ASSIGNMENT 6: the ResBlock of the class docstring
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        e = self.time_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, 1, 1), with scale_shift (B, 2·C_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)  # s, b: (B, C_out, 1, 1) each
            h = self.norm2(h) * (1 + scale) + shift  # (B, C_out, H, W)  AdaGN (Guided §3): y_s·GN(h) + y_b
        else:
            h = self.norm2(h + e)  # (B, C_out, H, W)  one shift per channel, then GN₂
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h
        # END ASSIGNMENT 6


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3×3 conv (the autoencoder uses it too; CompVis pads (0,1,0,1) there)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour ×2, then a 3×3 conv (the autoencoder uses it too)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UNet(nn.Module):
    """ε_θ(z_t, t, c): the LDM denoiser. forward(x, t, context, context_mask=None) -> same shape as x."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.num_groups
        time_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.context_embed = nn.Linear(cfg.context_dim, time_dim) if cfg.pooled_context else None
        self.conv_in = nn.Conv2d(cfg.in_channels + 2 * cfg.coord_channels, mc, kernel_size=3, padding=1)

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, time_dim, groups, cfg.dropout, cfg.scale_shift)

        def transformer(c):
            return SpatialTransformer(c, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, groups,
                                      cfg.dropout, cfg.fused_attention)

        # Down path: every block's output is kept for a skip connection (conv_in's output too).
        last = len(cfg.channel_mult) - 1
        ch = mc
        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.down_blocks.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != last:
                self.down_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList([res(ch, ch), transformer(ch), res(ch, ch)])

        # Up path: the mirror image, num_res_blocks + 1 blocks per level, each eats one skip.
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up_blocks.append(nn.ModuleList(layers))

        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero-init (CompVis): the U-Net outputs 0 at init
        nn.init.zeros_(self.conv_out.bias)
        assert all(0 <= i <= last for i in cfg.attention_levels), "attention_levels must index channel_mult"

    def set_fused_attention(self, flag: bool):
        """Switch every Attention between F.scaled_dot_product_attention (True) and the written-out path."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = bool(flag)

    def keep_attention_weights(self, flag: bool):
        """Make every cross-attention layer keep its last weights in `.weights` (B, heads, HW, L), or stop."""
        for m in self.modules():
            if isinstance(m, Attention) and m.is_cross:
                m.keep_weights, m.weights = bool(flag), None

    def kept_attention_weights(self):
        """{layer name: weights (B, heads, HW, L)} of the last call, for every cross-attention layer that keeps
        them (keep_attention_weights); {} when none does."""
        return {name: m.weights for name, m in self.named_modules()
                if isinstance(m, Attention) and m.keep_weights and m.weights is not None}

    @staticmethod
    def _run(layers, h, emb, context, mask):
        """Apply one block's layers; ResBlocks take the time embedding, transformers the context."""
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, mask)
            else:
                h = layer(h)
        return h

    def forward(self, x, t, context, context_mask=None):
        """x (B, in_channels, H, W), t (B,) or one step for all, context (B, L, context_dim), context_mask (B, L)
        bool or 0/1, True = attend -> ε̂ (B, out_channels, H, W)."""
        B, C, H, W = x.shape
        f = 2 ** (len(self.cfg.channel_mult) - 1)  # H and W are halved once per level but the last
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.as_tensor(t, device=x.device).expand(B)  # one step for the whole batch, (B,)
        assert C == self.cfg.in_channels, f"x must have shape (B, {self.cfg.in_channels}, H, W), got {(B, C, H, W)}"
        assert H % f == 0 and W % f == 0, f"H and W must be divisible by 2**(len(channel_mult)-1) = {f}, got {H}×{W}"
        assert context.shape[::2] == (B, self.cfg.context_dim), "context must have shape (B, L, context_dim)"
        assert context_mask is None or context_mask.shape == context.shape[:2], "context_mask must have shape (B, L)"
        assert context_mask is None or not context_mask.is_floating_point(), "context_mask must be bool, True = attend"
        assert t.shape == (B,), f"t must be a number, a 0-d tensor or have shape ({B},), got {tuple(t.shape)}"
        context_mask = None if context_mask is None else context_mask.bool()  # 0/1 masks: nonzero = attend
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 4·mc)
        if self.context_embed is not None:  # + the mean of the context vectors the mask keeps
            keep = torch.ones_like(context[..., 0]) if context_mask is None else context_mask.to(context.dtype)  # (B, L)
            pooled = (context * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)  # (B, d)
            emb = emb + self.context_embed(pooled)  # e = MLP(emb(t)) + W·mean(c), the pooled path   (B, 4·mc)
        if self.cfg.coord_channels:
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype),
                                    torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype), indexing="ij")
            x = torch.cat([x, torch.stack([xs, ys]).expand(B, 2, H, W)], dim=1)  # CoordConv: [x_t, X, Y]   (B, C + 2, H, W)

        h = self.conv_in(x)  # (B, mc, H, W)
        skips = [h]
        for layers in self.down_blocks:
            h = self._run(layers, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)  # (B, C_last, H/f, W/f)
        for layers in self.up_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H', W'): the U-Net skip connection
            h = self._run(layers, h, emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)


# ----------------------------------------------------------------------------------------------
# The full check, for the code a user calls (LatentDiffusion); the modules above only assert


def check_unet_config(cfg: UNetConfig, size: int | None = None):
    """Raise ValueError, with what to change, if `cfg` (and inputs of side `size`) cannot work."""
    for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_heads",
                 "transformer_depth", "context_dim", "num_groups"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if len(cfg.channel_mult) == 0 or min(cfg.channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {cfg.channel_mult}")
    for i in cfg.attention_levels:
        if not 0 <= i < len(cfg.channel_mult):
            raise ValueError(f"attention_levels must index channel_mult (0..{len(cfg.channel_mult) - 1}), "
                             f"got {cfg.attention_levels}")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    for w in [cfg.model_channels] + widths:
        if w % cfg.num_groups != 0:
            raise ValueError(f"num_groups={cfg.num_groups} must divide every width "
                             f"(model_channels={cfg.model_channels}, widths {widths}); it does not divide {w}")
    attention_widths = [widths[i] for i in cfg.attention_levels] + [widths[-1]]  # + the middle block
    for w in attention_widths:
        if w % cfg.num_heads != 0:
            raise ValueError(f"num_heads={cfg.num_heads} must divide the width of every attention level "
                             f"(widths {attention_widths}); it does not divide {w}")
    f = 2 ** (len(cfg.channel_mult) - 1)
    if size is not None and size % f != 0:
        raise ValueError(f"inputs of {size}×{size} cannot pass {len(cfg.channel_mult)} levels: H and W must be "
                         f"divisible by 2**(len(channel_mult)-1) = {f}")
