"""What the Inter-Head's arithmetic costs in the device step: the shipped bounds against the log-space form.

The shipped device graph computes the InterFuse bounds in linear space (`models.interval.interval_bounds`: two
exponentials and a sum per bound, each at its own scale) and the radius's softplus from elementwise ops
(`models.interval.softplus`). Before, it computed the bounds as the Inter-DRO loss does, in log space
(`interval_log_bounds`: two leave-one-out log-sum-exps and a log-add-exp per bound) and the softplus with
torch's `F.softplus` (onnxruntime's Softplus kernel is scalar). This script exports that previous form from the
same weights (`LogBoundsGraph`), quantizes it as `ciar export --quantize int8` does, and times both decode steps
side by side (`head_cost.side_by_side`), then compares U of the two bound formulas on the device's boxes over
cloud-drawn images of held-out prompts (PyTorch, float32 boxes as the graph has them) with U in float64 as the
reference: relative errors, overall and near the bundle's calibrated tau, and the share of positions the gate
decides alike.

    python bench/interval_bounds.py --json docs/results/interval_bounds.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from head_cost import add_timing_arguments, export_variant, int8_onnx_bundle, side_by_side  # noqa: E402

from ciar.export.graph import DeviceGraph  # noqa: E402
from ciar.models.interval import cfg_combine_interval, interval_log_bounds, interval_stats, u_score  # noqa: E402
from ciar.runtime.cli import environment  # noqa: E402


def log_space_u(centre, radius):
    """U from the log-space bounds (the previous graph's formula)."""
    log_lo, log_up = interval_log_bounds(centre, radius)
    return u_score(log_lo.exp(), log_up.exp())[0]


class LogBoundsGraph(DeviceGraph):
    """The shipped `DeviceGraph` as it was before: torch's softplus and the log-space bounds (same outputs; the
    exporter adds the draw table to both)."""

    def forward(self, embeds, input_pos, neighbours, k_cache, v_cache, cfg_scale, temperature):
        out, cache = self.backbone(embeds, input_pos, k_cache, v_cache)
        head = self.device.inter_head
        c, r = cfg_combine_interval(out.logits, F.softplus(head.pre_radius(out.hidden)), cfg_scale)
        c, r = c / temperature, r / temperature
        log_lo, log_up = interval_log_bounds(c, head.scale(c, r, neighbours[None]))
        stats = interval_stats(log_lo.exp(), log_up.exp(), self.feature_top)
        return (c, stats[..., -1], torch.cat([out.hidden[:1], stats], dim=-1), torch.stack(cache.new_k),
                torch.stack(cache.new_v))


def compare_u(models, prompts: int, tau: float, seed: int = 0) -> dict:
    """U of both formulas in float32 against U in float64, on the device's processed boxes over cloud-drawn
    images of held-out prompts."""
    from ciar.models.generate import generate
    from ciar.models.interval import interfuse
    from ciar.training.scenes import heldout_prompts
    from ciar.training.stages import device_box

    s = models.sampling
    cond = models.encode_prompts(heldout_prompts(prompts))
    with torch.inference_mode():
        tokens = generate(models.cloud, cond, s, torch.Generator().manual_seed(seed))
        c, r, _ = device_box(models.device, cond, tokens, s.cfg_scale, s.temperature)
        reference = interfuse(c.double(), r.double()).u.flatten().numpy()
        us = {"shipped": interfuse(c, r).u, "log_space": log_space_u(c, r)}
    near = (reference > tau / 10) & (reference < tau * 10)  # where a rounding could move a gate decision
    result: dict = {"positions": int(reference.size), "tau": tau, "near_tau_positions": int(near.sum())}
    for name, u in us.items():
        u = u.double().flatten().numpy()
        rel = np.abs(u - reference) / np.maximum(reference, 1e-30)
        result[name] = {"rel_err_p50": float(np.median(rel)), "rel_err_p99": float(np.quantile(rel, 0.99)),
                        "rel_err_max": float(rel.max()), "near_tau_rel_err_max": float(rel[near].max(initial=0.0)),
                        "sent": float((u >= tau).mean())}
    shipped, log_space = (us[k].flatten().numpy() for k in ("shipped", "log_space"))
    result["gate_agreement"] = float(((shipped >= tau) == (log_space >= tau)).mean())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_arguments(p)
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts for the U comparison (default 16)")
    args = p.parse_args(argv)
    if min(args.prompts, args.rounds, args.calls) < 1:
        p.error("--prompts, --rounds and --calls must be at least 1")
    from ciar.cli.bench import write_result
    from ciar.models.builtin import load_builtin
    from ciar.runtime.bundle import BundleError
    from ciar.runtime.cli import tau_for
    try:
        b = int8_onnx_bundle(args.bundle)
    except BundleError as e:
        raise SystemExit(f"interval_bounds.py: {e}") from None
    models = load_builtin(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        log_space = export_variant(LogBoundsGraph(models.device), Path(tmp))
        timing = side_by_side(b, "log_space", log_space, args.threads, args.rounds, args.calls,
                              "shipped_over_log_space")
    result = {"bundle": str(args.bundle), "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
              **timing, "u": compare_u(models, args.prompts, tau_for(b, None, 0.3)),
              "environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = sys.stderr if args.json == "-" else sys.stdout
    for name, us in result["step_us"].items():
        print(f"{name:>9}: {us:7.1f} us per decode step ({result['nodes'][name]} nodes)", file=out)
    u = result["u"]
    print(f"log space / shipped: {1 / result['shipped_over_log_space']:.2f}x; U against float64, near tau (max "
          f"relative error): shipped {u['shipped']['near_tau_rel_err_max']:.1e}, log space "
          f"{u['log_space']['near_tau_rel_err_max']:.1e}; gate agreement {u['gate_agreement']:.4f} at tau "
          f"{u['tau']:.3g} over {u['positions']} positions", file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
