"""Instructor-only tests of assignments 4–7; the starter kit does not get tests/hidden/.

Each writes the reference composition out (in torch.nn.functional, on the module's own weights), which the public
tests must not, since that would hand the answer to the student.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_loss
from tinyldm.text_encoder import TextEncoder, TextEncoderConfig
from tinyldm.unet import Attention, ResBlock, attention_weights, timestep_embedding


def randomise(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.assignment(4)
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_hidden_autoencoder_loss_written_out(kind):
    """loss = L_rec(x, D(μ + σ·ε)) + kl_weight·mean_B KL/(C·H·W), ε ~ N(0, I) from the generator."""
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_groups=4, kl_weight=0.01,
                                          recon_loss=kind))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss, parts, _ = autoencoder_loss(model, x, step=0, generator=torch.Generator().manual_seed(3))
    posterior = model.encode(x)
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_hat = model.decode(posterior.mean + torch.exp(0.5 * posterior.logvar) * eps)
    rec = F.l1_loss(x_hat, x) if kind == "l1" else F.mse_loss(x_hat, x)
    kl = kl_divergence(Normal(posterior.mean, torch.exp(0.5 * posterior.logvar)), Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(loss, rec + 0.01 * kl.mean() / (3 * 16 * 16), rtol=1e-5, atol=1e-6)


@pytest.mark.assignment(5)
def test_hidden_attention_written_out():
    """softmax(QKᵀ/√d) over the keys with −∞ at padding, and the heads split from and merged into the width."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    logits = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(attention_weights(q, k, mask), torch.softmax(logits, dim=-1))
    torch.manual_seed(0)
    attn = randomise(Attention(query_dim=8, context_dim=6, heads=2, fused=False))
    x, c = torch.randn(2, 10, 8), torch.randn(2, 5, 6)
    Q = attn.to_q(x).view(2, 10, 2, 4).transpose(1, 2)
    K = attn.to_k(c).view(2, 5, 2, 4).transpose(1, 2)
    V = attn.to_v(c).view(2, 5, 2, 4).transpose(1, 2)
    w = torch.softmax((Q @ K.transpose(-2, -1) / 2.0).masked_fill(~mask[:, None, None, :], float("-inf")), -1)
    ref = attn.to_out((w @ V).transpose(1, 2).reshape(2, 10, 8))
    torch.testing.assert_close(attn(x, c, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.assignment(6)
def test_hidden_resblock_and_embedding_written_out():
    """ResBlock in torch.nn.functional on the block's weights; the embedding's cos half and sin half for dim 6."""
    torch.manual_seed(0)
    block = randomise(ResBlock(8, 16, time_dim=12, num_groups=4)).eval()
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, eps=1e-6)),
                 block.conv1.weight, block.conv1.bias, padding=1)
    h = h + F.linear(F.silu(emb), block.time_proj.weight, block.time_proj.bias)[:, :, None, None]
    h = F.conv2d(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, eps=1e-6)),
                 block.conv2.weight, block.conv2.bias, padding=1)
    skip = F.conv2d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, emb), skip + h, atol=1e-5, rtol=1e-5)
    t = torch.tensor([0.0, 3.0, 250.0])
    omega = torch.tensor([10000 ** (-i / 3) for i in range(3)])
    expected = torch.cat([torch.cos(t[:, None] * omega), torch.sin(t[:, None] * omega)], 1)
    torch.testing.assert_close(timestep_embedding(t, 6), expected, atol=1e-4, rtol=0)


@pytest.mark.assignment(7)
def test_hidden_text_encoder_written_out():
    """τ(y) = LN_f(blocks(E[ids] + P)), each block x + Attn(LN₁x) then x + MLP(LN₂x), attention by SDPA."""
    torch.manual_seed(0)
    enc = randomise(TextEncoder(TextEncoderConfig(vocab_size=50, max_length=10, d_model=32, n_heads=4))).eval()
    ids = torch.tensor([[2, 5, 9, 0, 0, 0], [2, 7, 8, 11, 13, 4]])
    mask = ids != 0
    x = enc.token_embedding(ids) + enc.position_embedding[:6]
    for block in enc.blocks:
        q, k, v = block.attn.qkv(block.ln1(x)).split(32, dim=-1)
        q, k, v = (t.view(2, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + block.attn.out(a.transpose(1, 2).reshape(2, 6, 32))
        x = x + block.mlp(block.ln2(x))
    torch.testing.assert_close(enc(ids, mask), enc.ln_final(x), atol=1e-5, rtol=1e-5)
