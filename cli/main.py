"""`ciar`: the workstation / cloud command line. Each subcommand lives in its own module under ciar.cli."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help). Modules expose `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "demo": ("ciar.cli.demo", "the main job: CIAR decoding of one caption with the built-in model"),
    "selftest": ("ciar.cli.selftest", "check this install: KV-cached decoding with CFG and the Inter-Head"),
    "generate": ("ciar.cli.generate", "one image from a caption with the built-in model"),
    "eval": ("ciar.cli.eval", "quality and gate AUROC of the built-in model on held-out prompts"),
    "export": ("ciar.cli.export", "export an on-device artifact bundle (ONNX ...), or verify one"),
    "serve": ("ciar.cli.serve", "the cloud bridge: a websocket server verifying device tokens for many devices"),
    "bench": ("ciar.cli.bench", "benchmarks (`ciar bench methods`: every decoding method vs the cloud base)"),
    "train": ("ciar.cli.train", "train the built-in model (`ciar train builtin`)"),
}


def _user_errors() -> tuple[type, ...]:
    from ciar.export.bundle import ExportError
    from ciar.cloud_bridge.server import ConfigError
    from ciar.runtime.bundle import BundleError
    return (ExportError, BundleError, ConfigError)


USER_ERRORS = _user_errors()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ciar", description=(
        "Interval-based device/cloud collaborative decoding for autoregressive image generation."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        import_module(module).add_arguments(p)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ciar")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(import_module(COMMANDS[args.command][0]).run(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # bad input: say which and what to do, no traceback
        if isinstance(e, ValueError) and not isinstance(e, USER_ERRORS):
            raise
        print(f"ciar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
