"""GPT configurations: LlamaGen's named models and small custom ones."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a LlamaGen-architecture GPT (`autoregressive/models/gpt.py: ModelArgs`).

    `model_type` "c2i" conditions on a class label (1 prefix token), "t2i" on caption features of shape
    (cls_token_num, caption_dim). `block_size` is the number of image tokens (a square grid).
    """

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: Literal["c2i", "t2i"] = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    # RoPE rows of the condition prefix: "zero" is LlamaGen's (cos = sin = 0: prefix queries and keys are zeroed,
    # so every image token weighs every prefix token equally and cannot look a word up by content); "identity"
    # (cos = 1, sin = 0) leaves them unrotated, so attention to the prefix is content-based; "grid" places the
    # prefix at the centres of a k x k partition of the image (k = isqrt(cls_token_num); the rest at the image
    # centre), so a slot per grid cell is found by where the image token is (`precompute_rope_2d`).
    prefix_rope: Literal["zero", "identity", "grid"] = "zero"

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} must be a perfect square (a token grid)")
        if (self.dim // self.n_head) % 4:
            raise ValueError("head_dim must be a multiple of 4 for 2D RoPE")
        if self.prefix_rope not in ("zero", "identity", "grid"):
            raise ValueError(f"prefix_rope must be 'zero' (LlamaGen), 'identity' or 'grid', got {self.prefix_rope!r}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ValueError("class conditioning uses exactly one prefix token (cls_token_num=1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def max_seq_len(self) -> int:
        """Prefix plus every image token (the last one is only ever an input when verifying)."""
        return self.cls_token_num + self.block_size

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {unknown}")
        return cls(**d)


# LlamaGen's registry (layers, heads, dim); FFN width follows from dim as in the official code.
_NAMED = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),
}
GPT_CONFIG_NAMES = tuple(_NAMED)


def gpt_config(name: str, **overrides: Any) -> GPTConfig:
    """A named LlamaGen config (`GPT-B` ... `GPT-7B`), with overrides (vocab, model_type, block_size...).

    LlamaGen t2i checkpoints use `model_type="t2i", cls_token_num=120, caption_dim=2048`.
    """
    if name not in _NAMED:
        raise KeyError(f"unknown GPT config {name!r}; choose one of {', '.join(_NAMED)}")
    return GPTConfig(**{**_NAMED[name], **overrides})
