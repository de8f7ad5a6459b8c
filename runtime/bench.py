"""Per-token latency of a bundle on this hardware, and the memory-bandwidth floor it is compared with."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .backend import make_backend
from .bundle import load_bundle
from .generator import DeviceGenerator, DeviceResult

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


def local_image(gen: DeviceGenerator, seed: int) -> DeviceResult:
    """One local-only image of the bench prompt through the runtime's own loop: no cloud, no prefix, no VQ decode.
    Its last token needs no graph call: the per-step timings to compare are `step_ms[:-1]` and `backend_ms[:-1]`."""
    return gen.generate(BENCH_PROMPT, seed, tau=float("inf"), prefix_fraction=0.0, decode_image=False)


def bench_bundle(path: Path, threads: int, images: int = 2, warmup_images: int = 1, seed: int = 0) -> dict:
    """Whole local-only images through the runtime's own generation loop (`DeviceGenerator.generate`, no cloud,
    no prefix): the prefill, then one decode step per token, each timed end to end (draw, gate, embed, graph
    call) and inside the graph call; the overhead is everything around the graph call."""
    bundle = load_bundle(path)
    backend = make_backend(bundle, threads)
    gen = DeviceGenerator(bundle, backend, threads)
    prefill, step_ms, run_ms = [], [], []
    for i in range(warmup_images + images):
        r = local_image(gen, seed + i)
        if i >= warmup_images:
            prefill.append(r.stats["prefill_s"])
            step_ms.append(r.step_ms[:-1])  # the last token needs no graph call
            run_ms.append(r.backend_ms[:-1])
    steps, runs = np.concatenate(step_ms), np.concatenate(run_ms)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = bundle.manifest["files"]["device"]["bytes"]
    return {"bundle": str(path), "format": bundle.format, "quantize": bundle.quantize, "gate": bundle.gate,
            "threads": threads, "warmup_images": warmup_images, "images": images, "measured_steps": len(steps),
            "prefill_ms": 1000 * min(prefill),
            "step_ms_p50": float(np.percentile(steps, 50)), "step_ms_p95": float(np.percentile(steps, 95)),
            "step_ms_max": float(steps.max()), "tokens_per_s": float(1000 / np.median(steps)),
            "backend_ms_p50": float(np.percentile(runs, 50)),
            "overhead_fraction": float(1 - runs.sum() / steps.sum()),
            # the same in absolute terms: a faster graph raises the fraction without the runtime doing more
            "overhead_us_per_step": float(1e3 * (steps.sum() - runs.sum()) / len(steps)),
            "weight_bytes": weights,
            "peak_rss_mb": peak_rss_mb}
