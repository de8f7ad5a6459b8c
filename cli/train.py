"""`ciar train builtin`: train the built-in text-to-image model from scratch (resumable)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ciar.runtime.cli import at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    b = sub.add_parser("builtin",
                       help="every stage of the built-in model: features, vq, text, cloud, device (Inter-DRO), phi",
                       description="Train the built-in model from scratch. Re-running with the same --out resumes "
                                   "from the last checkpoint of the unfinished stage.")
    b.add_argument("--out", type=Path, default=Path("runs/builtin"), help="run directory (default runs/builtin)")
    b.add_argument("--configs", type=Path, default=None,
                   help="directory of stage configs features.json, vq.json, text.json, cloud.json, device.json, "
                        "gate.json, phi.json (default: the ones shipped in ciar.training)")
    b.add_argument("--smoke", action="store_true", help="a few steps of every stage, to check the pipeline")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--device-layers", type=at_least(1), default=None, metavar="N",
                   help="transformer layers of the device model (default: device.json's, 1 as in METHOD.md; "
                        "2 is measured in docs/BENCHMARKS.md section 3f)")
    b.add_argument("--cloud-from", type=Path, default=None, metavar="DIR",
                   help="take the features, VQ, caption encoder and cloud from trained weights (e.g. models/builtin) "
                        "and train only the device, gate and phi stages against that cloud")
    b.add_argument("--install", action="store_true",
                   help="copy the final weights over the shipped built-in model (models/builtin/)")


def run(args: argparse.Namespace) -> int:
    from ciar.models.builtin import BUILTIN_DIR
    from ciar.training.builtin import CONFIG_DIR, CloudFromError, train_builtin

    try:
        weights = train_builtin(args.out, smoke=args.smoke, config_dir=args.configs or CONFIG_DIR,
                                threads=args.threads, device_layers=args.device_layers, cloud_from=args.cloud_from)
    except CloudFromError as e:
        print(f"ciar train: error: {e}", file=sys.stderr)
        return 2
    print(f"weights written to {weights}")
    if args.install:
        if args.smoke:
            print("refusing to install smoke-test weights over the shipped model")
            return 2
        BUILTIN_DIR.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            shutil.copy2(f, BUILTIN_DIR / f.name)
        print(f"installed into {BUILTIN_DIR}")
    return 0
