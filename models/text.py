"""A small caption encoder for the built-in text-to-image model (stands where LlamaGen uses T5).

Words -> a bidirectional transformer -> either `n_slots` learned-query slots (one attention pooling, or with
`slot_layers` a small DETR-style decoder of cross-attention blocks), or, with
n_slots=None, one feature per word position as LlamaGen takes T5's whole sequence -> (B, n_out, out_dim).
With `slot_identity` each slot's read-out also carries a learned code of its own, so the GPT can tell the slots
apart by content (the prefix has no position of its own under `prefix_rope="identity"`). `rope` gives the word
layers 1D rotary positions. The built-in model pre-trains the encoder on its own and freezes it, as LlamaGen
freezes T5 (`ciar.training.layout`).
These are the GPT's caption features (`cls_token_num = n_out`, `caption_dim = out_dim`); the null caption for
CFG is the GPT's own `uncond_embedding`, as in LlamaGen.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gpt import apply_rotary_emb


# The caption tokenisation rule (the exported manifest records it; the runtime and the web demo re-implement it
# without torch and are pinned to it by tests): lower-cased words, every other non-space character a token.
TOKEN_PATTERN = r"[a-z]+|[^\sa-z]"
_TOKEN = re.compile(TOKEN_PATTERN)
PAD_ID, UNK_ID = 0, 1


def tokenize(text: str) -> list[str]:
    """Lower-cased words; every other non-space character is a token of its own (',' and ':' matter)."""
    return _TOKEN.findall(text.lower())


def encode_caption(text: str, word_ids: dict[str, int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned word ids: (ids int64 (max_len,), mask bool (max_len,)), True on the caption's tokens,
    PAD_ID after them; unknown words map to UNK_ID. Raises ValueError if the caption has more than max_len tokens."""
    words = tokenize(text)
    if len(words) > max_len:
        raise ValueError(f"caption has {len(words)} tokens, more than max_len={max_len}: {text!r}")
    ids = np.full(max_len, PAD_ID, dtype=np.int64)
    ids[:len(words)] = [word_ids.get(w, UNK_ID) for w in words]
    mask = np.zeros(max_len, dtype=bool)
    mask[:len(words)] = True
    return ids, mask

@dataclass(frozen=True)
class CaptionEncoderConfig:
    vocab_size: int
    max_tokens: int
    dim: int = 128
    n_layer: int = 2
    n_head: int = 4
    out_dim: int = 128
    n_slots: int | None = 8  # None: per-word features, (B, max_tokens, out_dim)
    slot_identity: bool = False  # add a learned per-slot code to each slot's read-out: a slot says which it is
    slot_layers: int = 0  # 0: slots are one parameter-free attention pooling; N: N cross-attention blocks
    rope: bool = False  # 1D rotary positions in the word self-attention (attention by relative position)

    @property
    def n_out(self) -> int:
        """Number of caption feature vectors (the GPT's cls_token_num)."""
        return self.max_tokens if self.n_slots is None else self.n_slots

    def __post_init__(self) -> None:
        if self.slot_identity and self.n_slots is None:
            raise ValueError("slot_identity needs slots (n_slots); per-word features have positions already")
        if self.slot_layers and self.n_slots is None:
            raise ValueError("slot_layers needs slots (n_slots)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaptionEncoderConfig":
        return cls(**d)


class _Block(nn.Module):
    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, key_mask: Tensor, rope: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_head, d // self.n_head).unbind(2)
        if rope is not None:
            q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def rope_1d(length: int, head_dim: int, base: float = 10000.0) -> Tensor:
    """(length, head_dim // 2, 2) table of (cos, sin) for 1D rotary positions (`apply_rotary_emb`'s layout)."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


class _CrossBlock(nn.Module):
    """Slots (queries) read the words (keys and values), then an MLP: one block of a DETR-style slot decoder.
    After the first block a slot's query depends on what it has read, so a later block can look a word up from
    what an earlier one found."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, s: Tensor, x: Tensor, key_mask: Tensor) -> Tensor:
        (b, m, d), n, h = s.shape, x.shape[1], self.n_head
        q = self.q(self.norm_q(s)).view(b, m, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(x)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        s = s + self.proj(att.transpose(1, 2).reshape(b, m, d))
        return s + self.mlp(self.norm2(s))


class CaptionEncoder(nn.Module):
    def __init__(self, cfg: CaptionEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.n_head) for _ in range(cfg.n_layer))
        rope = rope_1d(cfg.max_tokens, cfg.dim // cfg.n_head) if cfg.rope else None
        self.register_buffer("rope", rope, persistent=False)
        self.norm = nn.LayerNorm(cfg.dim)
        if cfg.n_slots is not None:
            self.slots = nn.Parameter(torch.randn(cfg.n_slots, cfg.dim) * 0.02)
            if cfg.slot_layers:
                self.slot_blocks = nn.ModuleList(_CrossBlock(cfg.dim, cfg.n_head) for _ in range(cfg.slot_layers))
                self.slot_norm = nn.LayerNorm(cfg.dim)
            if cfg.slot_identity:  # unit scale: as large as the layer-normed read-out it is added to
                self.slot_code = nn.Parameter(torch.randn(cfg.n_slots, cfg.dim))
        self.out = nn.Linear(cfg.dim, cfg.out_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids (B, max_tokens) int64, mask (B, max_tokens) bool (True = a word) -> (B, n_out, out_dim).

        Per-word features (n_slots None) keep the padding positions: they are functions of the caption's words
        (padding is masked as a key), so the GPT needs no prefix mask."""
        if ids.shape[1] != self.config.max_tokens:
            raise ValueError(f"caption ids have length {ids.shape[1]}, expected {self.config.max_tokens}")
        first = torch.arange(mask.shape[1], device=mask.device) == 0
        mask = mask | (first[None, :] & ~mask.any(dim=1, keepdim=True))  # an empty caption: attend to position 0
        x = self.tok(ids) + self.pos
        for block in self.blocks:
            x = block(x, mask, self.rope)
        x = self.norm(x)
        if self.config.n_slots is None:
            return self.out(x)
        if self.config.slot_layers:
            pooled = self.slots.expand(x.shape[0], -1, -1)
            for block in self.slot_blocks:
                pooled = block(pooled, x, mask)
            pooled = self.slot_norm(pooled)
        else:
            scores = torch.einsum("sd,bnd->bsn", self.slots, x) / x.shape[-1] ** 0.5
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
            pooled = torch.einsum("bsn,bnd->bsd", scores.softmax(-1), x)
        if self.config.slot_identity:
            pooled = pooled + self.slot_code
        return self.out(pooled)
