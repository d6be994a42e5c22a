"""Text: a tokenizer trained on the captions, and a small transformer that turns tokens into the
context c = τ_θ(y) that the U-Net attends to (LDM paper, Sec. 3.3, Eq. 3).

  caption ──tokenizer──► ids (B, L), mask (B, L) ──TextEncoder──► context (B, L, d)

The LDM paper's text-to-image model trains its text transformer from scratch, jointly with the
U-Net, on the diffusion loss alone; tinyldm does the same (Stable Diffusion instead freezes a
pretrained CLIP text encoder, which would need a download).

Tokenizer: word level (one id per word), trained with the `tokenizers` library: lower-cased,
split on whitespace and punctuation. A word never seen in training becomes [UNK]; it never raises.
Every prompt starts with [BOS], so the empty prompt "" is one real token: its context c_u is the
"unconditional" input of classifier-free guidance, and no attention row is ever empty.

The modules assert what they assume; `check_text_encoder_config`, at the end of the file, is the
full check with advice, for the code a user calls (LatentDiffusion).
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"  # special tokens; their ids are 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(captions, vocab_size=1000, min_frequency=1):
    """Train a word-level tokenizer on an iterable of caption strings.

    vocab_size counts the special tokens; the most frequent words win if there are more words.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=[PAD, UNK, BOS])
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def load_tokenizer(path):
    """Load a tokenizer saved with `tokenizer.save(path)` (the library's JSON format); a file that is not
    one, or lacks the special tokens, is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for any parse error
        raise ValueError(f"{path}: not a valid tokenizer file ({str(e)[:200]})") from None
    lacking = [t for t in (PAD, UNK, BOS) if tokenizer.token_to_id(t) is None]
    if lacking:
        raise ValueError(f"{path}: not a valid tokenizer file (no {', '.join(lacking)} token)")
    return tokenizer


def tokenize(tokenizer, prompts, max_length):
    """Prompts -> (ids (B, max_length) long, mask (B, max_length) bool, True = real token).

    Padded with [PAD] to max_length; longer prompts keep their first max_length tokens, with a
    warning. Unknown words become [UNK]. "" is valid: it is just [BOS].
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings, e.g. ['a red circle']")
    pad_id = tokenizer.token_to_id(PAD)
    ids = torch.full((len(prompts), max_length), pad_id, dtype=torch.long)  # (B, L)
    truncated = []
    for i, encoding in enumerate(tokenizer.encode_batch(list(prompts))):
        tokens = encoding.ids
        if len(tokens) > max_length:
            truncated.append(prompts[i])
            tokens = tokens[:max_length]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    if truncated:
        warnings.warn(f"{len(truncated)} prompt(s) longer than {max_length} tokens were truncated, "
                      f"e.g. {truncated[0]!r}", stacklevel=2)
    return ids, ids != pad_id


# ----------------------------------------------------------------------------------------------
# Text encoder: a small pre-LayerNorm transformer (Vaswani et al. 2017; pre-LN as in GPT-2)

@dataclass
class TextEncoderConfig:
    vocab_size: int = 1000     # number of token ids (the tokenizer's vocabulary size)
    max_length: int = 24       # L: tokens per prompt, [BOS] included (Shapes captions need <= 21)
    d_model: int = 128         # d: width of each token's vector, = the U-Net's context_dim
    n_layers: int = 2          # transformer blocks
    n_heads: int = 4           # attention heads; d_model must be divisible by it
    mlp_ratio: int = 4         # hidden width of the MLP = mlp_ratio * d_model
    dropout: float = 0.0       # dropout on attention output and MLP (0 for small data)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens; padding keys are masked out.

    Written out here, not imported from unet.py: this file's assignment (7) must not run the U-Net's (5).
    Same precision policy as the U-Net and the autoencoder: QKᵀ in the input dtype, then the scale,
    the mask and the softmax in float32.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        assert cfg.d_model % cfg.n_heads == 0, f"d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads}"

    def forward(self, x, mask):
        # BEGIN ASSIGNMENT 7: multi-head self-attention, [PAD] keys masked out
        B, L, D = x.shape
        h, d = self.n_heads, D // self.n_heads
        q, k, v = self.qkv(x).split(D, dim=-1)                            # 3 x (B, L, D)
        q, k, v = (t.view(B, L, h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        # Transformer Eq. 1: Attention(Q, K, V) = softmax(Q Kᵀ / √d) V
        logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(d)          # (B, h, L, L)
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))  # no attending to [PAD]
        weights = logits.softmax(dim=-1).to(v.dtype)                       # (B, h, L, L), rows sum to 1
        y = (weights @ v).transpose(1, 2).reshape(B, L, D)                 # (B, L, D)
        return self.dropout(self.out(y))
        # END ASSIGNMENT 7


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x, mask):
        # BEGIN ASSIGNMENT 7: the pre-LN block
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))
        # END ASSIGNMENT 7


class TextEncoder(nn.Module):
    """τ_θ: token ids (B, L) and mask (B, L) -> context (B, L, d_model)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_length, cfg.d_model))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)

    def forward(self, token_ids, mask):
        """token_ids (B, L) and mask (B, L) bool, True = real token (as `tokenize` gives) -> context (B, L, d)."""
        B, L = token_ids.shape
        assert L <= self.cfg.max_length, f"got {L} tokens per prompt, the encoder takes at most {self.cfg.max_length}"
        assert mask.shape == token_ids.shape, f"mask shape {tuple(mask.shape)} != token_ids shape {(B, L)}"
        # BEGIN ASSIGNMENT 7: embeddings, the blocks, the final LayerNorm
        x = self.token_embedding(token_ids) + self.position_embedding[:L]   # (B, L, d)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)                                             # (B, L, d)
        # END ASSIGNMENT 7


# ----------------------------------------------------------------------------------------------
# The full check, for the code a user calls (LatentDiffusion); the modules above only assert

def check_text_encoder_config(cfg):
    """Raise ValueError, with what to change, if `cfg` cannot work."""
    for name in ("vocab_size", "max_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model={cfg.d_model} must be divisible by n_heads={cfg.n_heads} "
                         "(each head is d_model / n_heads wide)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
