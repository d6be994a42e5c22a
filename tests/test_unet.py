"""Tests for tinyldm/unet.py: timestep embedding, attention, cross-attention wiring, shapes, config."""

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from tinyldm.unet import (Attention, FeedForward, ResBlock, SpatialTransformer, UNet, UNetConfig, attention,
                          attention_weights, check_unet_config, timestep_embedding)


def tiny_config(**overrides):
    """A U-Net small enough for CPU tests: 16x16 inputs, widths 16/32, GroupNorm with 8 groups."""
    kw = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
              attention_levels=(1,), num_heads=2, transformer_depth=1, context_dim=24, num_groups=8)
    kw.update(overrides)
    return UNetConfig(**kw)


def randomise_weights(model, seed=0, std=0.05):
    """Add noise to every parameter, so the zero-initialised layers (ResBlock conv2, SpatialTransformer
    proj_out, conv_out) become non-zero. Without this the U-Net outputs exactly 0 at init and neither
    the context nor the attention path can affect the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def make_inputs(cfg, B=2, H=16, W=16, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    context = torch.randn(B, L, cfg.context_dim, generator=g)
    return x, t, context


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise_weights(UNet(tiny_config())).eval()


@pytest.mark.assignment(6)
def test_timestep_embedding_closed_form():
    """Sinusoidal embedding (Transformer §3.5): emb = [cos(t·ω_i), sin(t·ω_i)], ω_i = 10000^(−i/half)."""
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 4)
    assert emb.shape == (3, 4)
    # dim 4 -> half 2 -> ω = [1, 10000^(-1/2)] = [1, 0.01]
    expected = torch.tensor([
        [1.0, 1.0, 0.0, 0.0],
        [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)],
        [math.cos(500.0), math.cos(5.0), math.sin(500.0), math.sin(5.0)],
    ])
    torch.testing.assert_close(emb, expected, atol=1e-4, rtol=0)
    # float t and an odd dim (one zero column appended); dim 7 -> half 3 -> ω_2 = 10000^(-2/3)
    emb = timestep_embedding(torch.tensor([2.5, 7.0]), 7)
    assert emb.shape == (2, 7)
    assert math.isclose(emb[0, 2].item(), math.cos(2.5 * 10000 ** (-2 / 3)), abs_tol=1e-6)
    assert math.isclose(emb[1, 3].item(), math.sin(7.0), abs_tol=1e-6)
    assert torch.all(emb[:, 6] == 0)


@pytest.mark.parametrize("overrides", [
    dict(channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=1),
    dict(channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), num_heads=2),
    dict(channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_heads=4, model_channels=32),
    dict(channel_mult=(1, 1, 2, 2), num_res_blocks=1, attention_levels=(0, 3), num_heads=2,
         in_channels=3, out_channels=6, transformer_depth=2),
])
def test_output_shape(overrides):
    """ε̂ = UNet(x, t, c) has the shape of x (channels -> out_channels), for several layouts, H != W."""
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    net = UNet(cfg)
    x, t, context = make_inputs(cfg, H=16, W=8)
    out = net(x, t, context)
    assert out.shape == (2, cfg.out_channels, 16, 8)


def test_zero_init_output_is_zero():
    """CompVis zero-init: conv_out, ResBlock conv2 and SpatialTransformer proj_out are 0, so ε̂ = 0 at init."""
    torch.manual_seed(0)
    net = UNet(tiny_config())
    x, t, context = make_inputs(net.cfg)
    assert torch.count_nonzero(net(x, t, context)) == 0
    # and every zero-initialised branch really is zero (not just conv_out)
    zero = [m for n, m in net.named_modules() if n.endswith(("conv2", "proj_out", "conv_out"))
            and isinstance(m, torch.nn.Conv2d)]
    assert len(zero) > 3 and all(torch.count_nonzero(m.weight) == 0 for m in zero)


def test_timestep_broadcasts(model):
    """t as a python int or a 0-d tensor means the same step for the whole batch; t changes ε̂."""
    x, _, context = make_inputs(model.cfg)
    with torch.no_grad():
        ref = model(x, torch.tensor([10, 10]), context)
        torch.testing.assert_close(model(x, 10, context), ref)
        torch.testing.assert_close(model(x, torch.tensor(10), context), ref)
        assert not torch.allclose(model(x, torch.tensor([900, 900]), context), ref, atol=1e-4)


def test_context_changes_output(model):
    """LDM Eq. 3 is wired: with non-zero weights, a different context τ(y) gives a different ε̂."""
    x, t, context = make_inputs(model.cfg)
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, t, torch.randn(context.shape, generator=torch.Generator().manual_seed(5)))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_masked_tokens_are_ignored(model, fused):
    """Padding tokens (mask False) get attention weight exp(−∞) = 0: changing them leaves ε̂ unchanged;
    changing an unmasked token changes ε̂ of that sample only."""
    model.set_fused_attention(fused)
    x, t, context = make_inputs(model.cfg, L=5)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    g = torch.Generator().manual_seed(7)
    padded = context.clone()
    padded[0, 3:] = 10 * torch.randn(2, model.cfg.context_dim, generator=g)
    changed = context.clone()
    changed[0, 1] = torch.randn(model.cfg.context_dim, generator=g)
    with torch.no_grad():
        ref = model(x, t, context, mask)
        out_padded = model(x, t, padded, mask)
        out_changed = model(x, t, changed, mask)
        out_unmasked = model(x, t, padded)  # without the mask the padding is attended to
    model.set_fused_attention(True)
    torch.testing.assert_close(out_padded, ref, atol=1e-6, rtol=0)
    assert (out_changed[0] - ref[0]).abs().max() > 1e-4
    torch.testing.assert_close(out_changed[1], ref[1], atol=1e-6, rtol=0)
    assert (out_unmasked[0] - ref[0]).abs().max() > 1e-4


def test_scale_shift_reaches_every_resblock_and_the_caption_scales_features():
    """UNetConfig.scale_shift builds every ResBlock as AdaGN (a (2·C)-wide time projection); with the pooled
    context, another caption changes ε̂ through the scales alone (cross-attention and every shift b zeroed)."""
    torch.manual_seed(0)
    model = randomise_weights(UNet(tiny_config(scale_shift=True, pooled_context=True))).eval()
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert blocks and all(b.scale_shift and b.time_proj.out_features == 2 * b.norm2.num_channels for b in blocks)
    with torch.no_grad():
        for m in model.modules():  # no attention output: the caption reaches ε̂ through the pooled path only
            if isinstance(m, SpatialTransformer):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
        for b in blocks:  # b = 0: the embedding acts through the scale (1 + s) alone
            C = b.norm2.num_channels
            b.time_proj.weight[C:] = 0
            b.time_proj.bias[C:] = 0
    x, t, context = make_inputs(model.cfg)
    with torch.no_grad():
        out = model(x, t, context)
        assert out.shape == x.shape
        assert (model(x, t, torch.randn_like(context)) - out).abs().max() > 1e-4
    assert not any(m.scale_shift for m in UNet(tiny_config()).modules() if isinstance(m, ResBlock))  # CompVis's default


def test_pooled_context_is_the_masked_mean():
    """pooled_context: emb = MLP(timestep_embedding(t)) + W·mean(c over unmasked tokens) reaches every
    ResBlock; padding tokens leave ε̂ unchanged; with every SpatialTransformer switched off (output
    projection zeroed) the caption still changes ε̂, through emb alone."""
    torch.manual_seed(0)
    model = randomise_weights(UNet(tiny_config(pooled_context=True))).eval()
    x, t, context = make_inputs(model.cfg, L=5)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    padded = context.clone()
    padded[0, 3:] = 10 * torch.randn(2, model.cfg.context_dim, generator=torch.Generator().manual_seed(3))
    keep = mask.float()[..., None]                                                   # (B, L, 1)
    pooled = (context * keep).sum(1) / keep.sum(1)                                   # (B, d)
    emb = model.time_embed(timestep_embedding(t, model.cfg.model_channels)) + F.linear(
        pooled, model.context_embed.weight, model.context_embed.bias)                # (B, 4·mc)
    seen = []
    hook = model.down_blocks[0][0].time_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        ref = model(x, t, context, mask)
        torch.testing.assert_close(model(x, t, padded, mask), ref, atol=1e-6, rtol=0)
    hook.remove()
    torch.testing.assert_close(seen[0], F.silu(emb))  # what the first ResBlock's time projection sees
    for block in model.modules():  # no attention output at all: the caption reaches ε̂ through emb only
        if isinstance(block, SpatialTransformer):
            torch.nn.init.zeros_(block.proj_out.weight), torch.nn.init.zeros_(block.proj_out.bias)
    with torch.no_grad():
        other = torch.randn(context.shape, generator=torch.Generator().manual_seed(4))
        assert (model(x, t, other, mask) - model(x, t, context, mask)).abs().max() > 1e-4


def test_coord_channels_are_the_pixel_grid():
    """coord_channels: conv_in sees [x_t, X, Y] with X, Y = linspace(−1, 1) along W and H (CoordConv):
    conv_in is that convolution, and with the two coordinate filters zeroed the U-Net equals one
    without coordinates (same weights otherwise)."""
    torch.manual_seed(0)
    with_coords = randomise_weights(UNet(tiny_config(coord_channels=True))).eval()
    plain = UNet(tiny_config()).eval()
    state = with_coords.state_dict()
    assert state["conv_in.weight"].shape[1] == plain.cfg.in_channels + 2
    x, t, context = make_inputs(plain.cfg)
    with torch.no_grad():
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
        inputs = torch.cat([x, torch.stack([xs, ys]).expand(2, 2, 16, 16)], 1)     # (B, C + 2, H, W)
        first = F.conv2d(inputs, state["conv_in.weight"], state["conv_in.bias"], padding=1)
        torch.testing.assert_close(with_coords.conv_in(inputs), first)
        state["conv_in.weight"][:, plain.cfg.in_channels:] = 0  # the coordinate filters off
        plain.load_state_dict({k: (v[:, :plain.cfg.in_channels] if k == "conv_in.weight" else v)
                               for k, v in state.items()})
        with_coords.load_state_dict(state)
        torch.testing.assert_close(with_coords(x, t, context), plain(x, t, context), atol=1e-6, rtol=0)


@pytest.mark.assignment(6)
@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_is_the_identity_plus_skip_at_init(scale_shift):
    """At init conv₂ is zero, so the block is its skip path: a 1×1 conv when the widths differ, else x itself."""
    torch.manual_seed(0)
    block = ResBlock(8, 16, time_dim=12, num_groups=4, scale_shift=scale_shift).eval()
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    out = block(x, emb)
    assert out.shape == (2, 16, 6, 6)
    torch.testing.assert_close(out, block.skip(x))
    same_width = ResBlock(8, 8, time_dim=12, num_groups=4, scale_shift=scale_shift)
    torch.testing.assert_close(same_width(x, emb), x)  # identity skip, zero conv₂


def record_module_io(block, names):
    """Forward hooks on block's submodules `names`: {name: (input, output)} of their last call."""
    seen, handles = {}, []
    for name in names:
        module = getattr(block, name)
        handles.append(module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out))))
    return seen, handles


@pytest.mark.assignment(6)
@pytest.mark.parametrize("widths", [(8, 16), (8, 8)])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_data_flow(widths, scale_shift):
    """Each of the ResBlock's modules sees what the class docstring says (forward hooks record it): GN₁ sees x,
    conv₁ SiLU(GN₁(x)), the time projection SiLU(e), conv₂ SiLU(·) of what the embedding made of GN₂ (through
    dropout), the skip x; the output is skip + conv₂'s output. Additive: GN₂ sees conv₁'s output plus the
    projection as one shift per channel. AdaGN (scale_shift): GN₂ sees conv₁'s output alone, the projection
    (B, 2·C_out) splits into [s, b], s first, and SiLU's input is GN₂(h)·(1 + s) + b."""
    torch.manual_seed(0)
    block = randomise_weights(ResBlock(*widths, time_dim=12, num_groups=4, scale_shift=scale_shift)).eval()
    x, emb = torch.randn(2, widths[0], 5, 7), torch.randn(2, 12)
    names = ["norm1", "conv1", "time_proj", "norm2", "dropout", "conv2", "skip"]
    seen, handles = record_module_io(block, names)
    out = block(x, emb)
    for h in handles:
        h.remove()
    assert set(seen) == set(names), f"modules never called: {set(names) - set(seen)}"
    close = torch.testing.assert_close
    close(seen["norm1"][0], x)
    close(seen["conv1"][0], F.silu(seen["norm1"][1]))
    close(seen["time_proj"][0], F.silu(emb))
    e, C = seen["time_proj"][1][:, :, None, None], widths[1]  # (B, C_out or 2·C_out, 1, 1)
    if scale_shift:
        assert e.shape == (2, 2 * C, 1, 1)
        close(seen["norm2"][0], seen["conv1"][1])  # the embedding does not enter before GN₂
        close(seen["dropout"][0], F.silu(seen["norm2"][1] * (1 + e[:, :C]) + e[:, C:]))
    else:
        assert e.shape == (2, C, 1, 1)  # one number per channel
        close(seen["norm2"][0], seen["conv1"][1] + e)
        close(seen["dropout"][0], F.silu(seen["norm2"][1]))
    close(seen["conv2"][0], seen["dropout"][1])
    close(seen["skip"][0], x)
    close(out, seen["skip"][1] + seen["conv2"][1])


@pytest.mark.assignment(6)
def test_resblock_scale_shift_with_zero_projection_is_the_plain_block_without_time():
    """With the time projection zeroed (W = 0, bias 0: s = b = 0), AdaGN's GN₂(h)·(1 + 0) + 0 is GN₂(h): both
    kinds of block then compute the same function of x alone, with the same other weights."""
    torch.manual_seed(0)
    plain = randomise_weights(ResBlock(8, 16, time_dim=12, num_groups=4)).eval()
    adagn = ResBlock(8, 16, time_dim=12, num_groups=4, scale_shift=True).eval()
    state = {k: v for k, v in plain.state_dict().items() if not k.startswith("time_proj")}
    adagn.load_state_dict({**state, "time_proj.weight": torch.zeros(32, 12), "time_proj.bias": torch.zeros(32)})
    with torch.no_grad():
        plain.time_proj.weight.zero_()
        plain.time_proj.bias.zero_()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(adagn(x, torch.randn(2, 12)), plain(x, torch.randn(2, 12)))


@pytest.mark.assignment(6)
@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_time_embedding_changes_the_output_and_gradients_reach_every_weight(scale_shift):
    """Another e gives another output (through the per-channel shift, or scale and shift), and every parameter
    gets a gradient."""
    torch.manual_seed(0)
    block = randomise_weights(ResBlock(8, 16, time_dim=12, num_groups=4, scale_shift=scale_shift))
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    assert (block(x, emb) - block(x, torch.randn(2, 12))).abs().max() > 1e-4
    block(x, emb).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def weights_by_sdpa(q, k, mask=None):
    """softmax(QKᵀ/√d) read off F.scaled_dot_product_attention with V = I: each output row is the weight row."""
    Lk = k.shape[-2]
    eye = torch.eye(Lk, dtype=q.dtype).expand(*k.shape[:-2], Lk, Lk)
    return F.scaled_dot_product_attention(q, k, eye, attn_mask=None if mask is None else mask[:, None, None, :])


@pytest.mark.assignment(5)
def test_attention_weights_match_sdpa():
    """attention_weights equals the weights F.scaled_dot_product_attention uses (read off with V = I), in float32;
    masked keys get weight exactly 0 and each row sums to 1; the scale is 1/√d with d the last axis."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    torch.testing.assert_close(attention_weights(q, k), weights_by_sdpa(q, k))
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    torch.testing.assert_close(attention_weights(q, k, mask), weights_by_sdpa(q, k, mask))
    w = attention_weights(q.bfloat16(), k.bfloat16(), mask)
    assert w.dtype == torch.float32 and w.shape == (2, 3, 4, 5)
    assert w[0, :, :, 1].abs().max() == 0 and w[0, :, :, 4].abs().max() == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4))
    torch.testing.assert_close(w, weights_by_sdpa(q, k, mask), atol=2e-2, rtol=2e-2)  # bf16 inputs
    wide = torch.randn(1, 1, 3, 32, generator=g), torch.randn(1, 1, 6, 32, generator=g)  # d = 32, Lq != Lk
    torch.testing.assert_close(attention_weights(*wide), weights_by_sdpa(*wide))


@pytest.mark.assignment(5)
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_sdpa(with_mask):
    """Written-out softmax(QKᵀ/√d)V equals torch's F.scaled_dot_product_attention (the reference),
    and the fused path agrees with it; Lq != Lk (cross-attention shapes)."""
    g = torch.Generator().manual_seed(3)
    B, heads, Lq, Lk, d = 2, 3, 7, 5, 8
    q = torch.randn(B, heads, Lq, d, generator=g)
    k = torch.randn(B, heads, Lk, d, generator=g)
    v = torch.randn(B, heads, Lk, d, generator=g)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5]) if with_mask else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    manual = attention(q, k, v, mask, fused=False)
    fused = attention(q, k, v, mask, fused=True)
    torch.testing.assert_close(manual, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)
    if with_mask:  # the masked keys carry no weight: output = attention over the kept keys only
        keep = mask[0]
        only_kept = F.scaled_dot_product_attention(q[:1], k[:1, :, keep], v[:1, :, keep])
        torch.testing.assert_close(manual[:1], only_kept, atol=1e-5, rtol=1e-5)


def test_kept_cross_attention_weights_are_the_softmax(model):
    """keep_attention_weights: each cross-attention layer keeps softmax(QKᵀ/√d) (Transformer Eq. 1) of its
    last call, (B, heads, HW, L): rows sum to 1 and padding tokens get weight 0; self-attention keeps none."""
    x, t, context = make_inputs(model.cfg)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    model.keep_attention_weights(True)
    with torch.no_grad():
        model(x, t, context, mask)
    cross = [m for m in model.modules() if isinstance(m, Attention) and m.is_cross]
    assert cross and all(m.weights is None for m in model.modules() if isinstance(m, Attention) and not m.is_cross)
    for m in cross:
        B, heads, N, L = m.weights.shape
        assert (B, heads, L) == (2, model.cfg.num_heads, 5)
        torch.testing.assert_close(m.weights.sum(-1), torch.ones(B, heads, N))
        assert m.weights[0, :, :, 2:].abs().max() == 0  # masked tokens
    model.keep_attention_weights(False)
    assert all(m.weights is None and not m.keep_weights for m in cross)


def multihead_attention_like(attn):
    """torch's nn.MultiheadAttention with the weights of our Attention copied in (no input bias, W_O's bias)."""
    C, context_dim = attn.to_q.out_features, attn.to_k.in_features
    mha = torch.nn.MultiheadAttention(C, attn.heads, kdim=context_dim, vdim=context_dim, batch_first=True)
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        else:
            mha.q_proj_weight.copy_(attn.to_q.weight)
            mha.k_proj_weight.copy_(attn.to_k.weight)
            mha.v_proj_weight.copy_(attn.to_v.weight)
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(attn.to_out.weight)
        mha.out_proj.bias.copy_(attn.to_out.bias)
    return mha


@pytest.mark.assignment(5)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_module_matches_torch_multihead_attention(fused, cross):
    """Attention (self: K, V from x; cross: K, V from the context) equals torch's nn.MultiheadAttention with the same
    weights, padding keys masked (key_padding_mask); with keep_weights it keeps the per-head softmax weights."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, context_dim=6 if cross else None, heads=2, fused=fused)
    x = torch.randn(2, 10, 8)
    c = torch.randn(2, 4, 6) if cross else x
    mask = torch.tensor([[True, True, False, False], [True] * 4]) if cross else None
    mha = multihead_attention_like(attn)
    ref, ref_weights = mha(x, c, c, key_padding_mask=None if mask is None else ~mask, average_attn_weights=False)
    attn.keep_weights = True
    out = attn(x, c if cross else None, mask)
    assert out.shape == (2, 10, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.weights, ref_weights, atol=1e-5, rtol=1e-5)
    attn.keep_weights, attn.weights = False, None
    attn(x, c if cross else None, mask)
    assert attn.weights is None


def test_feedforward_is_geglu():
    """GEGLU (Shazeer 2020): FF(x) = (xW_v + b_v) ⊙ GELU(xW_g + b_g)·W_2 + b_2, GELU(u) = u·Φ(u),
    with Φ the standard normal CDF from torch.distributions."""
    torch.manual_seed(0)
    ff = FeedForward(6)
    x = torch.randn(2, 5, 6)
    W, b = ff.proj_in.weight, ff.proj_in.bias  # (48, 6): rows 0..23 value, 24..47 gate
    value, gate = x @ W[:24].T + b[:24], x @ W[24:].T + b[24:]
    gelu = gate * torch.distributions.Normal(0.0, 1.0).cdf(gate)
    ref = (value * gelu) @ ff.proj_out.weight.T + ff.proj_out.bias
    torch.testing.assert_close(ff(x), ref, atol=1e-5, rtol=1e-5)


def test_unet_fused_equals_manual(model):
    """The whole U-Net gives the same ε̂ with fused and written-out attention on the same weights."""
    x, t, context = make_inputs(model.cfg)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    with torch.no_grad():
        model.set_fused_attention(False)
        assert not any(m.fused for m in model.modules() if isinstance(m, Attention))
        manual = model(x, t, context, mask)
        model.set_fused_attention(True)
        assert all(m.fused for m in model.modules() if isinstance(m, Attention))
        fused = model(x, t, context, mask)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter():
    """Autograd: after making the zero-initialised layers non-zero, every parameter gets a non-zero grad."""
    torch.manual_seed(0)
    net = randomise_weights(UNet(tiny_config(channel_mult=(1, 2), attention_levels=(0, 1))))
    x, t, context = make_inputs(net.cfg)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    net(x, t, context, mask).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert missing == []


def test_bad_inputs_raise():
    """Wrong shapes fail the U-Net's asserts with a message naming the problem, not a cryptic error deep inside a
    conv; wrong configs are a clear ValueError from check_unet_config (what LatentDiffusion runs), and the
    U-Net's own asserts or GroupNorm still stop them when it is built by hand."""
    torch.manual_seed(0)
    net = UNet(tiny_config(channel_mult=(1, 2, 2), attention_levels=(1,)))  # needs H, W divisible by 4
    x, t, context = make_inputs(net.cfg)
    with pytest.raises(AssertionError, match="divisible"):
        net(torch.randn(2, 4, 10, 16), t, context)
    with pytest.raises(AssertionError, match="context"):
        net(x, t, torch.randn(2, 5, net.cfg.context_dim + 1))
    with pytest.raises(AssertionError, match="x must have shape"):
        net(torch.randn(2, 3, 16, 16), t, context)
    with pytest.raises(AssertionError, match="context_mask"):
        net(x, t, context, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(AssertionError, match="context_mask must be bool"):
        net(x, t, context, torch.ones(2, 5))
    with pytest.raises(AssertionError, match="t must"):
        net(x, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="divisible"):
        check_unet_config(net.cfg, size=10)
    with pytest.raises(ValueError, match="num_groups"):
        check_unet_config(tiny_config(num_groups=7))
    with pytest.raises(ValueError, match="num_heads"):
        check_unet_config(tiny_config(num_heads=3))
    with pytest.raises(ValueError, match="attention_levels"):
        check_unet_config(tiny_config(attention_levels=(2,)))
    check_unet_config(net.cfg, size=16)  # a good config passes
    with pytest.raises(ValueError, match="num_groups"):  # built by hand: GroupNorm's own check
        UNet(tiny_config(num_groups=7))
    with pytest.raises(AssertionError, match="num_heads"):
        UNet(tiny_config(num_heads=3))
    with pytest.raises(AssertionError, match="attention_levels"):
        UNet(tiny_config(attention_levels=(2,)))


def test_config_json_round_trip():
    """asdict(cfg) -> JSON -> UNetConfig(**d) rebuilds the same model: same state_dict keys and shapes."""
    cfg = tiny_config(channel_mult=(1, 2, 2), attention_levels=(2,), fused_attention=False)
    d = json.loads(json.dumps(asdict(cfg)))
    assert isinstance(d["channel_mult"], list)  # JSON has no tuples
    cfg2 = UNetConfig(**d)
    assert cfg2 == cfg
    sd1, sd2 = UNet(cfg).state_dict(), UNet(cfg2).state_dict()
    assert list(sd1) == list(sd2)
    assert all(sd1[k].shape == sd2[k].shape for k in sd1)


def test_bf16_autocast_close_to_fp32(model):
    """Under bf16 autocast (CPU here, CUDA in training) ε̂ stays finite and close to the fp32 result."""
    x, t, context = make_inputs(model.cfg)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    for fused in (False, True):
        model.set_fused_attention(fused)
        with torch.no_grad():
            ref = model(x, t, context, mask)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, t, context, mask)
        assert torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    model.set_fused_attention(True)


@pytest.mark.slow
def test_torch_compile_fullgraph(model):
    """The forward has no data-dependent python control flow: dynamo captures it as one graph
    (fullgraph=True) for both attention paths, and the compiled model gives the same ε̂."""
    x, t, context = make_inputs(model.cfg)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    for fused in (True, False):
        model.set_fused_attention(fused)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, 7, context, mask), model(x, 7, context, mask))
    model.set_fused_attention(True)
