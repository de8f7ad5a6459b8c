"""Typed records passed between proposer, gate, verifier and loop."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Draft:
    """One device step for every row: the drawn token, its processed distribution and its interval."""

    token: Tensor  # (B,) int64
    q: Tensor  # (B, V) processed probabilities the token was drawn from
    u: Tensor  # (B,) U score (nan from a device without an Inter-Head: a bare-gate bundle)
    features: Tensor  # (B, F) [h_device; interval stats], uploaded with the token (F = 0 without an Inter-Head)
