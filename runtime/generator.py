"""The on-device generation loop (torch-free): condition prefill, the interval threshold gate, verification.

For each image position the device graph gives the processed centre logits, U and the interval features. The
runtime draws the draft (top-k / top-p, seeded numpy Generator); if U < tau the token is kept locally, else the
draft goes to the `Verifier` with every locally kept token the cloud has not seen. With `chain` > 1 the device
first drafts on while its drafts stay uncertain (up to `chain` drafts, ended by the first confident one), and the
whole uncertain run goes up in one Verify (the engine's `ciar-chain`). The cloud answers how many drafts it kept
and the next token (a correction, or a bonus token after the kept drafts); the device rewinds its KV cache to the
first position it has to write again.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from .backend import DeviceBackend, Step
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
        self._embed = np.empty((2, 1, self.embeddings.shape[1]), np.float32)
        self._nb1 = np.empty((1, 2), np.int64)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Token embeddings for both CFG rows: (2, n, dim)."""
        if tokens.shape[0] == 1:
            np.take(self.embeddings, tokens, axis=0, out=self._embed[0])
            self._embed[1] = self._embed[0]
            return self._embed
        e = self.embeddings[tokens]
        return np.stack([e, e])

    def generate(self, prompt: str, seed: int, tau: float, verifier: Verifier | None = None,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                 prefix_fraction: float | None = None, decode_image: bool = True, chain: int = 1) -> DeviceResult:
        """One image. `chain`: the most drafts one verification carries (1: each uncertain draft alone)."""
        if chain < 1:
            raise ValueError(f"chain must be >= 1 (the most drafts per verification), got {chain}")
        m = self.bundle.manifest
        s, verifier = m["sampling"], verifier or LocalVerifier()
        top_k = s["top_k"] if top_k is None else top_k
        top_p = s["top_p"] if top_p is None else top_p
        rng = np.random.default_rng(seed)
        T, P = self.T, self.P
        timings = {"caption_s": 0.0, "prefill_s": 0.0, "device_s": 0.0, "cloud_s": 0.0, "decode_s": 0.0}
        steps_ms: list[float] = []

        t0 = time.perf_counter()
        prefix_embeds = self.caption(prompt)
        timings["caption_s"] = time.perf_counter() - t0
        frac = m["gate"]["prefix_fraction"] if prefix_fraction is None else prefix_fraction
        params = SessionParams(prompt, seed, T, int(frac * T), s["cfg_scale"], s["temperature"], top_k, top_p,
                               m["model"]["feature_dim"])
        t0 = time.perf_counter()
        prefix = np.asarray(verifier.open(params), dtype=np.int64)
        timings["cloud_s"] += time.perf_counter() - t0

        tokens = np.zeros(T, np.int64)
        source = np.full(T, LOCAL, np.int8)
        u_map = np.full(T, np.nan)
        sent = np.zeros(T, bool)
        feature_dim = m["model"]["feature_dim"]
        features = np.zeros((T, feature_dim), np.float32)
        t0 = time.perf_counter()
        self.backend.reset()
        # the condition prefix: its last output predicts image position 0, which has no neighbours
        step = self.backend.step(prefix_embeds, 0, np.full((P, 2), NO_NEIGHBOUR, np.int64))
        m_pref = len(prefix)
        if m_pref:
            tokens[:m_pref], source[:m_pref] = prefix, PREFIX
            step = self.backend.step(self.embed(prefix), P, neighbour_ids(tokens, 1, m_pref, self.grid))
        timings["prefill_s"] = time.perf_counter() - t0
        step = _last(step)
        sampler = Sampler(self.embeddings.shape[0], top_k, top_p, greedy)
        backend_ms: list[float] = []  # time inside the backend's graph call, per decode step
        t, synced = m_pref, m_pref  # the cloud knows every token before `synced`
        while t < T:
            t0 = time.perf_counter()
            draft = sampler.draw(step.centre[0], rng)
            u = float(step.u[0])
            u_map[t], features[t] = u, step.features[0]
            new = [draft]
            cloud_s = chain_run_s = 0.0
            sent[t] = u >= tau
            if sent[t]:
                k, at, chain_run_s = self._chain(draft, step, sampler, rng, tokens, features, u_map, sent, t,
                                                 chain, tau)
                t1 = time.perf_counter()
                verdict = verifier.verify(synced, tokens[synced:t], features[synced:t], k)
                cloud_s = time.perf_counter() - t1
                a = verdict.n_accepted
                new = list(k.drafts[:a]) if verdict.verified else list(k.drafts)
                source[t:t + len(new)] = VERIFIED if verdict.verified else UNVERIFIED
                if verdict.verified and verdict.next_token is not None and t + a < T:
                    new.append(verdict.next_token)
                    source[t + a] = CLOUD
                if verdict.verified:
                    synced = t + len(new)
                u_map[t + len(new):t + len(k)] = np.nan  # drafts after a correction: void, drafted again
                sent[t + len(new):t + len(k)] = False
            else:
                at = t  # the first position whose token the cache has not ingested
            tokens[t:t + len(new)] = new
            run_s = chain_run_s
            if t + len(new) < T:
                at = min(at, t + len(new) - 1)  # a rejected draft's cache entries are rewritten from here
                n = t + len(new) - at
                nb = neighbour_ids(tokens, at + 1, n, self.grid, self._nb1 if n == 1 else None)
                step = _last(self.backend.step(self.embed(tokens[at:t + len(new)]), P + at, nb))
                run_s += self.backend.last_run_s
            dt = time.perf_counter() - t0 - cloud_s  # the device's whole step: sampling, gate, embed, graph
            timings["cloud_s"] += cloud_s
            timings["device_s"] += dt
            steps_ms.append(1000 * dt)
            backend_ms.append(1000 * run_s)
            t += len(new)
        verifier.close()
        image = None
        if decode_image:
            t0 = time.perf_counter()
            image = self.decoder(tokens)
            timings["decode_s"] = time.perf_counter() - t0
        stats = {"tokens": T, "local": int((source == LOCAL).sum()), "prefix": int((source == PREFIX).sum()),
                 "cloud": int(np.isin(source, (PREFIX, VERIFIED, CLOUD)).sum()),
                 "unverified": int((source == UNVERIFIED).sum()),
                 "sent": int(sent.sum()),
                 "tau": tau, "u_mean": float(np.nanmean(u_map)) if np.isfinite(u_map).any() else None,
                 "u_p50": float(np.nanpercentile(u_map, 50)) if np.isfinite(u_map).any() else None,
                 "u_p95": float(np.nanpercentile(u_map, 95)) if np.isfinite(u_map).any() else None,
                 "step_ms_p50": float(np.median(steps_ms)) if steps_ms else None,
                 "backend_s": round(sum(backend_ms) / 1000, 6),
                 **{k: round(v, 6) for k, v in timings.items()}}
        stats["seconds"] = round(sum(timings.values()), 6)
        return DeviceResult(tokens, source, u_map, sent, image, stats, np.array(steps_ms), np.array(backend_ms))

    def _chain(self, draft: int, step: Step, sampler: Sampler, rng: np.random.Generator, tokens: np.ndarray,
               features: np.ndarray, u_map: np.ndarray, sent: np.ndarray, t: int, most: int,
               tau: float) -> tuple[Chain, int, float]:
        """The uncertain draft at t and, while each new draft is uncertain too, the drafts after it (up to `most`,
        the last one confident or the image's end). Returns the chain, the first position the cache has not
        ingested (t + k - 1: every draft but the last went through the graph) and the seconds spent in the graph."""
        T, P = self.T, self.P
        drafts, ids, probs, run_s = [draft], [], [], 0.0
        while True:
            p = sampler.probs(step.centre[0])
            support = np.flatnonzero(p > 0)
            ids.append(support)
            probs.append(p[support].astype(np.float32))
            j = t + len(drafts)
            if len(drafts) == most or j >= T or (len(drafts) > 1 and u_map[j - 1] < tau):
                break
            tokens[j - 1] = drafts[-1]  # the graph reads it as a neighbour
            nb = neighbour_ids(tokens, j, 1, self.grid, self._nb1)
            step = _last(self.backend.step(self.embed(np.asarray(drafts[-1:], np.int64)), P + j - 1, nb))
            run_s += self.backend.last_run_s
            drafts.append(sampler.draw(step.centre[0], rng))
            u_map[j], features[j] = float(step.u[0]), step.features[0]
            sent[j] = u_map[j] >= tau
        k = len(drafts)
        chain = Chain(np.asarray(drafts, np.int64), tuple(ids), tuple(probs), features[t:t + k].copy())
        return chain, t + k - 1, run_s


def _last(step: Step) -> Step:
    """Keep only the last position of a multi-position step (what predicts the next token)."""
    if len(step.u) == 1:
        return step
    return Step(step.centre[-1:], step.u[-1:], step.features[-1:])
