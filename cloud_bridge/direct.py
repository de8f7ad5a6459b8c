"""The cloud verifier in the device's process, with no socket: the runtime's `Verifier` calling `CloudService`
directly. Every request still goes through the protocol's encode and decode (the same fp16 rounding, the same
checks), so an image made this way equals one made through the websocket bridge with the same seed."""
from __future__ import annotations

import numpy as np

from . import protocol as pr
from .client import open_message, verify_message
from .cloud import CloudService
from .session import Chain, SessionParams, Verdict, Verifier


class DirectVerifier(Verifier):
    """In one process nothing runs in the background: `submit` runs the verification, `result` hands it over."""

    def __init__(self, service: CloudService, owner: str = "local") -> None:
        self.service, self.owner = service, owner
        self.session = None
        self.seq = 0
        self.use_features = False

    def _wire(self, msg: pr.Message) -> pr.Message:
        return pr.decode(msg.encode(), self.service.limits)

    def open(self, params: SessionParams) -> np.ndarray:
        msg = self._wire(open_message(params, self.service.limits))
        self.use_features = msg.use_interval_features
        self.session, prefix = self.service.run_now(self.service.open(msg, self.owner))
        self.seq = 0
        return prefix

    def submit(self, start, tokens, features, chain: Chain) -> Verdict:
        self.seq += 1
        msg = self._wire(verify_message(self.session.id, self.seq, start, tokens, features, chain, self.use_features))
        verdict = self.service.run_now(self.service.verify(self.session, msg))
        return Verdict(verdict.n_accepted, verdict.next_token, verified=True)

    def result(self, pending: Verdict) -> Verdict:
        return pending

    def close(self) -> None:
        if self.session is not None:
            self.service.close(self.session.id)
            self.session = None
