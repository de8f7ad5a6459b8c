"""What `ciar-device run --cloud-rate R` spends: cloud calls per image token (the cloud's prefix included, Verifies
counted as the cloud answered them) with tau fixed where the bundle's tables put R (`--tau-from`) and with the
per-image budget controller starting there, side by side on the same held-out prompts and seeds (the cloud in this
process, `DirectVerifier`: no socket, so nothing here is timed); and capped (`--budget-cap`: tau fixed there until the
image has spent `--cap-factor` times the rate, then nothing more sent). With `--quality`,
also what each policy's images are worth: adherence, FD and F1 per policy, and with `--bootstrap N` each policy
minus tau fixed, paired over prompts (95% intervals), so that the runtime's default policy is chosen by its images.

    python bench/runtime_budget.py --prompts 30 --rates 0.1 0.3 0.5 --json docs/results/runtime_budget.json
    python bench/runtime_budget.py --prompts 500 --rates 0.3 --quality --bootstrap 1000 --json out.json

Cloud calls per token count as `ciar-device run` reports them (`ciar.runtime.rates.cloud_calls_per_token`: the
cloud's prefill, its prefix, its verifications). Results written before 2026-12-06 22:00 (docs/results/
runtime_budget*.json, runtime_policy_600_*.json) counted without the prefill forward: 1/256 = 0.004 less.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ciar.cli.bench import write_result
from ciar.cli.calibrate import cloud_decode
from ciar.cloud_bridge.cloud import CloudService
from ciar.models.builtin import load_builtin
from ciar.runtime.backend import make_backend
from ciar.runtime.budget import BudgetController
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import choose_tau, default_bundle, environment
from ciar.runtime.generator import DeviceGenerator
from ciar.training.scenes import heldout_prompts

FIXED = "fixed tau"
POLICIES = {"fixed": FIXED, "budget": "budget", "cap": "cap"}  # option -> row name


def policy_quality(models, tokens: dict[str, list[np.ndarray]], prompts: list[str], bootstrap: int,
                   seed: int) -> dict[str, dict]:
    """Adherence / FD / F1 of each policy's images (decoded by the torch VQ, as `ciar bench methods` scores them),
    and with `bootstrap` resamples each policy minus tau fixed, paired over prompts."""
    from ciar.training.evaluate import decode_tokens, paired_quality_bootstrap, quality_and_sample
    from ciar.training.features import load_feature_net

    net = load_feature_net(models.directory)
    rows, samples = {}, {}
    for name, grids in tokens.items():
        q, samples[name] = quality_and_sample(decode_tokens(models, torch.from_numpy(np.stack(grids))), prompts,
                                              name, net)
        rows[name] = {"adherence": q.adherence, "fd": q.fd, "f1": q.f1}
    if bootstrap:
        minus = paired_quality_bootstrap(samples, FIXED, bootstrap, seed)["minus"]
        for name, d in minus.items():  # FIXED minus the policy, turned round: the policy minus tau fixed
            rows[name]["minus_fixed"] = {m: {"mean": 0.0 - v["mean"], "ci95": [0.0 - v["ci95"][1],
                                                                               0.0 - v["ci95"][0]]}
                                         for m, v in d.items()}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=30, help="held-out prompts (default 30)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.5], help="targets (default 0.1 0.3 0.5)")
    p.add_argument("--bundle", type=Path, default=None, help="device bundle (default: the shipped int8 ONNX)")
    p.add_argument("--cap-factor", type=float, default=2.0, help="the cap, as a multiple of the rate (default 2)")
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                   help="which policies to run (default all): tau fixed, each image held at the rate (budget), "
                        "capped at --cap-factor times the rate")
    p.add_argument("--tau-from", choices=["auto", "quantiles"], default="auto",
                   help="auto (default): tau as `ciar-device run --cloud` picks it, from the bundle's measured "
                        "cloud-call table where it has one (`ciar export calibrate`); quantiles: from the quantile "
                        "table of device-only decodes")
    p.add_argument("--quality", action="store_true",
                   help="also decode and score every image: adherence, FD and F1 per policy (slower: the images are "
                        "decoded and parsed)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="with --quality, each policy minus tau fixed over N paired resamples of the prompts")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime and torch threads (default 1: two runs side by side do not oversubscribe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here ('-' prints them)")
    args = p.parse_args(argv)
    if not all(0.0 < r <= 1.0 for r in args.rates):
        p.error(f"--rates must lie in (0, 1], got {args.rates}")
    if args.cap_factor < 1.0:
        p.error(f"--cap-factor must be at least 1, got {args.cap_factor}")
    if args.bootstrap and not args.quality:
        p.error("--bootstrap resamples the images' quality; add --quality")
    if args.bootstrap and "fixed" not in args.policies:
        p.error("--bootstrap compares every policy with tau fixed; add fixed to --policies")
    if args.quality and args.prompts < 2:
        p.error("--quality compares image sets (FD); give --prompts 2 or more")
    out = sys.stderr if args.json == "-" else sys.stdout  # the JSON alone on stdout
    bundle = load_bundle(args.bundle or default_bundle())
    torch.set_num_threads(args.threads)  # the cloud in this process
    gen = DeviceGenerator(bundle, make_backend(bundle, args.threads), args.threads)
    models = load_builtin(None)
    service = CloudService(models, max_sessions=1)
    prompts = heldout_prompts(args.prompts)
    rows = {}
    for rate in args.rates:
        tau, tau_from = choose_tau(bundle, None, rate, cloud=args.tau_from == "auto")
        cap = min(1.0, args.cap_factor * rate)
        make = {"fixed": lambda: None, "budget": lambda: BudgetController(tau, rate),
                "cap": lambda: BudgetController.capped(tau, cap)}
        controllers = {POLICIES[k]: make[k] for k in args.policies}
        calls: dict[str, list[float]] = {name: [] for name in controllers}
        tokens: dict[str, list[np.ndarray]] = {name: [] for name in controllers}
        for i, prompt in enumerate(tqdm(prompts, desc=f"rate {rate}", file=sys.stderr)):
            for name, controller in controllers.items():
                r, spent = cloud_decode(gen, service, prompt, args.seed * 1_000_003 + i, tau, controller())
                calls[name].append(spent)
                tokens[name].append(r.tokens)
        rows[str(rate)] = {name: {"mean": float(np.mean(c)), "p10": float(np.percentile(c, 10)),
                                  "p90": float(np.percentile(c, 90)), "max": float(np.max(c)),
                                  "over_cap": float(np.mean(np.asarray(c) > cap)),
                                  "mean_abs_error": float(np.mean(np.abs(np.asarray(c) - rate)))}
                           for name, c in calls.items()}
        if args.quality:
            for name, q in policy_quality(models, tokens, prompts, args.bootstrap, args.seed).items():
                rows[str(rate)][name].update(q)
        rows[str(rate)].update(cap_rate=cap, tau=tau, tau_from=tau_from)
        for name in controllers:
            row = rows[str(rate)][name]
            print(f"target {rate:.2f}  {name:<10} cloud calls per token: mean {row['mean']:.3f}, p10 {row['p10']:.3f},"
                  f" p90 {row['p90']:.3f}, max {row['max']:.3f} ({row['over_cap']:.0%} over {cap:.2f}), "
                  f"mean |error| {row['mean_abs_error']:.3f}", file=out)
            if args.quality:
                diff = row.get("minus_fixed")
                said = "" if diff is None else " (minus tau fixed: adherence {:+.3f} [{:+.3f}, {:+.3f}], FD {:+.1f} " \
                    "[{:+.1f}, {:+.1f}])".format(diff["adherence"]["mean"], *diff["adherence"]["ci95"],
                                                 diff["fd"]["mean"], *diff["fd"]["ci95"])
                print(f"{'':16}{name:<10} adherence {row['adherence']:.3f}, FD {row['fd']:.1f}, F1 {row['f1']:.3f}"
                      + said, file=out)
    result = {"prompts": args.prompts, "bundle": str(bundle.path), "cap_factor": args.cap_factor,
              "quality": args.quality, "bootstrap": args.bootstrap, "rates": rows, "environment": environment(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
