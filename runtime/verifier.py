"""What the device loop asks of the cloud. `LocalVerifier` is the offline stand-in: no prefix, and a token sent
for verification is kept as drafted (the stats report it as never verified)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ciar.cloud_bridge.session import Chain, SessionParams, Verdict

__all__ = ["Chain", "LocalVerifier", "SessionParams", "Verdict", "Verifier"]


class Verifier(Protocol):
    def open(self, params: SessionParams) -> np.ndarray:
        """Start a session; returns the prefix tokens the cloud wrote (possibly none)."""

    def verify(self, start: int, tokens: np.ndarray, features: np.ndarray, chain: Chain) -> Verdict:
        """`tokens` (n,) accepted on the device since the last sync, at positions start..start+n-1, with their
        interval features (n, F); then the chain of k drafts with their sparse distributions and features."""

    def close(self) -> None: ...


class LocalVerifier:
    """Offline: the device writes every token; drafts the gate would send are kept as drafted."""

    def open(self, params: SessionParams) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def verify(self, start, tokens, features, chain: Chain) -> Verdict:
        return Verdict(n_accepted=len(chain), next_token=None, verified=False)

    def close(self) -> None:
        pass
