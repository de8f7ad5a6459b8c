"""Per-token latency of a bundle on this hardware, and the memory-bandwidth floor it is compared with."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .backend import make_backend
from .bundle import load_bundle
from .generator import CaptionEncoder, DeviceGenerator
from .sampling import processed_probs, sample

BENCH_PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large array copy (read + write), best of `repeats`."""
    src = np.ones(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def bench_bundle(path: Path, threads: int, steps: int, warmup: int) -> dict:
    """Prefill time, then `steps` single-token decode steps through the runtime's own path (embed, backend,
    sampling); the overhead is everything around the backend call."""
    bundle = load_bundle(path)
    backend = make_backend(bundle, threads)
    gen = DeviceGenerator(bundle, backend, threads)
    prefix = CaptionEncoder(bundle, threads)(BENCH_PROMPT)
    P, T = bundle.manifest["model"]["cls_token_num"], bundle.manifest["model"]["block_size"]
    s = bundle.manifest["sampling"]
    rng = np.random.default_rng(0)
    prefill, step_s, run_s = [], [], []
    for rep in range(2):
        backend.reset()
        t0 = time.perf_counter()
        out = backend.step(prefix, 0)
        prefill.append(time.perf_counter() - t0)
        n = min(steps + (warmup if rep == 0 else 0), T - 1)
        for t in range(n):
            t0 = time.perf_counter()
            tok = sample(processed_probs(out.centre[-1], s["top_k"], s["top_p"], False), rng)
            out = backend.step(gen.embed(np.array([tok])), P + t)
            dt = time.perf_counter() - t0
            if rep == 1 or t >= warmup:
                step_s.append(dt)
                run_s.append(getattr(backend, "last_run_s", dt))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps_ms = 1000 * np.array(step_s)
    weights = bundle.manifest["files"]["device"]["bytes"]
    return {"bundle": str(path), "format": bundle.format, "quantize": bundle.quantize, "threads": threads,
            "warmup_steps": warmup, "measured_steps": len(step_s), "prefill_ms": 1000 * min(prefill),
            "step_ms_p50": float(np.percentile(steps_ms, 50)), "step_ms_p95": float(np.percentile(steps_ms, 95)),
            "step_ms_max": float(steps_ms.max()), "tokens_per_s": float(1000 / np.median(steps_ms)),
            "backend_ms_p50": float(np.percentile(1000 * np.array(run_s), 50)),
            "overhead_fraction": float(1 - np.sum(run_s) / np.sum(step_s)),
            "weight_bytes": weights,
            "peak_rss_mb": peak_rss_mb}
