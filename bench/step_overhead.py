"""Where the torch-free runtime's time outside the graph call goes, in one local decode step.

`ciar-device bench` reports the runtime's overhead per step as one number. This script runs the same calls as a
local step of `DeviceGenerator` (neighbour ids, the embedding into both CFG rows, the backend's step -- its
inputs and new cache rows around the graph call, timed apart from the call -- the draw, recording U and the
features) on an exported bundle (ONNX, or ExecuTorch where its runtime is installed), times each segment with
`time.perf_counter`, and then times the draw a second time on the same logits: the first draw after a graph call
is what the loop pays, the second shows what the same numpy calls cost once their code and data are back in the
caches (the difference is what the graph call evicted, not the arithmetic).

    python bench/step_overhead.py --bundle runtime/bundles/onnx-int8 --json out.json

Medians over every step of --images passes over the image (255 steps each), after one warm-up pass.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# backend_io: the backend's step around the graph call (its bound inputs, then the new cache rows written)
SEGMENTS = ("neighbours", "embed", "backend_io", "graph", "draw", "record", "draw_again")


def measure(bundle_dir: Path, images: int, threads: int, seed: int = 0) -> dict:
    from ciar.runtime.backend import make_backend
    from ciar.runtime.bundle import load_bundle
    from ciar.runtime.generator import DeviceGenerator, neighbour_ids
    from ciar.runtime.sampling import Sampler

    bundle = load_bundle(bundle_dir)
    backend = make_backend(bundle, threads)
    gen = DeviceGenerator(bundle, backend, threads)  # its embedding lookup, grid and sizes: the loop's own
    T, P, vocab = gen.T, gen.P, gen.embeddings.shape[0]
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, T)  # the context: any tokens cost the graph the same
    uniforms = rng.random(T)
    sampler = Sampler(vocab, 0, 1.0, greedy=False)
    nb1 = backend.decode_inputs[1]  # the loop writes the neighbour ids into the backend's bound input
    u, features = np.full(T, np.nan), np.zeros((T, bundle.manifest["model"]["feature_dim"]), np.float32)
    clock = time.perf_counter
    times: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    for image in range(images + 1):  # the first pass warms up
        backend.reset()
        for t in range(1, T):
            c0 = clock()
            nb = neighbour_ids(tokens, t, 1, gen.grid, nb1)
            c1 = clock()
            embed = gen.embed(tokens[t - 1:t])
            c2 = clock()
            step = backend.step(embed, P + t - 1, nb)
            c3 = clock()
            sampler.draw(step.centre[0], uniforms[t], None if step.cdf is None else step.cdf[0])
            c4 = clock()
            u[t], features[t] = float(step.u[0]), step.features[0]
            c5 = clock()
            sampler.draw(step.centre[0], uniforms[t], None if step.cdf is None else step.cdf[0])  # again, warm
            c6 = clock()
            if image:
                graph = backend.last_run_s
                for name, dt in zip(SEGMENTS, (c1 - c0, c2 - c1, c3 - c2 - graph, graph, c4 - c3, c5 - c4, c6 - c5)):
                    times[name].append(dt)
    us = {name: float(1e6 * np.median(v)) for name, v in times.items()}
    outside = sum(us[s] for s in SEGMENTS if s not in ("graph", "draw_again"))
    return {"bundle": str(bundle_dir), "quantize": bundle.quantize, "threads": threads, "steps": len(times["graph"]),
            "median_us": us, "outside_graph_us": outside,
            "outside_graph_fraction": outside / (outside + us["graph"]),
            "draw_cold_over_warm": us["draw"] / us["draw_again"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("runtime/bundles/onnx-int8"), help="a bundle directory "
                   "(default: the shipped int8 ONNX one)")
    p.add_argument("--images", type=int, default=4, help="passes over the image measured (default 4)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    from ciar.cli.bench import write_result
    from ciar.runtime.bundle import BundleError
    from ciar.runtime.cli import environment
    try:
        result = measure(args.bundle, args.images, args.threads)
    except BundleError as e:
        raise SystemExit(f"step_overhead.py: {e}") from None
    result.update(environment=environment(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = sys.stderr if args.json == "-" else sys.stdout
    for name, v in result["median_us"].items():
        print(f"{name:>12}: {v:7.1f} us", file=out)
    print(f"outside the graph: {result['outside_graph_us']:.1f} us per step "
          f"({100 * result['outside_graph_fraction']:.1f}% of the step); the draw cold / warm: "
          f"{result['draw_cold_over_warm']:.1f}x", file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
