"""Tokenizer and text encoder (tinyldm/text_encoder.py)."""

import pytest
import torch
import torch.nn.functional as F

from tinyldm.data import ShapesConfig, ShapesDataset
from tinyldm.text_encoder import (BOS, PAD, UNK, TextEncoder, TextEncoderConfig, check_text_encoder_config,
                                  load_tokenizer, tokenize, train_tokenizer)


@pytest.fixture(scope="module")
def captions():
    return ShapesDataset(ShapesConfig(num_train=2000), "train").captions


@pytest.fixture(scope="module")
def tokenizer(captions):
    return train_tokenizer(captions, vocab_size=200)


def test_special_tokens_and_vocabulary(tokenizer, captions):
    """[PAD], [UNK], [BOS] are ids 0, 1, 2 and every caption word is in the vocabulary."""
    assert [tokenizer.token_to_id(t) for t in (PAD, UNK, BOS)] == [0, 1, 2]
    words = {w.strip(",") for c in captions for w in c.split()}
    assert all(tokenizer.token_to_id(w) is not None for w in words)


def test_vocab_size_caps_the_vocabulary(captions):
    """A small vocab_size keeps only that many tokens (specials included); the rest become [UNK]."""
    small = train_tokenizer(captions, vocab_size=10)
    assert small.get_vocab_size() == 10
    ids, _ = tokenize(small, ["a purple triangle"], max_length=8)
    assert (ids == small.token_to_id(UNK)).any()


def test_round_trip_through_json(tokenizer, tmp_path, captions):
    """Saving as the library's JSON and loading back gives the same ids."""
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    a, _ = tokenize(tokenizer, captions[:50], 24)
    b, _ = tokenize(loaded, captions[:50], 24)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


def test_lowercase_and_punctuation_split(tokenizer):
    """'A Red, CIRCLE' is tokenised like 'a red , circle'."""
    a, _ = tokenize(tokenizer, ["A Red, CIRCLE"], 8)
    b, _ = tokenize(tokenizer, ["a red , circle"], 8)
    assert torch.equal(a, b)
    assert a[0, 0] == tokenizer.token_to_id(BOS)


def test_unknown_words_become_unk(tokenizer):
    """Words never seen in training map to [UNK]; nothing raises."""
    ids, mask = tokenize(tokenizer, ["a zebra circle"], 8)
    unk, circle = tokenizer.token_to_id(UNK), tokenizer.token_to_id("circle")
    assert ids[0, :4].tolist() == [tokenizer.token_to_id(BOS), tokenizer.token_to_id("a"), unk, circle]
    assert mask[0].sum() == 4


def test_padding_and_mask(tokenizer):
    """Ids are padded with [PAD] to max_length; the mask is True exactly on real tokens."""
    ids, mask = tokenize(tokenizer, ["a red circle", "a big blue square at the top left"], 12)
    assert ids.shape == mask.shape == (2, 12) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 9]
    assert (ids[~mask] == tokenizer.token_to_id(PAD)).all() and (ids[mask] != 0).all()


def test_empty_prompt_is_one_bos_token(tokenizer):
    """The empty prompt "" is valid: just [BOS] (the unconditional context c_u)."""
    ids, mask = tokenize(tokenizer, [""], 6)
    assert ids[0].tolist() == [tokenizer.token_to_id(BOS)] + [0] * 5
    assert mask[0].tolist() == [True] + [False] * 5


def test_long_prompts_are_truncated_with_a_warning(tokenizer):
    """A prompt over max_length tokens keeps its first max_length tokens and warns."""
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenize(tokenizer, ["a red circle " * 10], 5)
    assert mask.all() and ids[0, 1:].tolist() == [tokenizer.token_to_id(w) for w in "a red circle a".split()]


def test_prompts_must_be_a_list_of_strings(tokenizer):
    """A bare string (a common slip) is a clear TypeError, not a list of characters."""
    with pytest.raises(TypeError, match="list of strings"):
        tokenize(tokenizer, "a red circle", 8)


def test_all_shapes_captions_fit_the_default_length(tokenizer, captions):
    """Every Shapes caption fits TextEncoderConfig's default max_length (no silent truncation)."""
    longest = max(len(e.ids) for e in tokenizer.encode_batch(captions))
    assert longest <= TextEncoderConfig().max_length


# ---- the encoder ---------------------------------------------------------------------------

def _encoder(**kw):
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(vocab_size=50, max_length=10, d_model=32, n_heads=4, **kw)).eval()


@pytest.mark.assignment(7)
def test_output_shape():
    """τ_θ maps (B, L) ids and mask to a (B, L, d_model) context."""
    enc = _encoder()
    ids = torch.randint(3, 50, (3, 7))
    assert enc(ids, torch.ones(3, 7, dtype=torch.bool)).shape == (3, 7, 32)


def torch_layer_like(block, n_heads):
    """torch's nn.TransformerEncoderLayer (pre-LN: norm_first=True, GELU MLP, no dropout) with our Block's weights."""
    d, hidden = block.ln1.normalized_shape[0], block.mlp[0].out_features
    layer = torch.nn.TransformerEncoderLayer(d, n_heads, dim_feedforward=hidden, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)  # rows: W_Q, W_K, W_V
        layer.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
        layer.self_attn.out_proj.load_state_dict(block.attn.out.state_dict())
        layer.linear1.load_state_dict(block.mlp[0].state_dict())
        layer.linear2.load_state_dict(block.mlp[2].state_dict())
        layer.norm1.load_state_dict(block.ln1.state_dict())
        layer.norm2.load_state_dict(block.ln2.state_dict())
    return layer.train()  # train mode (dropout is 0): torch's generic path, not its fused inference kernel


@pytest.mark.assignment(7)
def test_attention_matches_torch_multihead_attention():
    """SelfAttention equals torch's nn.MultiheadAttention with the same weights (qkv's rows are W_Q, W_K, W_V), the
    [PAD] keys masked out by key_padding_mask."""
    enc = _encoder()
    attn = enc.blocks[0].attn
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mha = torch_layer_like(enc.blocks[0], 4).self_attn
    ref, _ = mha(x, x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(attn(x, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.assignment(7)
def test_padding_does_not_change_real_tokens():
    """Whatever sits at masked (padding) positions, the context of the real tokens is the same."""
    enc = _encoder()
    ids = torch.tensor([[2, 5, 9, 0, 0, 0]])
    mask = ids != 0
    other = ids.clone()
    other[0, 3:] = torch.tensor([17, 33, 4])  # junk where the padding is
    a, b = enc(ids, mask), enc(other, mask)
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6)
    unmasked = enc(other, torch.ones_like(mask))  # ...while unmasking them does change it
    assert not torch.allclose(a[0, :3], unmasked[0, :3], atol=1e-4)


@pytest.mark.assignment(7)
def test_block_matches_torch_pre_ln_encoder_layer():
    """Each block is a pre-LN transformer layer: torch's nn.TransformerEncoderLayer(norm_first=True) with the same
    weights, [PAD] keys masked, gives the same output."""
    enc = _encoder(n_layers=2)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    for block in enc.blocks:
        ref = torch_layer_like(block, 4)(x, src_key_padding_mask=~mask)
        torch.testing.assert_close(block(x, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.assignment(7)
def test_encoder_is_embeddings_then_torch_layers_then_a_final_layer_norm():
    """τ(y) = LN_f(layers(E[ids] + P[:L])): token embeddings (a one-hot product here) plus the first L position
    embeddings, then torch's pre-LN layers with our weights, then the final LayerNorm; L may be < max_length."""
    enc = _encoder(n_layers=2)
    ids = torch.tensor([[2, 5, 9, 0, 0, 0], [2, 7, 8, 11, 13, 4]])
    mask = ids != 0
    x = F.one_hot(ids, 50).float() @ enc.token_embedding.weight + enc.position_embedding[:6]
    for block in enc.blocks:
        x = torch_layer_like(block, 4)(x, src_key_padding_mask=~mask)
    ref = F.layer_norm(x, (32,), enc.ln_final.weight, enc.ln_final.bias, enc.ln_final.eps)
    torch.testing.assert_close(enc(ids, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.assignment(7)
def test_every_parameter_gets_a_gradient():
    """The loss reaches every weight (no dead branch)."""
    enc = _encoder()
    ids = torch.randint(3, 50, (2, 10))
    enc(ids, torch.ones_like(ids, dtype=torch.bool)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_bad_input_is_a_clear_error():
    """Too many tokens or a mismatched mask fail the encoder's asserts, with a message naming the problem;
    d_model must split into heads: a ValueError from check_text_encoder_config (what LatentDiffusion runs),
    and the attention's assert when the encoder is built by hand."""
    enc = _encoder()
    with pytest.raises(AssertionError, match="at most 10"):
        enc(torch.zeros(1, 11, dtype=torch.long), torch.ones(1, 11, dtype=torch.bool))
    with pytest.raises(AssertionError, match="mask shape"):
        enc(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        check_text_encoder_config(TextEncoderConfig(d_model=30, n_heads=4))
    with pytest.raises(AssertionError, match="divisible"):
        TextEncoder(TextEncoderConfig(d_model=30, n_heads=4))
    check_text_encoder_config(TextEncoderConfig())  # the defaults pass
