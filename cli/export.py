"""`ciar export`: write an artifact bundle; `ciar export verify DIR`: check one against PyTorch; `ciar export
calibrate DIR`: measure what its taus spend with the cloud in the loop (`ciar.cli.calibrate`)."""
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
                     "`ciar export verify DIR`, `ciar export calibrate DIR`.")
    p.add_argument("action", nargs="?", choices=["build", "verify", "calibrate"], default="build",
                   help="build (default) a bundle, verify one against PyTorch, or calibrate one: decode held-out "
                        "prompts with the cloud in the loop at a grid of taus and record the cloud calls per token "
                        "each spent (gate.cloud_calls), so that `ciar-device run --cloud --cloud-rate R` spends R")
    p.add_argument("bundle", nargs="?", type=Path, help="the bundle directory to verify or calibrate")
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
    p.add_argument("--json", action="store_true", help="verify, calibrate: print one JSON object")
    p.add_argument("--prompts", type=int, default=64,
                   help="calibrate: held-out prompts decoded at each tau (default 64: about 10 minutes on one core; "
                        "the mean's standard error is then about 0.01 calls per token)")
    p.add_argument("--rates", type=float, nargs="+", default=None, metavar="R",
                   help="calibrate: the rates whose quantile-table taus are measured (default 0.01 0.03 0.05 0.08 0.1 "
                        "0.15 0.2 0.3 0.4 0.5 0.7 0.9)")
    p.add_argument("--threads", type=int, default=1, help="calibrate: onnxruntime and torch threads (default 1)")


def run(args: argparse.Namespace) -> int:
    from ciar.export.bundle import export_bundle
    from ciar.export.verify import verify_bundle
    from ciar.models.builtin import load_builtin

    if args.action == "calibrate":
        return calibrate(args)
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
    if args.format != "coreml":
        print(f"with a cloud, the quantile table's rates are not what a tau spends; to record what it does: "
              f"ciar export calibrate {args.out} (about 10 minutes)")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    import torch

    from ciar.cli.calibrate import RATES, calibrate_bundle
    from ciar.models.builtin import load_builtin

    if args.bundle is None:
        raise FileNotFoundError("which bundle? usage: ciar export calibrate DIR")
    if args.prompts < 1:
        raise SystemExit(f"ciar export calibrate: --prompts must be at least 1, got {args.prompts}")
    if args.rates and not all(0.0 < r < 1.0 for r in args.rates):
        raise SystemExit(f"ciar export calibrate: --rates must lie in (0, 1), got {args.rates}")
    torch.set_num_threads(args.threads)
    table = calibrate_bundle(args.bundle, load_builtin(args.checkpoint), args.prompts, tuple(args.rates or RATES),
                             args.threads)
    if args.json:
        print(json.dumps(table))
    else:
        print(f"wrote gate.cloud_calls into {args.bundle / 'manifest.json'} ({table['prompts']} prompts, prefix "
              f"{table['prefix_fraction']}):")
        for tau, calls in zip(table["taus"], table["calls"]):
            print(f"  tau {tau:.4g}: {calls:.3f} cloud calls per token")
    return 0
