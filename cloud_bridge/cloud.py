"""The PyTorch cloud verifier behind the bridge: one session per image, all sessions in one slot pool.

Every session owns two rows of one shared static KV cache (the CFG pair [cond; uncond]) and is written as a
generator: it yields a `Work` item (input embeddings at its own positions) and receives the logits. A driver runs
the work: `run_now` one item at a time (the in-process verifier), or the server's batcher, which pads the items of
many sessions into ONE forward with per-row positions (`GPT.forward_embeddings(rows=...)`). The session logic --
prefill, prefix injection, verification with the acceptance policy and interval-feature conditioning -- exists
once, whichever driver runs it. Randomness: one torch generator per session, seeded by the Open's seed.

The forward runs where the cloud model's weights are (`BuiltinModels.cloud_to("cuda")`: the cache, the inputs and
the logits live there); the processed distributions come to the CPU for the acceptance policy and the draws, so
a session's CPU generator makes every draw on any device.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ciar.engine.policy import AcceptancePolicy, speculative_sampling
from ciar.models import SamplingConfig, model_probs, sample
from ciar.models.builtin import BuiltinModels
from ciar.models.gpt import KVCache
from ciar.models.phi import check_phi_device

from . import protocol as pr


@dataclass
class Work:
    """One session's share of a forward: input embeddings (rows, L, dim) at image positions pos .. pos+L-1."""

    rows: Tensor  # (rows,) cache rows of the session
    h: Tensor  # (rows, L, dim)
    pos: Tensor  # (L,) absolute sequence positions (prefix included)


Step = Generator[Work, Tensor, object]  # yields work, receives logits (rows, L, V), returns its result


@dataclass
class CloudSession:
    id: int
    owner: str  # the bearer token's principal
    slot: int
    rows: Tensor
    num_tokens: int
    sampling: SamplingConfig
    use_features: bool
    generator: torch.Generator
    tracker: pr.SequenceTracker = field(default_factory=pr.SequenceTracker)
    frontier: int = 0  # image tokens the cloud has decided or been told
    ingested: int = 0  # image tokens written into the cache
    pending: list[int] = field(default_factory=list)  # tokens the cloud sampled but has not ingested
    next_logits: Tensor | None = None  # (rows, V) predicting the token at `ingested`
    tokens: np.ndarray | None = None  # the final tokens so far (for Resumed)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # steps of this session in flight (its slot is freed only when none is)
    closed: bool = False


class CloudService:
    """The cloud models, the slot pool and the sessions. Not thread-safe: one driver at a time."""

    def __init__(self, models: BuiltinModels, max_sessions: int = 64,
                 policy: AcceptancePolicy = speculative_sampling) -> None:
        self.models, self.policy = models, policy
        self.model = models.cloud.eval()
        cfg = self.model.config
        self.device = next(self.model.parameters()).device
        check_phi_device(models.phi, self.device)
        self.P, self.T, self.V = cfg.cls_token_num, cfg.block_size, cfg.vocab_size
        self.rows_per_session = 2  # CFG pair; unguided sessions leave the second row idle
        self.scratch = self.P + self.T  # the cache column padding writes to (never read by a real query)
        self.cache = KVCache.empty(cfg, self.rows_per_session * max_sessions, self.scratch + 1, device=self.device)
        self.free_slots = list(range(max_sessions - 1, -1, -1))
        self.sessions: dict[int, CloudSession] = {}
        self.feature_dim = models.phi.config.in_dim
        self.limits = pr.Limits(max_num_tokens=self.T, vocab_size=self.V, feature_dim=self.feature_dim,
                                max_verify_tokens=self.T, max_drafts=8)
        self.forwards = 0
        self.work_items = 0

    @property
    def max_sessions(self) -> int:
        return self.cache.batch // self.rows_per_session

    # ---- the forward every driver runs -------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, items: list[Work]) -> list[Tensor]:
        """Pad the items into one batch (per-row positions; padding goes to the scratch column) and run it."""
        L = max(w.h.shape[1] for w in items)
        B = sum(w.h.shape[0] for w in items)
        h = torch.zeros(B, L, self.model.config.dim, device=self.device)
        pos = torch.full((B, L), self.scratch, dtype=torch.long, device=self.device)
        rows, b = torch.empty(B, dtype=torch.long, device=self.device), 0
        for w in items:
            r, n = w.h.shape[0], w.h.shape[1]
            h[b:b + r, :n], pos[b:b + r, :n], rows[b:b + r] = w.h, w.pos, w.rows
            b += r
        logits = self.model.forward_embeddings(h, input_pos=pos, cache=self.cache, rows=rows).logits
        self.forwards += 1
        self.work_items += len(items)
        out, b = [], 0
        for w in items:
            r, n = w.h.shape[0], w.h.shape[1]
            out.append(logits[b:b + r, :n])
            b += r
        return out

    def run_now(self, step: Step) -> object:
        """Drive one session generator to its end, one forward per item (no batching)."""
        try:
            work = next(step)
            while True:
                work = step.send(self.forward([work])[0])
        except StopIteration as done:
            return done.value

    def missed(self, s: CloudSession, verdict: pr.Verdict) -> tuple[int, np.ndarray]:
        """For Resumed: where the tokens of `verdict` (the session's last) start, and those tokens."""
        count = verdict.n_accepted + (verdict.next_token is not None)
        return s.frontier - count, s.tokens[s.frontier - count:s.frontier].copy()

    # ---- sessions ------------------------------------------------------------------------------------------
    def open(self, msg: pr.Open, owner: str) -> Step:
        """Allocate a slot, prefill the caption, write the prefix. Returns (session, prefix tokens)."""
        msg.validate(self.limits)
        if msg.num_tokens != self.T:
            raise pr.ProtocolError(pr.ErrorCode.BAD_PARAMS, f"this cloud model writes {self.T} tokens per image, "
                                                            f"not {msg.num_tokens}")
        if not self.free_slots:
            raise pr.ProtocolError(pr.ErrorCode.BUSY, f"all {self.max_sessions} sessions are in use")
        return self._open(msg, owner)

    def _open(self, msg: pr.Open, owner: str) -> Step:
        sampling = SamplingConfig(msg.cfg_scale, msg.temperature, msg.top_k, msg.top_p)
        slot = self.free_slots.pop()
        sid = secrets.randbits(64) or 1
        while sid in self.sessions:
            sid = secrets.randbits(64) or 1
        rows = torch.arange(slot * self.rows_per_session, (slot + 1) * self.rows_per_session, device=self.device)
        s = CloudSession(sid, owner, slot, rows, msg.num_tokens, sampling,
                         msg.use_interval_features, torch.Generator().manual_seed(msg.seed))
        s.tokens = np.zeros(self.T, np.int64)
        s.busy = 1
        self.sessions[sid] = s
        try:
            with torch.inference_mode():
                cond = self.models.encode_prompts([msg.caption]).to(self.device)
                cond = self.model.cfg_condition(cond) if sampling.guided else cond.repeat(2, 1, 1)
                h = self.model.embed_condition(cond)
            logits = yield Work(rows, h, torch.arange(self.P, device=self.device))
            s.next_logits = logits[:, -1]
            for i in range(msg.prefix_tokens):
                tok = int(self._sample(s, s.next_logits))
                s.tokens[i] = tok
                if i + 1 < self.T:
                    logits = yield self._token_work(s, [tok], i, None)
                    s.next_logits = logits[:, -1]
            s.frontier = s.ingested = msg.prefix_tokens
        except BaseException:
            self.close(sid)
            raise
        finally:
            self.end(s)
        return s, s.tokens[: msg.prefix_tokens].copy()

    def _rows(self, s: CloudSession) -> int:
        return 2 if s.sampling.guided else 1

    def _sample(self, s: CloudSession, logits: Tensor) -> Tensor:
        with torch.inference_mode():
            return sample(model_probs(logits[: self._rows(s)], s.sampling).cpu(), s.generator)[0]

    def _token_work(self, s: CloudSession, tokens: list[int], at: int, features: Tensor | None) -> Work:
        """Tokens at image positions at.. ; `features` (n, F) per token or None; its rows of zeros mean none."""
        with torch.inference_mode():
            h = self.model.tok_embeddings(torch.tensor(tokens, device=self.device))
            if features is not None and s.use_features and self.models.phi is not None:
                features = features.to(self.device)
                known = features.abs().sum(-1, keepdim=True) > 0
                h = h + self.models.phi(features) * known
            h = h[None].expand(self.rows_per_session, -1, -1)
        return Work(s.rows, h, torch.arange(self.P + at, self.P + at + len(tokens), device=self.device))

    def get(self, sid: int, owner: str) -> CloudSession:
        s = self.sessions.get(sid)
        if s is None:
            raise pr.ProtocolError(pr.ErrorCode.UNKNOWN_SESSION, f"no session {sid}: closed, timed out or unknown")
        if s.owner != owner:
            raise pr.ProtocolError(pr.ErrorCode.FOREIGN_SESSION, f"session {sid} belongs to another client")
        s.last_used = time.monotonic()
        return s

    def check_verify(self, s: CloudSession, msg: pr.Verify) -> None:
        """The checks of a Verify against its session (decode already checked the frame)."""
        n, k, f = len(msg.tokens), len(msg.drafts), msg.features.shape[1]
        if msg.start != s.frontier:
            raise pr.ProtocolError(pr.ErrorCode.BAD_POSITION, f"Verify starts at {msg.start}, the session's "
                                                              f"frontier is {s.frontier}")
        if msg.start + n + k > s.num_tokens:
            raise pr.ProtocolError(pr.ErrorCode.BAD_POSITION, f"positions up to {msg.start + n + k - 1} past "
                                                              f"{s.num_tokens} image tokens")
        if s.use_features and f != self.feature_dim or not s.use_features and f:
            raise pr.ProtocolError(pr.ErrorCode.BAD_FEATURES, f"{f} feature columns; this session takes "
                                                              f"{self.feature_dim if s.use_features else 0}")

    def verify(self, s: CloudSession, msg: pr.Verify) -> Step:
        """Ingest [the cloud's own pending token; accepted tokens; drafts] in one forward, then the acceptance
        policy on the drafts. Returns the Verdict."""
        self.check_verify(s, msg)
        self.begin(s)
        try:
            return (yield from self._verify(s, msg))
        finally:
            self.end(s)

    def _verify(self, s: CloudSession, msg: pr.Verify) -> Step:
        n, k = len(msg.tokens), len(msg.drafts)
        u = len(s.pending) + n
        seq = s.pending + msg.tokens.tolist() + msg.drafts.tolist()
        feats = None
        if msg.features.shape[1]:
            feats = torch.cat([torch.zeros(len(s.pending), self.feature_dim),
                               torch.from_numpy(msg.features.astype(np.float32))])
        logits = yield self._token_work(s, seq, s.ingested, feats)
        with torch.inference_mode():
            preds = torch.cat([s.next_logits[:, None], logits], dim=1)[: self._rows(s)]
            p = model_probs(preds[:, u:u + k + 1], s.sampling).cpu()  # (1, k + 1, V): drafts and the bonus
            q = torch.from_numpy(np.stack([d.to_dense(self.V) for d in msg.q])).to(p.dtype)[None]
            drafts = torch.from_numpy(msg.drafts.astype(np.int64))[None]
            a_t, nxt_t = self.policy(p, q, drafts, s.generator)
        a = int(a_t[0])
        end = msg.start + n + a
        nxt = int(nxt_t[0]) if end < s.num_tokens else None
        s.tokens[msg.start:msg.start + n] = msg.tokens
        s.tokens[msg.start + n:end] = msg.drafts[:a]
        if nxt is not None:
            s.tokens[end] = nxt
        s.ingested += u + a
        s.next_logits = preds[:, u + a] if s.sampling.guided else preds[:, u + a].expand(2, -1)
        s.pending = [] if nxt is None else [nxt]
        s.frontier = end + (nxt is not None)
        return pr.Verdict(session=s.id, seq=msg.seq, n_accepted=a, next_token=nxt)

    def begin(self, s: CloudSession) -> None:
        s.busy += 1

    def end(self, s: CloudSession) -> None:
        """A step of `s` finished (or failed); a session closed meanwhile gives its slot back now."""
        s.busy -= 1
        if s.closed and not s.busy:
            self.free_slots.append(s.slot)

    def close(self, sid: int) -> bool:
        s = self.sessions.pop(sid, None)
        if s is None:
            return False
        s.closed = True
        if not s.busy:
            self.free_slots.append(s.slot)
        return True

    def expire(self, idle_s: float, now: float | None = None) -> list[int]:
        """Close sessions idle for longer than idle_s; returns their ids."""
        now = time.monotonic() if now is None else now
        old = [sid for sid, s in self.sessions.items() if now - s.last_used > idle_s and not s.busy]
        for sid in old:
            self.close(sid)
        return old

