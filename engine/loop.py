"""The one collaborative decoding loop that every method runs (gpt-fast style speculative decoding).

At image position t the device drafts a token (or a chain of k). The gate keeps it on the device or sends it,
together with every device token the cloud has not seen, to the cloud, which verifies in one forward: the
acceptance policy keeps n drafts and samples the token after them (a correction, or a bonus token when all were
kept). Both models then continue from t + n + 1; a rollback is just writing the cache again from there.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ciar.models import GPT, DeviceModel, SamplingConfig
from ciar.models.phi import IntervalProjection

from .gates import BudgetController, gate_score
from .link import LINKS, LinkProfile
from .methods import Method
from .policy import AcceptancePolicy, LanternPolicy, speculative_sampling
from .proposer import DeviceProposer
from .transport import InProcessTransport
from .verifier import CloudVerifier

LOCAL, PREFIX, VERIFIED, CLOUD = 0, 1, 2, 3  # where each final token came from
SCORED = ("interval", "entropy", "maxprob")  # gate scores recorded for every draft (calibration, analysis)


@dataclass
class GenerationResult:
    tokens: Tensor  # (B, T)
    source: Tensor  # (B, T) int8: LOCAL, PREFIX, VERIFIED (a draft the cloud kept), CLOUD (sampled by the cloud)
    sent: Tensor  # (B, T) bool: a device draft at this position went to the cloud (the uncertainty map)
    scores: dict[str, Tensor]  # gate kind -> (B, T) score of the device's draft (nan where it drafted none)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def u(self) -> Tensor:
        return self.scores["interval"]


class _Clock:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self.t0


@torch.inference_mode()
def collaborative_generate(method: Method, cloud: GPT, device: DeviceModel, cond: Tensor,
                           sampling: SamplingConfig, generator: torch.Generator, *,
                           phi: IntervalProjection | None = None, link: LinkProfile = LINKS["lan"],
                           caption_bytes: int = 100, neighbours: Tensor | None = None,
                           budget: BudgetController | None = None, feature_top: int = 8,
                           policy: AcceptancePolicy | None = None) -> GenerationResult:
    """Generate (B, T) tokens with `method`. `policy` overrides the method's acceptance policy (tests)."""
    T, B = cloud.config.block_size, cond.shape[0]
    if policy is not None:
        pass
    elif method.policy == "exact":
        policy = speculative_sampling
    elif method.policy == "lantern":
        if neighbours is None:
            raise ValueError("the lantern policy needs VQ codebook neighbours (VQModel.codebook_neighbours)")
        policy = LanternPolicy(neighbours[:, : method.lantern_k], method.lantern_delta)
    else:
        raise ValueError(f"unknown acceptance policy {method.policy!r}")
    verifier = CloudVerifier(cloud, sampling, phi if method.use_phi else None, policy)
    transport = InProcessTransport(verifier, link)
    tokens = torch.zeros(B, T, dtype=torch.long)
    source = torch.full((B, T), CLOUD, dtype=torch.int8)
    sent = torch.zeros(B, T, dtype=torch.bool)
    scores = {kind: torch.full((B, T), math.nan) for kind in SCORED}

    if method.cloud_only:
        tokens = transport.stream_all(cond, T, caption_bytes, generator)
        return _result(tokens, source, sent, scores, transport, verifier, 0.0, T)

    F = device.config.dim + feature_top + 3
    m = int(method.prefix_fraction * T)
    tokens[:, :m] = transport.open(cond, T, F, caption_bytes, m, generator).result()
    source[:, :m] = PREFIX
    proposer, clock = DeviceProposer(device, sampling, feature_top), _Clock()
    with clock:
        proposer.start(cond, T)
        if m:
            proposer.ingest(tokens[:, :m], 0)
    tau = budget.tau if budget else method.tau
    t, cloud_known, drafted, n_sent = m, m, 0, 0
    while t < T:
        k = min(method.chain, T - t)
        drafts, qs = [], []
        with clock:
            for j in range(k):
                d = proposer.draft(generator)
                verifier.record_features(t + j, d.features)
                if j == 0:
                    for kind in SCORED:
                        scores[kind][:, t] = gate_score(kind, d, generator)
                drafts.append(d.token)
                qs.append(d.q)
                if j == 0:
                    send = gate_score(method.gate, d, generator) >= tau
                if j + 1 < k:
                    proposer.ingest(d.token[:, None], t + j)
        drafted += 1
        any_sent = bool(send.any())
        n_sent += any_sent
        if budget is not None:  # after every draft, kept or sent: a quiet stretch lowers tau too
            tau = budget.update(n_sent, drafted)
        if not any_sent:
            tokens[:, t], source[:, t] = drafts[0], LOCAL
            with clock:
                proposer.ingest(drafts[0][:, None], t)
            t += 1
            continue
        sent[:, t] = send
        chain = torch.stack(drafts, 1)
        local = None if bool(send.all()) else ~send
        n_t, nxt = transport.verify(tokens[:, verifier.n_ingested:t], t - cloud_known, chain, torch.stack(qs, 1),
                                    F, generator, local).result()
        n = int(n_t[0])
        tokens[:, t:t + n] = chain[:, :n]
        source[:, t:t + n] = torch.where(send[:, None], VERIFIED, LOCAL).to(torch.int8)
        if t + n < T:
            tokens[:, t + n], source[:, t + n] = nxt, CLOUD
        end = min(t + n + 1, T)
        with clock:
            start = t + min(n, k - 1)
            if start < end:
                proposer.ingest(tokens[:, start:end], start)
        t = cloud_known = end
    return _result(tokens, source, sent, scores, transport, verifier, clock.seconds, T)


def _result(tokens, source, sent, scores, transport: InProcessTransport, verifier: CloudVerifier,
            device_seconds: float, T: int) -> GenerationResult:
    s = transport.stats
    B = tokens.shape[0]
    decode_forwards = max(verifier.forwards - 1, 1)
    stats = {
        "tokens": T,
        "local": float((source == LOCAL).sum()) / B,
        "cloud": float((source != LOCAL).sum()) / B,
        "sent": float(sent.sum()) / B,
        "cloud_calls": verifier.forwards / T,
        "cloud_forwards": verifier.forwards,
        "tokens_per_cloud_forward": verifier.tokens_processed / decode_forwards,
        "bytes_up": s.bytes_up / B,
        "bytes_down": s.bytes_down / B,
        "device_seconds": device_seconds,
        "cloud_seconds": s.cloud_seconds,
        "link_seconds": s.link_seconds,
        "seconds": device_seconds + s.cloud_seconds + s.link_seconds,
        "requests": s.requests,
        "verify_ms_p50": float(np.median(s.per_call_ms)) if s.per_call_ms else 0.0,
    }
    return GenerationResult(tokens, source, sent, scores, stats)
