"""What the device loop asks of the cloud. `LocalVerifier` is the offline stand-in: no prefix, and a token sent
for verification is kept as drafted (the stats report it as never verified)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SessionParams:
    caption: str
    seed: int
    num_tokens: int
    prefix_tokens: int
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    feature_dim: int = 0  # width of the interval features the device uploads (0: none)


@dataclass(frozen=True)
class Verdict:
    n_accepted: int  # drafts the cloud kept (0 or 1 for one draft)
    next_token: int | None  # the token after them (a correction or the bonus), None past the last position
    verified: bool = True  # False when the cloud could not be reached and the draft was kept locally


class Verifier(Protocol):
    def open(self, params: SessionParams) -> np.ndarray:
        """Start a session; returns the prefix tokens the cloud wrote (possibly none)."""

    def verify(self, start: int, tokens: np.ndarray, features: np.ndarray, draft: int, q_ids: np.ndarray,
               q_probs: np.ndarray, draft_features: np.ndarray) -> Verdict:
        """`tokens` (n,) accepted on the device since the last sync, at positions start..start+n-1, with their
        interval features (n, F); then one draft with its sparse distribution and features."""

    def close(self) -> None: ...


class LocalVerifier:
    """Offline: the device writes every token; drafts the gate would send are kept as drafted."""

    def open(self, params: SessionParams) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def verify(self, start, tokens, features, draft, q_ids, q_probs, draft_features) -> Verdict:
        return Verdict(n_accepted=1, next_token=None, verified=False)

    def close(self) -> None:
        pass
