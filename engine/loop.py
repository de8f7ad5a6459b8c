"""The one collaborative decoding loop that every method runs (gpt-fast style speculative decoding).

At image position t the device drafts a token (or a chain of k). The gate keeps it on the device or sends it,
together with every device token the cloud has not seen, to the cloud, which verifies in one forward: the
acceptance policy keeps n drafts and samples the token after them (a correction, or a bonus token when all were
kept). Both models then continue from t + n + 1; a rollback is just writing the cache again from there. The
device writes its drafts into its cache while the verification is out (on its own clock, overlapping the cloud's),
so after the verdict it feeds one token, the verdict's, whether the drafts were kept or not.

With `method.chain_extend` the chain is the run of uncertain drafts from t, up to `method.chain` of them, ended
by the first confident one: an uncertain region goes up in one verification instead of one per draft.

With `method.lookahead` > 0 the device does not wait for verdicts. It drafts on as if its chains were kept (where
a verdict will put the cloud's own token, the bonus after a kept chain, it puts its most likely token as a guess),
sends further uncertain drafts while up to `method.max_in_flight` verifications are out, and stops `lookahead`
drafts past the oldest one until that verdict lands. Verdicts land in order. Drafts that agree with a verdict
stand; otherwise the device rewinds to the verdict's token, and later requests (built on the void drafts) are
void: the cloud, seeing they do not carry its own token, answers them stale without a forward. The tokens are
those of the waiting loop (the same distribution; identical under greedy decoding); only the time differs. When
the device looks at a verdict is fixed by the tokens, never by the clock, so an image does not depend on the link
or the machine's speed.
"""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future
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
from .proposer import DeviceProposer, Proposer
from .timeline import Timeline
from .transport import InProcessTransport
from .verifier import CloudVerifier

LOCAL, PREFIX, VERIFIED, CLOUD = 0, 1, 2, 3  # where each final token came from
SCORED = ("interval", "entropy", "maxprob", "latent")  # gate scores recorded for every draft (calibration, analysis)


@dataclass
class GenerationResult:
    tokens: Tensor  # (B, T)
    source: Tensor  # (B, T) int8: LOCAL, PREFIX, VERIFIED (a draft the cloud kept), CLOUD (sampled by the cloud)
    sent: Tensor  # (B, T) bool: a device draft at this position went to the cloud (the uncertainty map)
    scores: dict[str, Tensor]  # gate kind -> (B, T) score of the device's draft (nan where it drafted none)
    stats: dict[str, float] = field(default_factory=dict)
    timeline: Timeline | None = None  # what the session did, to price it on another link (Timeline.seconds)

    @property
    def u(self) -> Tensor:
        return self.scores["interval"]


@dataclass
class _InFlight:
    """A verification the cloud has not answered yet: the chain of k drafts at positions t..t+k-1."""
    reply: Future
    t: int
    k: int


@torch.inference_mode()
def collaborative_generate(method: Method, cloud: GPT, device: DeviceModel, cond: Tensor,
                           sampling: SamplingConfig, generator: torch.Generator, *,
                           phi: IntervalProjection | None = None, link: LinkProfile = LINKS["lan"],
                           caption_bytes: int = 100, neighbours: Tensor | None = None,
                           budget: BudgetController | None = None, feature_top: int = 8,
                           policy: AcceptancePolicy | None = None,
                           proposer: Proposer | None = None, codebook: Tensor | None = None) -> GenerationResult:
    """Generate (B, T) tokens with `method`. `policy` overrides the method's acceptance policy (tests);
    `proposer` runs the device side (default: `device` in PyTorch eager; a `BundleProposer` runs an exported graph,
    and `device` then only embeds the condition). `codebook` is the VQ codebook (V, D) that the latent gate reads;
    without it the latent score is not recorded (nan) and a latent-gated method is refused."""
    T, B = cloud.config.block_size, cond.shape[0]
    if codebook is None and method.gate == "latent":
        raise ValueError(f"method {method.name!r} gates on the latent spread, which reads the VQ codebook: pass "
                         "codebook=VQModel.quantize.codebook()")
    recorded = [kind for kind in SCORED if codebook is not None or kind != "latent"]
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
        return _result(tokens, source, sent, scores, transport, verifier, T,
                       {"drafts": 0, "rewinds": 0, "voided": 0, "kept_ahead": 0})

    proposer = proposer or DeviceProposer(device, sampling, feature_top)
    F = proposer.feature_dim
    if not F and (method.gate == "interval" or method.use_phi):
        raise ValueError(f"method {method.name!r} reads the Inter-Head's interval, and this device has none (a "
                         "bare-gate bundle): run it on a bundle exported with --gate interval")
    m = int(method.prefix_fraction * T)
    opened = transport.open(cond, T, F, caption_bytes, m, generator)
    timeline = transport.timeline
    with timeline.device():
        proposer.start(cond, T)  # while the cloud writes the prefix
    tokens[:, :m] = transport.wait(opened)
    source[:, :m] = PREFIX
    if m:
        with timeline.device():
            proposer.ingest(tokens[:, :m], 0)
    if budget is not None:
        budget.reserve(m, T)  # the prefix's forwards come out of the image's cloud-call budget
    tau = budget.tau if budget else method.tau
    t = m  # the device's next position (its cache holds every one before)
    triggers = torch.zeros(T + 1, dtype=torch.bool)  # positions whose draft triggered a verification
    cloud_from, cloud_known = m, m  # the first token the cloud has not ingested; the first it does not know
    rewinds = voided = kept_ahead = 0  # drafts made past a verification in flight: void / standing
    made = 0  # device drafts made, standing or not
    tau_at = [tau] * (T + 1)  # tau when the device reached each position: a rewind restores it (the budget)
    flights: deque[_InFlight] = deque()  # sent and not landed yet, oldest first

    def land() -> bool:
        """Apply the oldest flight's verdict. False when the device rewound to the position after the verdict's
        token: its drafts from there on, and every later flight (built on them), are void."""
        nonlocal t, cloud_from, cloud_known, rewinds, voided, kept_ahead, tau
        f = flights.popleft()
        n_t, nxt = transport.wait(f.reply)
        at = f.t + int(n_t[0])  # n drafts kept; the verdict's own token goes here
        if at >= T:  # the chain ended the image
            t = T
            return True
        # the drafts past the chain stand if the device drafted the very token the cloud chose after the chain
        agree = at == f.t + f.k and t > at and bool((tokens[:, at] == nxt).all())
        tokens[:, at], source[:, at] = nxt, CLOUD
        if agree:
            kept_ahead += t - at
            return True
        sent[:, at + 1:] = False  # drafts past the verdict's token are void (a chain's tail, drafts made ahead)
        lost = max(0, t - (f.t + f.k))
        if lost:  # forget what the void drafts recorded; the budget counts only drafts that stand
            rewinds, voided = rewinds + 1, voided + lost
            for kind in SCORED:
                scores[kind][:, at + 1:] = math.nan
            triggers[at + 1:] = False
            tau = tau_at[at + 1]
            if budget is not None:
                budget.tau = tau
        verifier.forget_features(at + 1)
        for void in flights:
            transport.discard(void.reply)
        flights.clear()
        with timeline.device():
            start = min(t, at)
            proposer.ingest(tokens[:, start:at + 1], start)
        t, cloud_from, cloud_known = at + 1, at, at + 1
        return False

    while t < T or flights:
        if flights and (t >= T or t >= flights[0].t + flights[0].k + method.lookahead):
            land()
            continue
        made += 1
        if flights and flights[-1].t + flights[-1].k == t:
            # the last chain's verdict puts the cloud's own token here: the device only guesses it (its most
            # likely token: the best bet that the drafts after it stand); no gate, no record, as when waiting
            with timeline.device():
                guess = proposer.draft(generator).q.argmax(-1)
                proposer.ingest(guess[:, None], t)
            tokens[:, t], source[:, t] = guess, LOCAL
            t += 1
            tau_at[t] = tau
            continue
        with timeline.device():
            d = proposer.draft(generator)
            verifier.record_features(t, d.features)
            score = gate_score(method.gate, d, generator, codebook)
            send = score >= tau
        for kind in recorded:  # for calibration and analysis, off the device's clock: a device computes only its gate
            scores[kind][:, t] = score if kind == method.gate else gate_score(kind, d, generator, codebook)
        any_sent = bool(send.any())
        if any_sent and len(flights) >= method.max_in_flight and not land():
            continue  # waited for the oldest verdict, which voided this draft
        triggers[t] = any_sent
        if budget is not None:  # after every draft, kept or sent: a quiet stretch lowers tau too
            tau = budget.update(int(triggers[:t + 1].sum()), t + 1 - m)
        if not any_sent:
            tokens[:, t], source[:, t] = d.token, LOCAL
            with timeline.device():
                proposer.ingest(d.token[:, None], t)
            t += 1
            tau_at[t] = tau
            continue
        sent[:, t] = send
        k = min(method.chain, T - t)
        drafts, qs = [d.token], [d.q]
        with timeline.device():
            for j in range(1, k):
                proposer.ingest(drafts[-1][:, None], t + j - 1)
                dj = proposer.draft(generator)
                made += 1
                verifier.record_features(t + j, dj.features)
                drafts.append(dj.token)
                qs.append(dj.q)
                if method.chain_extend:  # the uncertain run goes up in one chain, ended by a confident draft
                    more = send & (gate_score(method.gate, dj, generator) >= tau)
                    if not bool(more.any()):
                        break
                    sent[:, t + j] = more
        k = len(drafts)
        chain = torch.stack(drafts, 1)
        local = None if bool(send.all()) else ~send
        reply = transport.verify(cloud_from, tokens[:, cloud_from:t], t - cloud_known, chain, torch.stack(qs, 1),
                                 F, generator, local)
        tokens[:, t:t + k] = chain
        source[:, t:t + k] = torch.where(send[:, None], VERIFIED, LOCAL).to(torch.int8)
        flights.append(_InFlight(reply, t, k))
        cloud_from, cloud_known = t + k, min(t + k + 1, T)  # as if the chain is kept
        tau_at[t + 1:t + k + 1] = [tau] * k
        with timeline.device():  # while the cloud verifies: after the verdict, one token to feed, kept or not
            proposer.ingest(chain[:, -1:], t + k - 1)
        t += k
        if not method.lookahead:  # wait for the verdict (with lookahead: draft on)
            land()
    return _result(tokens, source, sent, scores, transport, verifier, T,
                   {"drafts": made, "rewinds": rewinds, "voided": voided, "kept_ahead": kept_ahead})


def _result(tokens, source, sent, scores, transport: InProcessTransport, verifier: CloudVerifier, T: int,
            extra: dict[str, float]) -> GenerationResult:
    s, timeline = transport.stats, transport.timeline
    seconds = timeline.seconds(transport.link)
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
        "device_seconds": timeline.device_seconds,
        "cloud_seconds": s.cloud_seconds,
        "link_seconds": timeline.link_seconds(transport.link),
        "seconds": seconds,
        "waiting_seconds": seconds - timeline.device_seconds,  # the device idle, waiting for the cloud
        "requests": s.requests,
        "stale_requests": s.stale,
        "verify_ms_p50": float(np.median(s.per_call_ms)) if s.per_call_ms else 0.0,
        **extra,
    }
    return GenerationResult(tokens, source, sent, scores, stats, timeline)
