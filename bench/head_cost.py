"""What the Inter-Head costs in the device's decode step.

The shipped device graph runs the backbone, the output head, the Inter-Head's radius head and neighbour scale, the
interval bounds, U, the interval features and the draw table. A device behind a bare gate (entropy, max-prob,
latent) needs only the backbone, the output head, CFG and its score. This script exports that bare graph (`--gate`,
default max-prob) from the same weights as `ciar export --gate maxprob --quantize int8` does (before that option
existed, its own variant returned both scores), and times both decode steps as the runtime runs them (one-token
sessions, inputs and outputs bound once, one thread), alternating round by round, so the ratio is measured side by
side.

    python bench/head_cost.py --json docs/results/head_cost.json

`ciar bench methods --gate-bundle` runs the bare gates on such graphs in the engine (BENCHMARKS section 3g).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ciar.export import onnx_export as ox
from ciar.export.graph import DeviceGraph
from ciar.models.builtin import load_builtin
from ciar.runtime.cli import environment


def export_variant(graph: DeviceGraph, out: Path) -> Path:
    """A device graph exported (`onnx_export.export_device_onnx`, the draw table added) and quantized as `ciar export
    --quantize int8` exports the shipped one; returns the int8 graph's path."""
    fp32, int8 = out / "variant_fp32.onnx", out / "variant_int8.onnx"
    ox.export_device_onnx(graph, fp32)
    ox.quantize_onnx(fp32, int8, "int8")
    return int8


class DecodeStep:
    """One graph's one-token decode session with every input and output bound once (as `OnnxBackend` runs it)."""

    def __init__(self, path: Path, threads: int, cache_shape: tuple[int, ...], dim: int, seed: int = 0) -> None:
        from ciar.runtime.backend import open_session

        self.session = open_session(path, threads, "length")
        rng = np.random.default_rng(seed)
        feeds = {"embeds": rng.standard_normal((2, 1, dim)).astype(np.float32), "input_pos": np.array([100]),
                 "neighbours": np.array([[3, 5]]), "k_cache": rng.standard_normal(cache_shape).astype(np.float32),
                 "v_cache": rng.standard_normal(cache_shape).astype(np.float32),
                 "cfg_scale": np.array([3.0], np.float32), "temperature": np.array([1.0], np.float32)}
        names = {i.name for i in self.session.get_inputs()}  # an input the graph does not read is not an input
        self.inputs = {k: v for k, v in feeds.items() if k in names}
        outputs = [o.name for o in self.session.get_outputs()]
        self.outputs = dict(zip(outputs, self.session.run(outputs, self.inputs)))  # the buffers, shaped once
        self.binding = self.session.io_binding()
        for name, a in [*self.inputs.items(), *self.outputs.items()]:
            bind = self.binding.bind_input if name in self.inputs else self.binding.bind_output
            bind(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        import onnx
        self.nodes = len(onnx.load(str(path)).graph.node)

    def times(self, calls: int) -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            out.append(time.perf_counter() - t0)
        return out


def int8_onnx_bundle(path: Path):
    """The bundle at `path`, refused (BundleError) unless it is an int8 ONNX one: the graphs compared here."""
    from ciar.runtime.bundle import BundleError, load_bundle

    b = load_bundle(path)
    if b.format != "onnx" or b.quantize != "int8":
        raise BundleError(f"{path}: a {b.format} {b.quantize} bundle; this compares int8 ONNX graphs")
    return b


def side_by_side(bundle, name: str, graph: Path, threads: int, rounds: int, calls: int, ratio_key: str) -> dict:
    """The bundle's decode step and `graph`'s (called `name`), each `calls` steps per round, alternating `rounds`
    rounds after one warm-up round: per-round medians, their medians, and shipped / variant per round."""
    m = bundle.manifest["model"]
    shape, dim = tuple(m["cache_shape"]), m["dim"]
    steps = {"shipped": DecodeStep(bundle.file("device"), threads, shape, dim),
             name: DecodeStep(graph, threads, shape, dim)}
    for step in steps.values():  # warm-up
        step.times(calls)
    per_round = {n: [] for n in steps}
    for _ in range(rounds):
        for n, step in steps.items():
            per_round[n].append(1e6 * float(np.median(step.times(calls))))
    ratios = [a / b for a, b in zip(per_round["shipped"], per_round[name])]
    return {"nodes": {n: step.nodes for n, step in steps.items()}, "step_us_per_round": per_round,
            "step_us": {n: float(np.median(v)) for n, v in per_round.items()},
            ratio_key: float(np.median(ratios)), "ratio_per_round": ratios}


def measure(bundle: Path, checkpoint: Path | None, rounds: int, calls: int, threads: int,
            gate: str = "maxprob") -> dict:
    b = int8_onnx_bundle(bundle)
    models = load_builtin(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        bare = export_variant(DeviceGraph(models.device, gate=gate, codebook=models.codebook()), Path(tmp))
        timing = side_by_side(b, "bare_gate", bare, threads, rounds, calls, "shipped_over_bare")
    return {"bundle": str(bundle), "quantize": b.quantize, "gate": gate, "threads": threads, "rounds": rounds,
            "calls_per_round": calls, **timing}


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the side-by-side graph comparison."""
    p.add_argument("--bundle", type=Path, default=Path("runtime/bundles/onnx-int8"),
                   help="the int8 ONNX bundle to compare with (default: the shipped one)")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights the bundle was exported from "
                   "(default: shipped)")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    p.add_argument("--calls", type=int, default=300, help="decode steps per graph and round (default 300)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(p)
    p.add_argument("--gate", default="maxprob", choices=["entropy", "maxprob", "latent"],
                   help="the bare gate whose graph the shipped one is timed against (default maxprob)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        p.error("--rounds and --calls must be at least 1")
    from ciar.cli.bench import write_result
    from ciar.runtime.bundle import BundleError
    try:
        result = measure(args.bundle, args.checkpoint, args.rounds, args.calls, args.threads, args.gate)
    except BundleError as e:
        raise SystemExit(f"head_cost.py: {e}") from None
    result.update(environment=environment(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = sys.stderr if args.json == "-" else sys.stdout
    for name, us in result["step_us"].items():
        print(f"{name:>10}: {us:7.1f} us per decode step ({result['nodes'][name]} nodes)", file=out)
    print(f"shipped / bare {args.gate} gate: {result['shipped_over_bare']:.2f}x (median of {args.rounds} rounds)",
          file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
