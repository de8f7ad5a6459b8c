"""Where an ExecuTorch device program's decode step goes, operator by operator (ETDump).

Loads each bundle's device.pte in the ExecuTorch runtime with ETDump on, one thread as `ExecuTorchBackend` runs it,
prefills a caption-length prefix, runs `--steps` one-token decode steps and reads the dump with ExecuTorch's
Inspector: microseconds per decode step of every event, the XNNPACK delegate's calls and kernels and the operators
that run in ExecuTorch's portable kernels (`native_call_*`) or its LLM ops (`llama::*`), with their totals. The
prefill's events are left out. Profiling adds its own time to every event, so compare the rows of one run with
each other, not with `ciar-device bench`.

    python bench/executorch_ops.py --bundle <executorch int8> --bundle <executorch int8, --gate maxprob> --json out.json

The bundles come from `ciar export --format executorch --quantize int8 --out DIR` (add `--gate maxprob` for a
bare-gate program, docs/EXPORT.md).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ciar.runtime.cli import environment

TOTALS = {"execute_us": "Method::execute", "delegate_us": "DELEGATE_CALL", "operator_us": "OPERATOR_CALL"}
SETUP = ("Program::load_method", "Method::init")


def profile(path: Path, steps: int, seed: int = 0) -> dict:
    """Per-decode-step microseconds of every ETDump event of one ExecuTorch bundle's device program."""
    from ciar.runtime.bundle import BundleError, load_bundle

    bundle = load_bundle(path)
    if bundle.format != "executorch":
        raise BundleError(f"{path}: a {bundle.format} bundle; this profiles ExecuTorch programs (`ciar export "
                          "--format executorch`)")
    try:
        import torch
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the program's llama:: ops)
        from executorch.extension.pybindings import portable_lib
    except ImportError as e:
        raise BundleError(f"the ExecuTorch runtime and devtools are needed ({e}); pip install 'ciar[export]'") from None
    portable_lib._unsafe_reset_threadpool(1)  # one thread, both pools, as ExecuTorchBackend runs it
    torch.set_num_threads(1)
    m, s = bundle.manifest["model"], bundle.manifest["sampling"]
    data = bundle.file("device").read_bytes()  # the runtime reads the program from this buffer: keep it alive
    program = portable_lib._load_for_executorch_from_buffer(data, enable_etdump=True, debug_buffer_size=0)
    g = torch.Generator().manual_seed(seed)
    scalars = (torch.tensor([s["cfg_scale"]]), torch.tensor([s["temperature"] or 1.0]))
    P = m["cls_token_num"]
    program.forward((torch.randn(2, P, m["dim"], generator=g), torch.arange(P), torch.full((P, 2), -1), *scalars))
    for t in range(steps):
        ids = torch.randint(0, m["vocab_size"], (1, 2), generator=g)
        program.forward((torch.randn(2, 1, m["dim"], generator=g), torch.tensor([P + t]), ids, *scalars))
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "device.etdp"
        program.write_etdump_result_to_file(str(dump))
        from executorch.devtools import Inspector
        inspector = Inspector(etdump_path=str(dump))
    runs = steps + 1
    total: dict[str, float] = defaultdict(float)  # ms over the decode steps, per event name
    calls: dict[str, int] = defaultdict(int)  # occurrences per step, per event name
    for block in inspector.event_blocks:
        if block.name != "Execute":  # loading and init
            continue
        for event in block.events:  # one per instruction (or delegate kernel), its times in the order of the runs
            times = event.perf_data.raw if event.perf_data is not None else []
            if not times or event.name in SETUP:
                continue
            if len(times) % runs:
                raise RuntimeError(f"ETDump has {len(times)} times for {event.name!r} over {runs} executions")
            per_run = len(times) // runs
            total[event.name] += float(np.sum(times[per_run:]))  # the prefill's come first
            calls[event.name] += per_run
    if not total:
        raise RuntimeError("ETDump recorded no executions")
    events = [{"name": n, "us_per_step": 1000 * t / steps, "calls_per_step": calls[n]} for n, t in total.items()]
    events.sort(key=lambda e: -e["us_per_step"])
    by_name = {e["name"]: e["us_per_step"] for e in events}
    portable = [e for e in events if e["name"].startswith("native_call_")]
    return {"bundle": str(path), "gate": bundle.gate, "quantize": bundle.quantize, "steps": steps,
            **{key: by_name.get(name, 0.0) for key, name in TOTALS.items()},
            "portable_kernels_us": float(sum(e["us_per_step"] for e in portable)),
            "portable_kernel_calls": int(sum(e["calls_per_step"] for e in portable)),
            "events": [e for e in events if e["name"] not in TOTALS.values()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", required=True,
                   help="an ExecuTorch bundle directory (repeatable: profiled one after the other)")
    p.add_argument("--steps", type=int, default=200, help="decode steps per bundle (default 200)")
    p.add_argument("--top", type=int, default=12, help="events printed per bundle (default 12; the JSON has all)")
    p.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    from ciar.cli.bench import write_result
    from ciar.runtime.bundle import BundleError
    try:
        rows = [profile(path, args.steps) for path in args.bundle]
    except BundleError as e:
        raise SystemExit(f"executorch_ops.py: {e}") from None
    out = sys.stderr if args.json == "-" else sys.stdout
    for row in rows:
        print(f"{row['bundle']} ({row['gate']}, {row['quantize']}): {row['execute_us']:.1f} us per step, XNNPACK "
              f"{row['delegate_us']:.1f}, portable kernels {row['portable_kernels_us']:.1f} in "
              f"{row['portable_kernel_calls']} calls", file=out)
        for e in row["events"][:args.top]:
            print(f"  {e['us_per_step']:7.1f} us  x{e['calls_per_step']:<3} {e['name']}", file=out)
    write_result({"bundles": rows, "environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                 args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
