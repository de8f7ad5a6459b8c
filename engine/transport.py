"""The device-cloud transport. In-process here (the websocket bridge implements the same calls later): each call
returns a Future, counts the bytes the wire protocol encodes, and times the cloud (the link time is the timeline's).
`wait` takes a reply; on the session's timeline that is where the device stops until the reply is there, so a
loop that drafts between `verify` and `wait` overlaps its work with the cloud's and the link's."""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import link as wire
from .link import LinkProfile
from .timeline import Request, Timeline
from .verifier import CloudVerifier


@dataclass
class LinkStats:
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_seconds: float = 0.0
    requests: int = 0
    stale: int = 0  # verify requests the cloud answered stale (built on drafts an earlier verdict voided)
    per_call_ms: list[float] = field(default_factory=list)


class InProcessTransport:
    def __init__(self, verifier: CloudVerifier, link: LinkProfile) -> None:
        self.verifier, self.link, self.stats = verifier, link, LinkStats()
        self.timeline = Timeline()
        self._cloud_s = 0.0  # cloud compute of the request being built
        self._pending: dict[Future, int] = {}  # reply -> its request on the timeline

    def _reply(self, result, up: int, down: int) -> Future:
        """Charge one request (bytes, the cloud compute timed by `_run`) and put it on the timeline."""
        self.stats.bytes_up += up
        self.stats.bytes_down += down
        self.stats.requests += 1
        fut: Future = Future()
        fut.set_result(result)
        self._pending[fut] = self.timeline.send(Request(self._cloud_s, up, down))
        self._cloud_s = 0.0
        return fut

    def _run(self, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        dt = time.perf_counter() - t0
        self.stats.cloud_seconds += dt
        self.stats.per_call_ms.append(1000 * dt)
        self._cloud_s += dt
        return result

    def wait(self, reply: Future):
        """The reply's result; the device waits for it here on the timeline."""
        self.timeline.wait(self._pending.pop(reply))
        return reply.result()

    def discard(self, reply: Future) -> None:
        """A reply the device no longer needs (its request was built on drafts it threw away): never waited for."""
        del self._pending[reply]

    def open(self, cond: Tensor, num_tokens: int, feature_dim: int, caption_bytes: int, prefix: int,
             generator: torch.Generator) -> Future:
        """Open a session: the caption goes up, the cloud prefills and writes `prefix` tokens, which come down."""
        self._run(self.verifier.start, cond, num_tokens, feature_dim)
        tokens = self._run(self.verifier.prefix, prefix, generator) if prefix else torch.empty(cond.shape[0], 0,
                                                                                               dtype=torch.long)
        return self._reply(tokens, wire.open_bytes(caption_bytes), wire.tokens_bytes(prefix))

    def verify(self, start: int, unseen: Tensor, n_uploaded: int, drafts: Tensor, q: Tensor, feature_dim: int,
               generator: torch.Generator, local: Tensor | None = None) -> Future:
        """`n_uploaded` of the `unseen` tokens (from image position `start`) travel up (the rest the cloud sampled
        itself). The reply is the verdict, or None when the cloud found the request stale (CloudVerifier.verify)."""
        verdict = self._run(self.verifier.verify, start, unseen, drafts, q, generator, local)
        self.stats.stale += verdict is None
        support = int((q > 0).sum(-1).max())
        return self._reply(verdict, wire.verify_request_bytes(n_uploaded, drafts.shape[1], support, feature_dim),
                           wire.verdict_bytes())

    def stream_all(self, cond: Tensor, num_tokens: int, caption_bytes: int, generator: torch.Generator) -> Tensor:
        """The cloud-only base: one request, the cloud writes every token, the tokens stream back."""
        self._run(self.verifier.start, cond, num_tokens, 0)
        tokens = self._run(self.verifier.prefix, num_tokens, generator)
        return self.wait(self._reply(tokens, wire.open_bytes(caption_bytes), wire.tokens_bytes(num_tokens)))
