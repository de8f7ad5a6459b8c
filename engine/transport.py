"""The device-cloud transport. In-process here (the websocket bridge implements the same calls later): each call
returns a Future, charges the bytes the wire protocol encodes and the emulated link time, and times the cloud."""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import link as wire
from .link import LinkProfile
from .verifier import CloudVerifier


@dataclass
class LinkStats:
    bytes_up: int = 0
    bytes_down: int = 0
    link_seconds: float = 0.0
    cloud_seconds: float = 0.0
    requests: int = 0
    per_call_ms: list[float] = field(default_factory=list)


class InProcessTransport:
    def __init__(self, verifier: CloudVerifier, link: LinkProfile) -> None:
        self.verifier, self.link, self.stats = verifier, link, LinkStats()

    def _charge(self, up: int, down: int) -> None:
        self.stats.bytes_up += up
        self.stats.bytes_down += down
        self.stats.link_seconds += self.link.request_s(up, down)
        self.stats.requests += 1

    def _run(self, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        dt = time.perf_counter() - t0
        self.stats.cloud_seconds += dt
        self.stats.per_call_ms.append(1000 * dt)
        return result

    def open(self, cond: Tensor, num_tokens: int, feature_dim: int, caption_bytes: int, prefix: int,
             generator: torch.Generator) -> Future:
        """Open a session: the caption goes up, the cloud prefills and writes `prefix` tokens, which come down."""
        fut: Future = Future()
        self._run(self.verifier.start, cond, num_tokens, feature_dim)
        tokens = self._run(self.verifier.prefix, prefix, generator) if prefix else torch.empty(cond.shape[0], 0,
                                                                                               dtype=torch.long)
        self._charge(wire.open_bytes(caption_bytes), wire.tokens_bytes(prefix))
        fut.set_result(tokens)
        return fut

    def verify(self, unseen: Tensor, n_uploaded: int, drafts: Tensor, q: Tensor, feature_dim: int,
               generator: torch.Generator, local: Tensor | None = None) -> Future:
        """`n_uploaded` of the `unseen` tokens travel up (the rest the cloud sampled itself)."""
        fut: Future = Future()
        n, nxt = self._run(self.verifier.verify, unseen, drafts, q, generator, local)
        support = int((q > 0).sum(-1).max())
        self._charge(wire.verify_request_bytes(n_uploaded, drafts.shape[1], support, feature_dim),
                     wire.verdict_bytes())
        fut.set_result((n, nxt))
        return fut

    def stream_all(self, cond: Tensor, num_tokens: int, caption_bytes: int, generator: torch.Generator) -> Tensor:
        """The cloud-only base: one request, the cloud writes every token, the tokens stream back."""
        self._run(self.verifier.start, cond, num_tokens, 0)
        tokens = self._run(self.verifier.prefix, num_tokens, generator)
        self._charge(wire.open_bytes(caption_bytes), wire.tokens_bytes(num_tokens))
        return tokens
