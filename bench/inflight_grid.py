"""Verification in flight: ciar waiting for every verdict against ciar drafting on past verifications in flight,
for a grid of (lookahead, max in flight), with the cloud-only base, side by side in one run (interleaved per
prompt), timed on every link from the same decodes.

    python bench/inflight_grid.py --prompts 50 --json docs/results/inflight_grid.json
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=50, help="held-out prompts (default 50)")
    p.add_argument("--grid", default="4x1,8x1,16x1,8x4,16x4",
                   help="LOOKAHEADxMAX_IN_FLIGHT pairs, comma-separated (default 4x1,8x1,16x1,8x4,16x4)")
    p.add_argument("--cloud-rate", type=float, default=0.3, help="share of drafts sent, held by the controller")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")
    p.add_argument("--device-bundle", type=Path, default=None, metavar="DIR",
                   help="run the device side from this exported bundle (e.g. runtime/bundles/onnx-int8) instead of "
                        "PyTorch eager, as `ciar bench methods --device-bundle` does")
    p.add_argument("--cloud-device", default="cpu", metavar="DEVICE", help="where the cloud model runs: cpu "
                   "(default), cuda, cuda:N")
    p.add_argument("--json", type=str, default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from ciar.cli.bench import (bundle_proposer, calibrate_taus, device_label, place_cloud, relink, run_methods,
                                timing_rows, write_result)
    from ciar.engine import LINKS, get_method
    from ciar.models.builtin import load_builtin
    from ciar.training.scenes import heldout_prompts

    try:
        grid = [tuple(int(x) for x in pair.split("x")) for pair in args.grid.split(",")]
    except ValueError:
        p.error(f"--grid wants pairs like 8x1 (lookahead x max in flight), got {args.grid!r}")
    torch.set_num_threads(args.threads)
    models = load_builtin(args.checkpoint)
    cloud_device = place_cloud(models, args.cloud_device, "inflight_grid.py")
    proposer = bundle_proposer(models, args.device_bundle, args.threads, "inflight_grid.py")
    pool = heldout_prompts(max(1000, args.prompts + 20))
    prompts, calibration = pool[: args.prompts], pool[args.prompts: args.prompts + 20]
    tau = calibrate_taus(models, calibration, args.cloud_rate, args.seed, LINKS["lan"],
                         proposer=proposer)["interval"]
    waiting = get_method("ciar", tau=tau)
    methods = {"cloud": get_method("cloud"), "ciar": waiting}
    for lookahead, in_flight in grid:
        name = f"lookahead {lookahead}, {in_flight} in flight"
        methods[name] = dataclasses.replace(waiting, name=name, lookahead=lookahead, max_in_flight=in_flight)
    with tqdm(total=len(prompts), desc="in-flight grid", file=sys.stderr) as bar:
        runs = run_methods(models, prompts, methods, LINKS["lan"], args.seed, None, bar.update,
                           budget_rate=args.cloud_rate, proposer=proposer)
    result = {"prompts": len(prompts), "seed": args.seed, "tau": tau, "cloud_rate_target": args.cloud_rate,
              "threads": args.threads,
              "device": device_label(proposer), "cloud_device": cloud_device, "links": {}}
    for link in LINKS:
        result["links"][link] = timing_rows(relink(runs, LINKS[link]))
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"{'speed-up vs cloud':<30}" + "".join(f"{link:>8}" for link in LINKS) +
          f"{'device s':>10}{'waiting s':>10}{'drafts':>8}{'voided':>8}{'stale':>7}", file=out)
    for name in methods:
        lan = result["links"]["lan"][name]
        cells = "".join(f"{result['links'][link][name]['speedup']:>7.2f}x" for link in LINKS)
        print(f"{name:<30}{cells}{lan['device_seconds']:>10.3f}{lan['waiting_seconds']:>10.3f}"
              f"{lan['drafts']:>8.0f}{lan['voided']:>8.0f}{lan['stale_requests']:>7.1f}", file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
