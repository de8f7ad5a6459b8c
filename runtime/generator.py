"""The on-device generation loop (torch-free): condition prefill, the interval threshold gate, verification.

For each image position the device graph gives the processed centre logits, U and the interval features. The
runtime draws the draft (top-k / top-p; the draw at position j uses the j-th uniform of the seed's numpy
Generator); if U < tau the token is kept locally, else the draft goes to the `Verifier` with every locally kept
token the cloud has not seen. With `chain` > 1 the device first drafts on while its drafts stay uncertain (up to
`chain` drafts, ended by the first confident one), and the whole uncertain run goes up in one Verify (the engine's
`ciar-chain`). The cloud answers how many drafts it kept and the next token (a correction, or a bonus token after
the kept drafts); the device rewinds its KV cache to the first position it has to write again. While the cloud
verifies, the device writes its sent drafts into its cache, so after the verdict it feeds one token (the verdict's,
kept or not) through the one-token decode step.

With `lookahead` > 0 the device does not wait for the verdict (the engine's `ciar-inflight`, one verification out
at a time): it guesses the cloud's token after the chain (its likeliest), drafts on up to `lookahead` positions
past the chain, and reads the verdict when it gets there or when another draft is uncertain. The drafts made
ahead stand when the verdict kept the chain and chose the guessed token, and are drafted again otherwise. Since a
draft depends only on its context and its position's uniform, the image is the waiting loop's, token for token;
only the time differs.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from .backend import DeviceBackend, Step
from .budget import BudgetController
from .bundle import Bundle
from .sampling import Sampler
from .verifier import Chain, LocalVerifier, SessionParams, Verifier

LOCAL, PREFIX, VERIFIED, CLOUD, UNVERIFIED = 0, 1, 2, 3, 4  # token sources, as in ciar.engine (+ UNVERIFIED)
NO_NEIGHBOUR = -1


def neighbour_ids(tokens: np.ndarray, start: int, n: int, grid: int, out: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) int64: the ids left of (j - 1) and above (j - grid) image positions j = start..start+n-1 of
    `tokens`, NO_NEIGHBOUR where there is none: the device graph's `neighbours` input for the outputs that
    predict those positions (`ciar.models.interval.neighbour_ids`, pinned to it by a test). Written into `out`
    when given: a decode step (n = 1) costs two scalar reads, no allocation."""
    out = np.empty((n, 2), np.int64) if out is None else out
    for i in range(n):
        j = start + i
        out[i, 0] = tokens[j - 1] if j >= 1 else NO_NEIGHBOUR
        out[i, 1] = tokens[j - grid] if j >= grid else NO_NEIGHBOUR
    return out


@dataclass
class DeviceResult:
    tokens: np.ndarray  # (T,)
    source: np.ndarray  # (T,) int8 token sources
    u: np.ndarray  # (T,) U of the device draft (nan where the cloud wrote the prefix)
    sent: np.ndarray  # (T,) bool: the draft at this position went to the verifier (the uncertainty map)
    image: np.ndarray | None  # (H, W, 3) uint8
    stats: dict = field(default_factory=dict)
    step_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per decode step: the device's whole step
    backend_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per decode step: inside the graph call


class CaptionEncoder:
    """Tokenizes a caption exactly as the training code did (manifest rule) and runs caption_encoder.onnx."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        import onnxruntime as ort
        c = bundle.manifest["caption"]
        self.vocab = {w: i for i, w in enumerate(c["vocab"])}
        self.max_tokens, self.pad, self.unk = c["max_tokens"], c["pad_id"], c["unk_id"]
        self.pattern = re.compile(c["token_pattern"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(bundle.file("caption_encoder")), opts,
                                            providers=["CPUExecutionProvider"])

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        words = self.pattern.findall(text.lower())
        if len(words) > self.max_tokens:
            raise ValueError(f"the caption has {len(words)} words; this model reads at most {self.max_tokens}")
        ids = np.full((1, self.max_tokens), self.pad, np.int64)
        ids[0, : len(words)] = [self.vocab.get(w, self.unk) for w in words]
        mask = np.zeros((1, self.max_tokens), bool)
        mask[0, : len(words)] = True
        return ids, mask

    def __call__(self, text: str) -> np.ndarray:
        ids, mask = self.encode(text)
        return self.session.run(None, {"ids": ids, "mask": mask})[0]  # (2, P, dim)


class VQDecoder:
    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.grid = bundle.manifest["model"]["grid"]
        self.session = ort.InferenceSession(str(bundle.file("vq_decoder")), opts, providers=["CPUExecutionProvider"])

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        img = self.session.run(None, {"codes": tokens.reshape(1, self.grid, self.grid).astype(np.int64)})[0][0]
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class DeviceGenerator:
    def __init__(self, bundle: Bundle, backend: DeviceBackend, threads: int = 1) -> None:
        self.bundle, self.backend = bundle, backend
        m = bundle.manifest
        self.T, self.P, self.grid = m["model"]["block_size"], m["model"]["cls_token_num"], m["model"]["grid"]
        self.embeddings = np.load(bundle.file("token_embeddings"))
        self.caption = CaptionEncoder(bundle, threads)
        self.decoder = VQDecoder(bundle, threads)
        # a one-token step's embedding and neighbour ids go straight into the backend's bound inputs
        self._embed, self._nb1 = backend.decode_inputs

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token embeddings for both CFG rows: (2, n, dim); for one token, the backend's decode input itself."""
        if tokens.shape[0] == 1:
            np.copyto(self._embed, self.embeddings[tokens[0]])  # the row into both CFG rows, one copy
            return self._embed
        e = self.embeddings[tokens]
        return np.stack([e, e])

    def generate(self, prompt: str, seed: int, tau: float, verifier: Verifier | None = None,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                 prefix_fraction: float | None = None, decode_image: bool = True, chain: int = 1,
                 lookahead: int = 0, budget: BudgetController | None = None) -> DeviceResult:
        """One image. `chain`: the most drafts one verification carries (1: each uncertain draft alone).
        `lookahead`: how far past a verification in flight the device drafts on (0: it waits for each verdict).
        `budget`: hold the image's cloud calls per token (the prefix's included) at its target by nudging tau
        after every draft, starting from its tau (`tau` is then ignored)."""
        if chain < 1:
            raise ValueError(f"chain must be >= 1 (the most drafts per verification), got {chain}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 (drafts past a verification in flight), got {lookahead}")
        m = self.bundle.manifest
        s, verifier = m["sampling"], verifier or LocalVerifier()
        top_k = s["top_k"] if top_k is None else top_k
        top_p = s["top_p"] if top_p is None else top_p
        T, P = self.T, self.P
        # one uniform per image position: a draft at position j is a function of its context and uniforms[j] only,
        # so drafting ahead and drafting again after a verdict give the tokens of the waiting loop, seed for seed
        uniforms = np.random.default_rng(seed).random(T)
        timings = {"caption_s": 0.0, "prefill_s": 0.0, "device_s": 0.0, "cloud_s": 0.0, "decode_s": 0.0}

        t0 = time.perf_counter()
        prefix_embeds = self.caption(prompt)
        timings["caption_s"] = time.perf_counter() - t0
        frac = m["gate"]["prefix_fraction"] if prefix_fraction is None else prefix_fraction
        params = SessionParams(prompt, seed, T, int(frac * T), s["cfg_scale"], s["temperature"], top_k, top_p,
                               m["model"]["feature_dim"])
        t0 = time.perf_counter()
        prefix = np.asarray(verifier.open(params), dtype=np.int64)
        timings["cloud_s"] += time.perf_counter() - t0
        m_pref = len(prefix)
        if budget is not None:
            budget.reserve(m_pref, T)  # the prefix's forwards come out of the image's budget

        tau0 = budget.tau if budget else tau
        run = _Run(T, m["model"]["feature_dim"], tau=tau0, budget=budget, first=m_pref)
        t0 = time.perf_counter()
        self.backend.reset()
        # the condition prefix: its last output predicts image position 0, which has no neighbours
        run.step = _last(self.backend.step(prefix_embeds, 0, np.full((P, 2), NO_NEIGHBOUR, np.int64)))
        run.tokens[:m_pref], run.source[:m_pref] = prefix, PREFIX
        self._advance(run, m_pref)
        run.step_run_s = 0.0
        timings["prefill_s"] = time.perf_counter() - t0
        sampler = Sampler(self.embeddings.shape[0], top_k, top_p, greedy)
        run.t = run.synced = m_pref
        flight: _Flight | None = None

        def land() -> bool:
            """Read the verdict on the flight. False when it voids the device's drafts past its token."""
            nonlocal flight
            f, flight = flight, None
            t1 = time.perf_counter()
            verdict = verifier.result(f.pending)
            run.cloud_s += time.perf_counter() - t1
            return self._apply(run, f, verdict)

        while run.t < T or flight:
            t = run.t
            if flight and (t >= T or t >= flight.end + lookahead):
                land()
                continue
            t0, waited = time.perf_counter(), run.cloud_s
            try:  # one decode step on the device's clock (sampling, gate, embed, graph; never the cloud's wait)
                self._advance(run, t)
                run.drafts += 1
                if flight and t == flight.end:  # the verdict puts the cloud's token here: guess the likeliest one
                    run.tokens[t], run.source[t] = int(run.step.centre[0].argmax()), LOCAL
                    run.reach(t + 1)
                    continue
                draft = sampler.draw(run.step.centre[0], uniforms[t], _row0(run.step.cdf))
                run.u[t], run.features[t] = float(run.step.u[0]), run.step.features[0]
                if run.u[t] < run.tau:
                    run.tokens[t], run.source[t] = draft, LOCAL
                    run.budget_step(t, False)
                    run.reach(t + 1)
                    continue
                if flight and not land():
                    continue  # one verification out at a time; its verdict voided this draft: draft t again
                run.budget_step(t, True)
                k = self._chain(run, draft, sampler, uniforms, chain, run.tau)
                t1 = time.perf_counter()
                pending = verifier.submit(run.synced, run.tokens[run.synced:t], run.features[run.synced:t], k)
                run.cloud_s += time.perf_counter() - t1
                run.tokens[t:t + len(k)], run.source[t:t + len(k)] = k.drafts, VERIFIED
                flight = _Flight(pending, t, len(k))
                run.tau_at[t + 1:t + len(k)] = run.tau  # where a verdict inside the chain may rewind to
                run.reach(t + len(k))
                if verifier.settled(pending):  # offline: kept as drafted, nothing to wait for
                    land()
                    continue
                if run.t < T:  # while the cloud verifies: after the verdict, one token to feed
                    self._advance(run, run.t)
                if not lookahead:
                    land()
            finally:
                run.close_step(t0, waited)
        timings["device_s"], timings["cloud_s"] = run.device_s, timings["cloud_s"] + run.cloud_s
        verifier.close()
        image = None
        if decode_image:
            t0 = time.perf_counter()
            image = self.decoder(run.tokens)
            timings["decode_s"] = time.perf_counter() - t0
        source, u_map = run.source, run.u
        finite = np.isfinite(u_map).any()
        stats = {"tokens": T, "local": int((source == LOCAL).sum()), "prefix": int((source == PREFIX).sum()),
                 "cloud": int(np.isin(source, (PREFIX, VERIFIED, CLOUD)).sum()),
                 "unverified": int((source == UNVERIFIED).sum()),
                 "sent": int(run.sent.sum()),
                 "tau": tau0, "tau_end": run.tau, "budget": None if budget is None else budget.target_rate,
                 "u_mean": float(np.nanmean(u_map)) if finite else None,
                 "u_p50": float(np.nanpercentile(u_map, 50)) if finite else None,
                 "u_p95": float(np.nanpercentile(u_map, 95)) if finite else None,
                 "step_ms_p50": float(np.median(run.steps_ms)) if run.steps_ms else None,
                 "backend_s": round(sum(run.backend_ms) / 1000, 6),
                 "lookahead": lookahead, "drafts": run.drafts, "voided": run.voided, "kept_ahead": run.kept_ahead,
                 **{k: round(v, 6) for k, v in timings.items()}}
        stats["seconds"] = round(sum(timings.values()), 6)
        return DeviceResult(run.tokens, source, u_map, run.sent, image, stats, np.array(run.steps_ms),
                            np.array(run.backend_ms))

    def _advance(self, run: _Run, upto: int) -> None:
        """Feed the cache every token from `run.cached` to `upto` - 1 in one graph call (rewriting from a rewound
        position), so that `run.step` predicts position `upto`."""
        if run.cached >= upto:
            return
        at, n = run.cached, upto - run.cached
        nb = neighbour_ids(run.tokens, at + 1, n, self.grid, self._nb1 if n == 1 else None)
        step = self.backend.step(self.embed(run.tokens[at:upto]), self.P + at, nb)
        run.step = step if n == 1 else _last(step)
        run.step_run_s += self.backend.last_run_s
        run.cached = upto

    def _apply(self, run: _Run, f: _Flight, verdict: Verdict) -> bool:
        """Write a verdict into the run. The drafts made past the flight stand when the verdict kept the whole
        chain and its token is the device's guess; otherwise the device rewinds to the position after the
        verdict's token (its cache to the first token that changed) and they are void. Returns whether they stood."""
        a = verdict.n_accepted
        new = run.tokens[f.t:f.t + a if verdict.verified else f.end].copy()
        if verdict.verified and verdict.next_token is not None and f.t + a < self.T:
            new = np.append(new, verdict.next_token)
        end = f.t + len(new)  # the first position the verdict leaves open
        stood = (verdict.verified and a == f.k and len(new) == f.k + 1 and run.t > end - 1
                 and run.tokens[end - 1] == new[-1])
        if verdict.verified:
            run.synced = end
        else:
            run.source[f.t:f.t + f.k] = UNVERIFIED
        if stood:
            run.source[end - 1] = CLOUD
            run.kept_ahead += run.t - f.end
            return True
        changed = np.flatnonzero(run.tokens[f.t:end] != new)
        run.cached = min(run.cached, f.t + int(changed[0]) if len(changed) else end)
        run.tokens[f.t:end] = new
        if verdict.verified and len(new) > a:
            run.source[f.t + a] = CLOUD
        run.voided += max(0, run.t - f.end)  # drafts made past the chain (a chain's own tail is not counted)
        run.u[end:], run.sent[end:] = np.nan, False  # drafts past the verdict's token: void, drafted again
        if run.t > f.end:  # drafts made ahead are void (none of them went up): tau is what it was at `end`
            run.tau = run.tau_at[end]
            if run.budget is not None:
                run.budget.tau = run.tau
        run.t = end
        return False

    def _chain(self, run: _Run, draft: int, sampler: Sampler, uniforms: np.ndarray, most: int,
               tau: float) -> Chain:
        """The uncertain draft at run.t and, while each new draft is uncertain too, the drafts after it (up to
        `most`, the last one confident or the image's end); every draft but the last goes through the graph."""
        t, T = run.t, self.T
        drafts, ids, probs = [draft], [], []
        run.sent[t] = True
        while True:
            p = sampler.probs(run.step.centre[0])
            support = np.flatnonzero(p > 0)
            ids.append(support)
            probs.append(p[support].astype(np.float32))
            j = t + len(drafts)
            if len(drafts) == most or j >= T or (len(drafts) > 1 and run.u[j - 1] < tau):
                break
            run.tokens[j - 1] = drafts[-1]  # the graph reads it as a neighbour
            self._advance(run, j)
            run.drafts += 1
            drafts.append(sampler.draw(run.step.centre[0], uniforms[j], _row0(run.step.cdf)))
            run.u[j], run.features[j] = float(run.step.u[0]), run.step.features[0]
            run.sent[j] = run.u[j] >= tau
        k = len(drafts)
        return Chain(np.asarray(drafts, np.int64), tuple(ids), tuple(probs), run.features[t:t + k].copy())


@dataclass
class _Run:
    """One image's state in the loop. The device's KV cache holds positions < `cached`; `step` is the graph's
    output there (it predicts position `cached`); `t` is the next position to draft; the cloud knows every token
    before `synced`."""
    T: int
    feature_dim: int
    tau: float  # the gate's threshold now (moved by the budget, if any)
    budget: BudgetController | None = None
    first: int = 0  # the first position the device drafts (after the cloud's prefix)
    t: int = 0
    cached: int = 0
    synced: int = 0
    step: Step | None = None
    step_run_s: float = 0.0  # seconds inside the graph for the decode step being timed
    drafts: int = 0  # device drafts made (and guesses at a verdict's token), standing or not
    voided: int = 0  # drafts made past a verification in flight that its verdict voided
    kept_ahead: int = 0  # drafts made past a verification in flight that stood (the guess included)
    device_s: float = 0.0
    cloud_s: float = 0.0  # sending requests and waiting for verdicts
    steps_ms: list = field(default_factory=list)
    backend_ms: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = np.zeros(self.T, np.int64)
        self.source = np.full(self.T, LOCAL, np.int8)
        self.u = np.full(self.T, np.nan)  # U of each standing device draft (nan: the cloud wrote it, or a guess)
        self.sent = np.zeros(self.T, bool)  # the uncertainty map
        self.features = np.zeros((self.T, self.feature_dim), np.float32)
        self.triggers = np.zeros(self.T, bool)  # positions whose draft went up in a verification
        self.tau_at = np.full(self.T + 1, self.tau)  # tau when the device reached each position it drafted past

    def reach(self, t: int) -> None:
        """The device's next position is t (tau then is where a rewind to t restores it)."""
        self.t = t
        self.tau_at[t] = self.tau

    def budget_step(self, t: int, verify: bool) -> None:
        """The draft at t is kept (False) or goes up in a verification (True): the budget, if any, moves tau."""
        self.triggers[t] = verify
        if self.budget is not None:
            self.tau = self.budget.update(int(self.triggers[self.first:t + 1].sum()), t + 1 - self.first)

    def close_step(self, t0: float, cloud_s_before: float) -> None:
        """Book one decode step begun at `t0`, less what it spent on the cloud since then."""
        dt = time.perf_counter() - t0 - (self.cloud_s - cloud_s_before)
        self.device_s += dt
        self.steps_ms.append(1000 * dt)
        self.backend_ms.append(1000 * self.step_run_s)
        self.step_run_s = 0.0


@dataclass
class _Flight:
    """A verification submitted and not read yet: the chain of k drafts at positions t..t+k-1."""
    pending: object
    t: int
    k: int

    @property
    def end(self) -> int:
        return self.t + self.k


def _last(step: Step) -> Step:
    """Keep only the last position of a multi-position step (what predicts the next token)."""
    if len(step.u) == 1:
        return step
    return Step(step.centre[-1:], step.u[-1:], step.features[-1:], None if step.cdf is None else step.cdf[-1:])


def _row0(table: np.ndarray | None) -> np.ndarray | None:
    """The draw table of a step's one position (None where its backend gives none)."""
    return None if table is None else table[0]
