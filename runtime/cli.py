"""`ciar-device`: the torch-free device command line (numpy + onnxruntime)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, object]:
    """What a per-token latency number depends on: CPU, cores, Python and library versions."""
    versions = {}
    for dist in ("ciar", "numpy", "onnxruntime", "websockets", "executorch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "system": platform.platform(), "versions": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ciar-device", description=(
        "The torch-free on-device runtime of ciar (numpy + onnxruntime)."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print this device's CPU, cores and library versions")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    env = environment()
    if args.json:
        print(json.dumps(env))
    else:
        for k, v in env.items():
            print(f"{k:>8}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
