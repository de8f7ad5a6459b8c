"""A LlamaGen-architecture GPT with an explicit, position-indexed static KV cache.

Parameter names and shapes follow FoundationVision/LlamaGen `autoregressive/models/gpt.py`, so official
checkpoints load strictly (see `checkpoint.py`). Two deliberate differences from the original:
- the KV cache is an explicit `KVCache` object passed to `forward`, not hidden model state, so one model can
  serve many sequences and a rollback is a rewind of the position (the gpt-fast design);
- `forward` can add an extra embedding to the token inputs (`extra_embeddings`), used by the cloud's
  interval-feature conditioning (E(x) + f_I).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class CaptionMLP(nn.Module):
    """LlamaGen's bias-free `MLP` (fc1, tanh-GELU, fc2) projecting caption features to the model width."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LabelEmbedder(nn.Module):
    """Class conditioning; row `num_classes` is the learned null class used by CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def null_condition(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, self.num_classes)

    def forward(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        labels = labels.reshape(-1)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionEmbedder(nn.Module):
    """Caption conditioning; `uncond_embedding` is the learned null caption used by CFG."""

    def __init__(self, caption_dim: int, dim: int, dropout_prob: float, token_num: int) -> None:
        super().__init__()
        self.dropout_prob = dropout_prob
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def null_condition(self, cond: Tensor) -> Tensor:
        return self.uncond_embedding.to(cond.dtype).expand_as(cond).clone()

    def forward(self, caption: Tensor, drop: Tensor | None = None) -> Tensor:
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


@dataclass
class KVCache:
    """Static, position-indexed key/value cache for every layer of one model.

    `k`, `v`: (n_layer, B, kv_heads, max_seq, head_dim). `key_valid`: (B, max_seq) bool, False on padded prefix
    positions (masked for every query). Writing position p overwrites it, so rolling back is just decoding again
    from an earlier position: stale entries beyond the current position are hidden by the causal mask.
    """

    k: Tensor
    v: Tensor
    key_valid: Tensor

    @classmethod
    def empty(cls, cfg: GPTConfig, batch: int, max_seq: int | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        seq = max_seq or cfg.max_seq_len
        shape = (cfg.n_layer, batch, cfg.kv_heads, seq, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.ones(batch, seq, dtype=torch.bool, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq(self) -> int:
        return self.k.shape[3]

    def select(self, rows: Tensor) -> "KVCache":
        """A new cache holding only the given batch rows (used to drop finished sequences)."""
        return KVCache(self.k[:, rows].clone(), self.v[:, rows].clone(), self.key_valid[rows].clone())


@dataclass
class LayerListKVCache(KVCache):
    """A KVCache holding one independent tensor per layer: `k`, `v` are lists of (B, kv_heads, max_seq, head_dim).
    Exported graphs use it: tracing records in-place writes on a tensor faithfully, but not their effect on the
    base of a view (a slice of one stacked tensor), which the exported graph would then return unchanged."""

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq(self) -> int:
        return self.k[0].shape[2]


@dataclass
class ReadOnlyKVCache(LayerListKVCache):
    """A per-layer cache that one forward reads and does not write; the slice's own keys and values are appended
    to `new_k` / `new_v` (one (B, kv_heads, L, head_dim) per layer) for the caller to write at its positions. Each
    query attends to the cached positions before the slice and to the slice's keys as two blocks under one softmax
    (`Attention.forward`), so no cache is copied: what an exported graph needs, where writing rows into an input
    tensor means a copy of all of it (onnxruntime: int8 decode steps 1.26x slower). The slice must be contiguous
    positions."""

    new_k: list[Tensor] = field(default_factory=list)
    new_v: list[Tensor] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = nn.Linear(cfg.dim, cfg.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def qkv(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> q (B, L, n_head, head_dim), k and v (B, L, kv_heads, head_dim), RoPE applied to q, k."""
        bsz, seqlen, dim = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([dim, kv_dim, kv_dim], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), rope)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_kv_head, self.head_dim), rope)
        return q, k, v.view(bsz, seqlen, self.n_kv_head, self.head_dim)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor,
                cache: tuple | None) -> Tensor:
        """`input_pos` (L,) shared by every row, or (B, L) per row with `cache` = (k, v, rows): row b of the
        input reads and writes cache row rows[b]. `cache` = (k, v, ReadOnlyKVCache): read k, v, do not write."""
        bsz, seqlen, dim = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, rope))
        if cache is not None and isinstance(cache[-1], ReadOnlyKVCache):
            out = self._attend_past_and_slice(q, k, v, cache, mask, input_pos)
        else:
            out = self._write_and_attend(q, k, v, cache, mask, input_pos)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(bsz, seqlen, dim)))

    def _write_and_attend(self, q: Tensor, k: Tensor, v: Tensor, cache: tuple | None, mask: Tensor,
                          input_pos: Tensor) -> Tensor:
        """Write the slice's keys and values into the cache (if any), then attend over all of it under `mask`."""
        if cache is not None and input_pos.dim() == 2:  # per-row positions into cache rows `rows`
            k_cache, v_cache, rows = cache
            k_cache[rows[:, None], :, input_pos] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows[:, None], :, input_pos] = v.transpose(1, 2).to(v_cache.dtype)
            k, v = k_cache[rows], v_cache[rows]
        elif cache is not None:
            k_cache, v_cache = cache[:2]
            k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        return F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), attn_mask=mask,
                                              dropout_p=self.attn_dropout_p if self.training else 0.0)

    def _repeat_kv(self, x: Tensor) -> Tensor:
        return x if self.n_kv_head == self.n_head else x.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

    def _attend_past_and_slice(self, q: Tensor, k: Tensor, v: Tensor, cache: tuple, mask: Tensor,
                               input_pos: Tensor) -> Tensor:
        """Attention over [cache before the slice; the slice] without writing the cache: the model's mask (B, 1,
        L, max_seq) restricted to the keys before input_pos[0], and its columns at input_pos for the slice."""
        k_past, v_past, sink = cache
        sink.new_k.append(k)
        sink.new_v.append(v)
        keys = torch.arange(k_past.shape[2], device=q.device)
        past_mask = mask & (keys < input_pos[:1])
        slice_mask = mask.index_select(-1, input_pos)
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = torch.cat([q @ self._repeat_kv(k_past.to(q.dtype)).transpose(-1, -2),
                            q @ self._repeat_kv(k).transpose(-1, -2)], dim=-1) * scale
        p = scores.masked_fill(~torch.cat([past_mask, slice_mask], dim=-1), float("-inf")).softmax(dim=-1)
        n_past = k_past.shape[2]
        return p[..., :n_past] @ self._repeat_kv(v_past.to(q.dtype)) + p[..., n_past:] @ self._repeat_kv(v)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor,
                cache: tuple[Tensor, ...] | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def precompute_rope_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int,
                       prefix: str = "zero") -> Tensor:
    """LlamaGen's 2D RoPE table, (cls_token_num + grid_size**2, head_dim // 2, 2) of (cos, sin).

    Half of each head rotates with the row index, half with the column index. With prefix="zero" the condition
    prefix gets rows of zeros (cos = sin = 0), exactly as the official code, which zeroes prefix queries and keys:
    required to match official logits, but every image token then gives every prefix token the same attention
    score. prefix="identity" (cos = 1, sin = 0) keeps the prefix's keys, so image tokens can attend to it by content.
    prefix="grid" places the prefix on the image: its first k*k rows (k = isqrt(cls_token_num)) sit at the centres
    of a k x k partition of the token grid in reading order, the rest at the image centre, so an image token's
    score for a prefix token depends on their offset as it does between image tokens (a slot per grid cell is
    looked up by where the token is, with RoPE's bias towards what is near).
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))

    def rotations(rows: Tensor, cols: Tensor) -> Tensor:  # positions (N,) -> (N, half, 2)
        angles = torch.cat([torch.outer(rows, freqs), torch.outer(cols, freqs)], dim=-1)
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)

    idx = torch.arange(grid_size, dtype=torch.float32)
    table = rotations(idx.repeat_interleave(grid_size), idx.repeat(grid_size))
    if prefix == "zero":
        head = torch.zeros(cls_token_num, half, 2)
    elif prefix == "identity":
        head = rotations(torch.zeros(cls_token_num), torch.zeros(cls_token_num))
    elif prefix == "grid":
        k = math.isqrt(cls_token_num)
        centres = (torch.arange(k, dtype=torch.float32) + 0.5) * grid_size / k - 0.5
        middle = torch.full((cls_token_num - k * k,), (grid_size - 1) / 2)
        head = rotations(torch.cat([centres.repeat_interleave(k), middle]), torch.cat([centres.repeat(k), middle]))
    else:
        raise ValueError(f"prefix must be 'zero', 'identity' or 'grid', got {prefix!r}")
    return torch.cat([head, table])


def apply_rotary_emb(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate pairs of channels. x: (B, L, H, D); rope: (L, D // 2, 2), or (B, L, D // 2, 2) per row."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    r = rope.view(rope.shape[0] if rope.dim() == 4 else 1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * r[..., 0] - xs[..., 1] * r[..., 1],
                       xs[..., 1] * r[..., 0] + xs[..., 0] * r[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


@dataclass
class GPTOutput:
    logits: Tensor  # (B, L, V) float32
    hidden: Tensor  # (B, L, dim): the final-norm hidden state the heads read


class GPT(nn.Module):
    """LlamaGen `Transformer`. Sequence layout: [condition prefix (cls_token_num); image tokens]."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.class_dropout_prob, cfg.cls_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Not persistent: official checkpoints may or may not carry it; it is always recomputed.
        self.register_buffer("freqs_cis", precompute_rope_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base,
                                                             cfg.cls_token_num, cfg.prefix_rope),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        nn.init.zeros_(self.output.weight)  # as LlamaGen

    # ---- conditioning -------------------------------------------------------------------------------------
    def null_condition(self, cond: Tensor) -> Tensor:
        """The CFG null condition shaped like `cond` (null class id, or the learned null caption)."""
        return self.cls_embedding.null_condition(cond)

    def cfg_condition(self, cond: Tensor) -> Tensor:
        """The doubled CFG batch [cond; uncond]."""
        return torch.cat([cond, self.null_condition(cond)])

    def embed_condition(self, cond: Tensor, drop: Tensor | None = None) -> Tensor:
        """Prefix embeddings (B, cls_token_num, dim); `drop` (B,) bool replaces rows by the null condition."""
        return self.cls_embedding(cond, drop)[:, : self.config.cls_token_num]

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, *, cond: Tensor | None = None, tokens: Tensor | None = None,
                input_pos: Tensor | None = None, cache: KVCache | None = None,
                cond_mask: Tensor | None = None, cond_drop: Tensor | None = None,
                extra_embeddings: Tensor | None = None) -> GPTOutput:
        """Run the model over a contiguous slice of the sequence.

        - `cond` only: prefill of the condition prefix (positions 0..P-1).
        - `tokens` only: image tokens at `input_pos` (one-token decode, or a block of k for verification).
        - both: [prefix; tokens] from position 0 (training and the no-cache reference forward).
        `cache` None means no cache: the slice must start at position 0. With a cache, the keys/values of the
        slice are written at `input_pos` and queries attend to every earlier cached position.
        `cond_mask` (B, P) bool marks valid prefix positions (padding False). `extra_embeddings` (B, L_tokens,
        dim) is added to the token embeddings.
        """
        parts = []
        if cond is not None:
            parts.append(self.embed_condition(cond, cond_drop))
        if tokens is not None:
            emb = self.tok_embeddings(tokens)
            if extra_embeddings is not None:
                emb = emb + extra_embeddings.to(emb.dtype)
            parts.append(emb)
        if not parts:
            raise ValueError("forward needs cond, tokens, or both")
        h = self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        if input_pos is None and cache is not None and cond is None:
            raise ValueError("decoding from a cache needs input_pos")
        return self.forward_embeddings(h, input_pos=input_pos, cache=cache, cond_mask=cond_mask)

    def forward_embeddings(self, h: Tensor, *, input_pos: Tensor | None = None,
                           cache: KVCache | ReadOnlyKVCache | None = None,
                           cond_mask: Tensor | None = None, rows: Tensor | None = None) -> GPTOutput:
        """The transformer on input embeddings (B, L, dim) at `input_pos` (default 0..L-1). The exported device
        graph enters here: prefix embeddings and token embeddings go through the same path.

        With `rows` (B,) the batch is a subset of the cache's rows (row b is cache row rows[b]) and `input_pos` is
        (B, L), one position per row and step: sequences at different lengths share one forward (the cloud
        bridge batches many sessions this way). Positions past the rotary table (padding) reuse its last entry."""
        bsz, seqlen, _ = h.shape
        if input_pos is None:
            input_pos = torch.arange(seqlen, device=h.device)
        expected = (bsz, seqlen) if rows is not None else (seqlen,)
        if input_pos.shape != expected:
            raise ValueError(f"input_pos has shape {tuple(input_pos.shape)}, expected {expected}")
        if rows is not None and (cache is None or cond_mask is not None or rows.shape != (bsz,)):
            raise ValueError("rows needs a cache, no cond_mask, and one cache row per input row")
        if rows is not None and isinstance(cache, ReadOnlyKVCache):
            raise ValueError("rows needs a KVCache: a ReadOnlyKVCache serves one batch at shared positions")

        if cache is not None:
            if rows is None and cache.batch != bsz:
                raise ValueError(f"cache holds batch {cache.batch} but the input has batch {bsz}")
            if cond_mask is not None:
                cache.key_valid[:, : cond_mask.shape[1]] = cond_mask
            key_valid = cache.key_valid if rows is None else cache.key_valid[rows]
            n_keys = cache.max_seq
        else:
            key_valid = torch.ones(bsz, seqlen, dtype=torch.bool, device=h.device)
            if cond_mask is not None:
                key_valid[:, : cond_mask.shape[1]] = cond_mask
            n_keys = seqlen
        mask = self.attention_mask(input_pos, key_valid, n_keys)
        if rows is None:
            rope = self.freqs_cis[input_pos].float()
        else:
            rope = self.freqs_cis[input_pos.clamp(max=self.freqs_cis.shape[0] - 1)].float()

        for i, layer in enumerate(self.layers):
            if cache is None:
                layer_cache = None
            elif isinstance(cache, ReadOnlyKVCache):
                layer_cache = (cache.k[i], cache.v[i], cache)
            else:
                layer_cache = (cache.k[i], cache.v[i]) if rows is None else (cache.k[i], cache.v[i], rows)
            h = layer(h, rope, mask, input_pos, layer_cache)
        h = self.norm(h)
        return GPTOutput(logits=self.output(h).float(), hidden=h)

    @staticmethod
    def attention_mask(input_pos: Tensor, key_valid: Tensor, n_keys: int) -> Tensor:
        """(B, 1, L, n_keys) bool: causal, minus padded keys, always keeping the diagonal (no empty rows).
        `input_pos` (L,) for every row, or (B, L) per row."""
        keys = torch.arange(n_keys, device=input_pos.device)
        if input_pos.dim() == 2:
            causal = keys <= input_pos[..., None]
            diag = keys == input_pos[..., None]
            return ((causal & key_valid[:, None, :n_keys]) | diag).unsqueeze(1)
        causal = keys[None, :] <= input_pos[:, None]
        diag = keys[None, :] == input_pos[:, None]
        return ((causal[None] & key_valid[:, None, :n_keys]) | diag[None]).unsqueeze(1)

    def image_logits(self, cond: Tensor, tokens: Tensor, cond_mask: Tensor | None = None,
                     cond_drop: Tensor | None = None, extra_embeddings: Tensor | None = None) -> GPTOutput:
        """Teacher-forced logits for every image token: output i predicts tokens[:, i] (training)."""
        out = self(cond=cond, tokens=tokens[:, :-1], cond_mask=cond_mask, cond_drop=cond_drop,
                   extra_embeddings=None if extra_embeddings is None else extra_embeddings[:, :-1])
        start = self.config.cls_token_num - 1
        return GPTOutput(out.logits[:, start:], out.hidden[:, start:])

    def new_cache(self, batch: int, max_seq: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache.empty(self.config, batch, max_seq, dtype=p.dtype, device=p.device)
