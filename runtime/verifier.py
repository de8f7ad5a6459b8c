"""What the device loop asks of the cloud (`Verifier`, in `ciar.cloud_bridge.session`). `LocalVerifier` is the
offline stand-in: no prefix, and a token sent for verification is kept as drafted (the stats report it as never
verified)."""
from __future__ import annotations

import numpy as np

from ciar.cloud_bridge.session import Chain, SessionParams, Verdict, Verifier

__all__ = ["Chain", "LocalVerifier", "SessionParams", "Verdict", "Verifier"]


class LocalVerifier(Verifier):
    """Offline: the device writes every token; drafts the gate would send are kept as drafted."""

    def open(self, params: SessionParams) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def submit(self, start, tokens, features, chain: Chain) -> Chain:
        return chain

    def settled(self, pending: Chain) -> bool:
        return True

    def result(self, pending: Chain) -> Verdict:
        return Verdict.kept_locally(pending)
