"""What `ciar-device run --cloud-rate R` spends: cloud calls per image token (the cloud's prefix included, Verifies
counted as the cloud answered them) with tau fixed at the bundle's calibration table and with the per-image budget
controller starting there, side by side on the same held-out prompts and seeds (the cloud in this process,
`DirectVerifier`: no socket, so nothing here is timed); and with the controller as a cap (`--budget-cap`: tau
starts there and only rises, while the image spends more than `--cap-factor` times the rate).

    python bench/runtime_budget.py --prompts 30 --rates 0.1 0.3 0.5 --json docs/results/runtime_budget.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ciar.cli.bench import write_result
from ciar.cloud_bridge.cloud import CloudService
from ciar.cloud_bridge.direct import DirectVerifier
from ciar.models.builtin import load_builtin
from ciar.runtime.backend import make_backend
from ciar.runtime.budget import BudgetController
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import default_bundle, environment, tau_for
from ciar.runtime.generator import DeviceGenerator
from ciar.training.scenes import heldout_prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=30, help="held-out prompts (default 30)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.5], help="targets (default 0.1 0.3 0.5)")
    p.add_argument("--bundle", type=Path, default=None, help="device bundle (default: the shipped int8 ONNX)")
    p.add_argument("--cap-factor", type=float, default=2.0, help="the cap, as a multiple of the rate (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    if not all(0.0 < r <= 1.0 for r in args.rates):
        p.error(f"--rates must lie in (0, 1], got {args.rates}")
    if args.cap_factor < 1.0:
        p.error(f"--cap-factor must be at least 1, got {args.cap_factor}")
    out = sys.stderr if args.json == "-" else sys.stdout  # the JSON alone on stdout
    bundle = load_bundle(args.bundle or default_bundle())
    gen = DeviceGenerator(bundle, make_backend(bundle))
    service = CloudService(load_builtin(None), max_sessions=1)
    prompts = heldout_prompts(args.prompts)
    rows = {}
    for rate in args.rates:
        tau = tau_for(bundle, None, rate)
        cap = min(1.0, args.cap_factor * rate)
        controllers = {"fixed tau": lambda: None, "budget": lambda: BudgetController(tau, rate),
                       "cap": lambda: BudgetController.capped(tau, cap)}
        calls: dict[str, list[float]] = {name: [] for name in controllers}
        for i, prompt in enumerate(tqdm(prompts, desc=f"rate {rate}", file=sys.stderr)):
            for name, controller in controllers.items():
                v = DirectVerifier(service)
                r = gen.generate(prompt, args.seed * 1_000_003 + i, tau, verifier=v, decode_image=False,
                                 budget=controller())
                calls[name].append((r.stats["prefix"] + v.seq) / gen.T)
        rows[str(rate)] = {name: {"mean": float(np.mean(c)), "p10": float(np.percentile(c, 10)),
                                  "p90": float(np.percentile(c, 90)), "max": float(np.max(c)),
                                  "over_cap": float(np.mean(np.asarray(c) > cap)),
                                  "mean_abs_error": float(np.mean(np.abs(np.asarray(c) - rate)))}
                           for name, c in calls.items()}
        rows[str(rate)]["cap_rate"] = cap
        for name in controllers:
            row = rows[str(rate)][name]
            print(f"target {rate:.2f}  {name:<10} cloud calls per token: mean {row['mean']:.3f}, p10 {row['p10']:.3f},"
                  f" p90 {row['p90']:.3f}, max {row['max']:.3f} ({row['over_cap']:.0%} over {cap:.2f}), "
                  f"mean |error| {row['mean_abs_error']:.3f}", file=out)
    result = {"prompts": args.prompts, "bundle": str(bundle.path), "rates": rows, "environment": environment(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
