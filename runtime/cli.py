"""`ciar-device`: the torch-free device command line (numpy + onnxruntime).

    ciar-device run   [--bundle DIR] --prompt "..." [--tau X | --cloud-rate R] [--cloud ws://HOST:PORT] --out image.png
    ciar-device bench [--bundle DIR ...] [--threads N] [--json out.json]
    ciar-device info
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from .bundle import DEFAULT_CLOUD_RATE, BundleError, gate_cloud_rate
from .rates import cloud_calls_per_token, measured_tau

DEFAULT_BUNDLES = Path(__file__).parent / "bundles"
DEFAULT_PROMPT = "a large red circle at the top left and a small blue square in the centre, on a white background"


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


def shipped_bundles() -> list[Path]:
    return sorted(p for p in DEFAULT_BUNDLES.iterdir() if (p / "manifest.json").exists()) \
        if DEFAULT_BUNDLES.exists() else []


def default_bundle() -> Path:
    bundles = shipped_bundles()
    if not bundles:
        raise BundleError(f"no bundle given and none shipped in {DEFAULT_BUNDLES}; pass --bundle DIR "
                          "(make one with `ciar export`)")
    int8 = [b for b in bundles if "int8" in b.name]
    return (int8 or bundles)[0]


def cloud_rate_for(bundle, tau: float | None, cloud_rate: float | None) -> float | None:
    """The cloud-call rate the gate is set by (--cloud-rate, else the bundle's default rate), or None when tau is
    absolute (--tau, or a tau recorded in the bundle)."""
    gate = bundle.manifest["gate"]
    if tau is not None or (cloud_rate is None and gate.get("tau") is not None):
        return None
    return gate_cloud_rate(bundle.manifest) if cloud_rate is None else cloud_rate


def tau_for(bundle, tau: float | None, cloud_rate: float | None) -> float:
    """--tau as given; else --cloud-rate through the bundle's calibration table (quantiles of U); else the
    bundle's default tau, or its default cloud rate through the table."""
    rate = cloud_rate_for(bundle, tau, cloud_rate)
    if rate is None:
        return tau if tau is not None else float(bundle.manifest["gate"]["tau"])
    if not 0.0 <= rate <= 1.0:
        raise BundleError(f"--cloud-rate must be in [0, 1], got {rate}")
    table = bundle.manifest["gate"].get("u_quantiles")
    if not table:
        raise BundleError(f"{bundle.path}: the manifest has no calibration table (gate.u_quantiles); pass --tau")
    if rate <= 0.0:
        return math.inf
    i = (1.0 - rate) * (len(table) - 1)
    lo, hi = int(math.floor(i)), int(math.ceil(i))
    return float(table[lo] + (table[hi] - table[lo]) * (i - lo))


def choose_tau(bundle, tau: float | None, cloud_rate: float | None, cloud: bool,
               prefix_fraction: float | None = None) -> tuple[float, str]:
    """tau for a run and where it came from ("tau", "u_quantiles" or "cloud_calls"): `tau_for`'s (--tau, or the rate
    through the quantile table), except that with a cloud a rate goes through the bundle's measured cloud-call table
    (`ciar export calibrate`) where it has one for this prefix (None: the bundle's): `rates.measured_tau`."""
    quantile, rate = tau_for(bundle, tau, cloud_rate), cloud_rate_for(bundle, tau, cloud_rate)
    if rate is None:
        return quantile, "tau"
    if not cloud:
        return quantile, "u_quantiles"
    frac = bundle.manifest["gate"]["prefix_fraction"] if prefix_fraction is None else prefix_fraction
    return measured_tau(bundle.manifest, rate, frac, quantile)


def cmd_run(args: argparse.Namespace) -> int:
    from .backend import make_backend
    from .budget import BudgetController
    from .bundle import load_bundle
    from .generator import PREFIX, DeviceGenerator
    from .images import save_png, upscale, uncertainty_map

    bundle = load_bundle(args.bundle or default_bundle())
    tau, tau_from = choose_tau(bundle, args.tau, args.cloud_rate, bool(args.cloud), args.prefix_fraction)
    rate = cloud_rate_for(bundle, args.tau, args.cloud_rate)
    budget = None
    if args.budget_cap is not None:
        budget = BudgetController.capped(tau, args.budget_cap)
    elif args.budget:
        if rate is None:
            raise BundleError("--budget holds each image at a cloud rate, and tau here is absolute (--tau, or the "
                              "bundle's gate.tau); pass --cloud-rate R instead")
        budget = BudgetController(tau, rate)
    gen = DeviceGenerator(bundle, make_backend(bundle, args.threads), args.threads)
    verifier, client_stats = None, None
    if args.cloud:
        from ciar.cloud_bridge.client import BridgeClient, ClientConfig
        token = args.token_file.read_text().strip() if args.token_file else ""
        verifier = BridgeClient(ClientConfig(args.cloud, token=token, timeout_s=args.timeout))
    result = gen.generate(args.prompt, args.seed, tau, verifier=verifier,
                          prefix_fraction=args.prefix_fraction if args.cloud else 0.0, chain=args.chain,
                          lookahead=args.lookahead, budget=budget)
    if verifier is not None:
        client_stats = verifier.stats.summary()
    save_png(upscale(result.image, args.scale), args.out)
    umap = args.uncertainty or args.out.with_name(args.out.stem + "_uncertainty.png")
    save_png(uncertainty_map(result.image, result.sent, result.source == PREFIX, args.scale), umap)
    stats = {**result.stats, "bundle": str(bundle.path), "format": bundle.format, "quantize": bundle.quantize,
             "gate": bundle.gate, "seed": args.seed, "prompt": args.prompt, "mode": "cloud" if args.cloud else "local",
             "chain": args.chain, "budget": args.budget, "budget_cap": args.budget_cap, "tau_from": tau_from}
    if client_stats is not None:
        stats.update(cloud_url=args.cloud, bridge=client_stats, bytes_up=client_stats["bytes_up"],
                     bytes_down=client_stats["bytes_down"],
                     cloud_calls=cloud_calls_per_token(stats["prefix"], client_stats["verified"], stats["tokens"]))
    if args.stats:
        args.stats.parent.mkdir(parents=True, exist_ok=True)
        args.stats.write_text(json.dumps(stats, indent=1))
    print(f"wrote {args.out} and {umap}: {stats['tokens']} tokens, {stats['local']} local, "
          f"{stats['sent']} over tau={tau:.3g} ({stats['unverified']} unverified), {stats['seconds']:.2f} s")
    if client_stats is not None and client_stats["offline_reason"]:
        print(f"the cloud was left behind ({client_stats['offline_reason']}): unverified tokens were kept as the "
              "device drafted them", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_bundle, memory_bandwidth

    if args.images < 1 or args.warmup_images < 0:
        raise BundleError(f"--images must be at least 1 and --warmup-images at least 0 "
                          f"(got {args.images} and {args.warmup_images})")
    bundles = args.bundle or shipped_bundles()
    if not bundles:
        raise BundleError(f"no bundles to benchmark: pass --bundle DIR (none shipped in {DEFAULT_BUNDLES})")
    rows = [bench_bundle(Path(b), args.threads, args.images, args.warmup_images) for b in bundles]
    bandwidth = memory_bandwidth()  # after the bundles: its buffers would dominate their peak RSS
    for r in rows:
        r["floor_ms"] = 1000 * r["weight_bytes"] / bandwidth
        r["floor_ratio"] = r["step_ms_p50"] / r["floor_ms"]
    result = {"environment": environment(), "threads": args.threads, "memory_bandwidth_gbs": bandwidth / 1e9,
              "bundles": rows}
    stream = sys.stderr if args.json == "-" else sys.stdout
    print(f"{'bundle':<28}{'prefill ms':>11}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'tok/s':>8}"
          f"{'floor ms':>10}{'x floor':>9}{'overhead':>10}{'ovh us':>8}{'RSS MB':>8}", file=stream)
    for r in rows:
        print(f"{Path(r['bundle']).name:<28}{r['prefill_ms']:>11.2f}{r['step_ms_p50']:>9.3f}{r['step_ms_p95']:>9.3f}"
              f"{r['step_ms_max']:>9.3f}{r['tokens_per_s']:>8.0f}{r['floor_ms']:>10.4f}{r['floor_ratio']:>9.1f}"
              f"{r['overhead_fraction']:>10.3f}{r['overhead_us_per_step']:>8.1f}{r['peak_rss_mb']:>8.0f}", file=stream)
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    env = environment()
    env["shipped_bundles"] = [str(p) for p in shipped_bundles()]
    if args.json:
        print(json.dumps(env))
    else:
        for k, v in env.items():
            print(f"{k:>16}: {v}")
    return 0


def at_least(low: int):
    """An argparse type: an int >= low, or a usage error that says so (also `ciar bench`'s)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def fraction(text: str) -> float:
    """argparse type: a share of the image, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ciar-device", description=(
        "The torch-free on-device runtime of ciar (numpy + onnxruntime). With no --bundle, the shipped default "
        "bundle is used."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="generate one image on this device")
    run.add_argument("--bundle", type=Path, default=None, help="artifact bundle directory (default: shipped int8)")
    run.add_argument("--prompt", default=DEFAULT_PROMPT, help="the caption")
    gate = run.add_mutually_exclusive_group()
    gate.add_argument("--tau", type=float, default=None, help="absolute threshold on U (U >= tau goes to the cloud)")
    gate.add_argument("--cloud-rate", type=float, default=None,
                      help="cloud calls per image token (the cloud's prefix included; offline: the share of drafts "
                           "flagged): tau is where the bundle's tables put the rate (with --cloud, what each tau "
                           "spent with a cloud, `ciar export calibrate`; else quantiles of U) and stays there, so "
                           "the rate holds on average over images and each image gets the verifications its "
                           "drafts need (default: the bundle's rate, else %s)" % DEFAULT_CLOUD_RATE)
    spend = run.add_mutually_exclusive_group()
    spend.add_argument("--budget", action="store_true",
                       help="hold each image at --cloud-rate instead: tau is nudged after every draft by the "
                            "image's rate so far. It spends more and makes worse images (at 0.3: 0.285 calls, "
                            "adherence 0.934, against 0.259 and 0.944 with tau fixed; docs/BENCHMARKS.md section 3m)")
    spend.add_argument("--budget-cap", type=fraction, default=None, metavar="R",
                       help="never spend more than R cloud calls per token on the image: tau stays where "
                            "--cloud-rate (or --tau) puts it, and once the image has made floor(R x its tokens) cloud "
                            "calls (prefill and prefix included) nothing more is sent. An image under R is the image "
                            "of tau fixed")
    run.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same image)")
    run.add_argument("--out", type=Path, default=Path("image.png"), help="output PNG (default image.png)")
    run.add_argument("--uncertainty", type=Path, default=None,
                     help="uncertainty-map PNG (default: OUT with _uncertainty)")
    run.add_argument("--stats", type=Path, default=None, help="write per-image stats JSON here")
    run.add_argument("--scale", type=int, default=4, help="PNG upscaling (default 4)")
    run.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    run.add_argument("--cloud", default=None, metavar="URL",
                     help="verify uncertain tokens on a `ciar serve` cloud (ws://HOST:PORT or wss://); default: "
                          "device only, uncertain tokens kept unverified")
    run.add_argument("--prefix-fraction", type=fraction, default=None, metavar="F",
                     help="with --cloud: the share of the image the cloud writes first (prefix injection; default: "
                          "the bundle's). At small budgets 0 can make better images: the prefix's forwards go to "
                          "verifications instead (docs/BENCHMARKS.md section 3k)")
    run.add_argument("--chain", type=at_least(1), default=1, metavar="K",
                     help="the most drafts one verification carries: an uncertain draft goes up with the uncertain "
                          "drafts after it, ended by the first confident one (default 1: each alone; K = 4 "
                          "measured no better in quality and 15%% slower, docs/BENCHMARKS.md section 3d)")
    run.add_argument("--lookahead", type=at_least(0), default=0, metavar="N",
                     help="draft on up to N positions past a verification in flight instead of waiting for its "
                          "verdict (one verification out at a time; the same image, token for token; default 0)")
    run.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token for --cloud")
    run.add_argument("--timeout", type=float, default=5.0,
                     help="seconds to wait for a verdict before going on locally (default 5)")
    bench = sub.add_parser("bench", help="per-token latency of every bundle on this hardware")
    bench.add_argument("--bundle", type=Path, action="append", help="bundle directory (repeatable; "
                       "default: every shipped bundle)")
    bench.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    bench.add_argument("--images", type=int, default=2, help="images measured, 255 decode steps each (default 2)")
    bench.add_argument("--warmup-images", type=int, default=1, help="warm-up images, not measured (default 1)")
    bench.add_argument("--json", default=None, help="write results here ('-' prints them)")
    info = sub.add_parser("info", help="print this device's CPU, cores, library versions and shipped bundles")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"run": cmd_run, "bench": cmd_bench, "info": cmd_info}[args.command](args)
    except (BundleError, FileNotFoundError) as e:
        print(f"ciar-device {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
