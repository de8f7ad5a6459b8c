"""Per-token latency of an ONNX bundle's decode step with the graph's length fixed to 1 (what `OnnxBackend` runs
since 2026-12-05) against the same graph with its length left free, side by side in one process.

Whole local-only images through the runtime's own generation loop (`DeviceGenerator.generate`, as `ciar-device
bench` runs them), the two backends alternating image by image so that both see the same machine noise; the
same seeds give both the same tokens (checked: the two sessions compute the same step to float rounding).

    python bench/decode_session.py --bundle runtime/bundles/onnx-int8 --images 8 \\
        --json docs/results/decode_session.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ciar.runtime.backend import OnnxBackend
from ciar.runtime.bench import local_image
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import environment
from ciar.runtime.generator import DeviceGenerator

MODES = {"fixed_length": True, "any_length": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, action="append", help="an ONNX bundle (repeatable; default: the shipped "
                    "runtime/bundles/onnx-int8)")
    ap.add_argument("--images", type=int, default=8, help="measured images per bundle and mode (256 steps each)")
    ap.add_argument("--warmup-images", type=int, default=1, help="images per mode run first and not measured")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args()
    rows = []
    for path in args.bundle or [Path("runtime/bundles/onnx-int8")]:
        bundle = load_bundle(path)
        if bundle.format != "onnx":
            raise SystemExit(f"{path}: a {bundle.format} bundle; this compares onnxruntime sessions (ONNX bundles)")
        gens = {mode: DeviceGenerator(bundle, OnnxBackend(bundle, args.threads, fixed_length_decode=fixed),
                                      args.threads) for mode, fixed in MODES.items()}
        steps: dict[str, list] = {mode: [] for mode in MODES}
        graph: dict[str, list] = {mode: [] for mode in MODES}
        tokens: dict[str, list] = {mode: [] for mode in MODES}
        total = (args.warmup_images + args.images) * len(MODES)
        with tqdm(total=total, desc=str(path)) as bar:
            for i in range(args.warmup_images + args.images):
                for mode, gen in gens.items():
                    r = local_image(gen, i)
                    if i >= args.warmup_images:
                        steps[mode].append(r.step_ms[:-1])  # the last token needs no graph call
                        graph[mode].append(r.backend_ms[:-1])
                        tokens[mode].append(r.tokens)
                    bar.update()
        row = {"bundle": str(path), "quantize": bundle.quantize, "threads": args.threads, "images": args.images,
               "same_tokens": all(np.array_equal(a, b) for a, b in zip(*tokens.values()))}
        for mode in MODES:
            s, g = np.concatenate(steps[mode]), np.concatenate(graph[mode])
            row[mode] = {"step_ms_p50": float(np.median(s)), "step_ms_p95": float(np.percentile(s, 95)),
                         "graph_ms_p50": float(np.median(g)), "steps": len(s)}
        row["step_ratio"] = row["any_length"]["step_ms_p50"] / row["fixed_length"]["step_ms_p50"]
        row["graph_ratio"] = row["any_length"]["graph_ms_p50"] / row["fixed_length"]["graph_ms_p50"]
        rows.append(row)
        print(f"{path}: step p50 {row['fixed_length']['step_ms_p50']:.3f} ms fixed length vs "
              f"{row['any_length']['step_ms_p50']:.3f} ms any length ({row['step_ratio']:.2f}x); graph call "
              f"{row['graph_ratio']:.2f}x; same tokens: {row['same_tokens']}")
    result = {"environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "bundles": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
