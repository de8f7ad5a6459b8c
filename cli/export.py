"""`ciar export`: write an artifact bundle; `ciar export verify DIR`: check one against PyTorch."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ciar.runtime.bundle import GATE_KINDS  # torch-free: --help stays fast

DEFAULT_PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Export the device model + Inter-Head (with the caption encoder and VQ decoder) as an "
                     "artifact bundle, or verify a bundle: `ciar export --format onnx --quantize int8 --out DIR`, "
                     "`ciar export verify DIR`.")
    p.add_argument("action", nargs="?", choices=["build", "verify"], default="build",
                   help="build (default) a bundle, or verify one")
    p.add_argument("bundle", nargs="?", type=Path, help="the bundle directory to verify")
    p.add_argument("--format", default="onnx", help="onnx (default), executorch or coreml")
    p.add_argument("--quantize", default="none", help="none (default), int8 or int4")
    p.add_argument("--out", type=Path, help="output bundle directory (build)")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--gate", default="interval", choices=GATE_KINDS,
                   help="what the device graph scores: interval (default; the Inter-Head, CIAR's gate), or a bare "
                        "gate, entropy, maxprob or latent (the spread of the device's distribution in the VQ "
                        "codebook's latent space), without the Inter-Head: a cheaper step, no interval features, "
                        "no prefix injection by default (the baselines of `ciar bench methods --gate-bundle`; "
                        "onnx and executorch)")
    p.add_argument("--tau", type=float, default=None, help="default gate threshold to record in the manifest")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="caption used by verify")
    p.add_argument("--seed", type=int, default=0, help="seed of the verify decode")
    p.add_argument("--json", action="store_true", help="verify: print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ciar.export.bundle import export_bundle
    from ciar.export.verify import verify_bundle
    from ciar.models.builtin import load_builtin

    models = load_builtin(args.checkpoint)
    if args.action == "verify":
        if args.bundle is None:
            raise FileNotFoundError("which bundle? usage: ciar export verify DIR")
        report = verify_bundle(args.bundle, models, args.prompt, args.seed)
        out = dataclasses.asdict(report) | {"ok": report.ok}
        if args.json:
            print(json.dumps(out))
        else:
            for k, v in out.items():
                print(f"{k:>18}: {v}")
        return 0 if report.ok else 1
    if args.out is None:
        raise FileNotFoundError("where to? pass --out DIR")
    export_bundle(models, args.format, args.quantize, args.out, tau=args.tau, gate=args.gate)
    return 0
