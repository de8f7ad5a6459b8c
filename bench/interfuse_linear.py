"""Would the InterFuse bounds in fewer ops make the device step cheaper, and would the gate notice?

`models.interval` computes the bounds in log space (two leave-one-out log-sum-exps, two log-add-exps: about 50 ONNX
ops over the vocabulary, `bench/head_cost.py` puts the Inter-Head at half the step). The same bounds in linear
space, in float64,

    p_lo_i = e^(lo_i) / (e^(lo_i) + S_up - e^(up_i)),    p_up_i = e^(up_i) / (e^(up_i) + S_lo - e^(lo_i))

with lo, up shifted by max(up) (so e^(up_i) <= 1) take a dozen: S - e_i loses at most float64's 1e-16 of S,
which only matters for the largest entry, whose bound is then ~1 either way. This script (an experiment: the
shipped model keeps its log-space bounds) exports the shipped graph with the linear bounds, int8 as shipped, and
times both decode steps side by side (`head_cost.side_by_side`), then compares U of the two formulas on the
device's boxes over cloud-drawn images of held-out prompts (PyTorch, float32 boxes as the graph has them): the
relative difference and the share of positions the gate decides alike at the bundle's calibrated tau.

    python bench/interfuse_linear.py --json docs/results/interfuse_linear.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from head_cost import add_timing_arguments, export_variant, int8_onnx_bundle, side_by_side  # noqa: E402

from ciar.export import onnx_export as ox  # noqa: E402
from ciar.export.graph import DeviceGraph  # noqa: E402
from ciar.models.interval import cfg_combine_interval, interval_stats, u_score  # noqa: E402
from ciar.models.sampling import draw_table  # noqa: E402
from ciar.runtime.cli import environment  # noqa: E402


def linear_bounds(centre, radius):
    """(p_lo, p_up) float64 of the box [centre - radius, centre + radius], in linear space."""
    shift = (centre + radius).amax(dim=-1, keepdim=True)
    e_lo, e_up = (centre - radius - shift).double().exp(), (centre + radius - shift).double().exp()
    s_lo, s_up = e_lo.sum(-1, keepdim=True), e_up.sum(-1, keepdim=True)
    return e_lo / (e_lo + s_up - e_up), e_up / (e_up + s_lo - e_lo)


class LinearBoundsGraph(DeviceGraph):
    """The shipped `DeviceGraph` with `linear_bounds` in place of `interfuse` (same outputs, draw table included)."""

    def forward(self, embeds, input_pos, neighbours, k_cache, v_cache, cfg_scale, temperature):
        out, cache = self.backbone(embeds, input_pos, k_cache, v_cache)
        d = self.device
        c, r = cfg_combine_interval(out.logits, d.inter_head(out.hidden), cfg_scale)
        c, r = c / temperature, r / temperature
        p_lo, p_up = linear_bounds(c, d.inter_head.scale(c, r, neighbours[None]))
        stats = interval_stats(p_lo, p_up, self.feature_top).float()
        return (c, u_score(p_lo, p_up)[0].float(), torch.cat([out.hidden[:1], stats], dim=-1),
                torch.stack(cache.new_k), torch.stack(cache.new_v), draw_table(c))


def compare_u(models, prompts: int, tau: float, seed: int = 0) -> dict:
    """U of both formulas on the device's processed boxes over cloud-drawn images of held-out prompts."""
    from ciar.models.generate import generate
    from ciar.models.interval import interfuse, neighbour_ids
    from ciar.training.scenes import heldout_prompts

    d, s = models.device, models.sampling
    cond = models.encode_prompts(heldout_prompts(prompts))
    with torch.inference_mode():
        tokens = generate(models.cloud, cond, s, torch.Generator().manual_seed(seed))
        out = d.forward_interval(cond=d.cfg_condition(cond), tokens=tokens[:, :-1].repeat(2, 1))
        P = d.config.cls_token_num  # the outputs from the prefix's last position on predict the image's tokens
        c, r = d.processed_box(out.centre[:, P - 1:], out.radius[:, P - 1:], neighbour_ids(tokens, d.config.grid_size),
                               s.cfg_scale, s.temperature)
        u_log = interfuse(c, r).u.double().flatten().numpy()
        u_lin = u_score(*linear_bounds(c, r))[0].float().double().flatten().numpy()
    rel = np.abs(u_lin - u_log) / np.maximum(np.abs(u_log), 1e-30)
    return {"positions": int(u_log.size), "tau": tau, "u_rel_diff_p50": float(np.median(rel)),
            "u_rel_diff_p99": float(np.quantile(rel, 0.99)), "u_rel_diff_max": float(rel.max()),
            "gate_agreement": float(((u_log >= tau) == (u_lin >= tau)).mean()),
            "sent_log": float((u_log >= tau).mean()), "sent_linear": float((u_lin >= tau).mean())}


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
        raise SystemExit(f"interfuse_linear.py: {e}") from None
    models = load_builtin(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        linear = export_variant(LinearBoundsGraph(models.device), ox.DEVICE_OUTPUTS, Path(tmp))
        timing = side_by_side(b, "linear", linear, args.threads, args.rounds, args.calls, "shipped_over_linear")
    result = {"bundle": str(args.bundle), "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
              **timing, "u": compare_u(models, args.prompts, tau_for(b, None, 0.3)),
              "environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = sys.stderr if args.json == "-" else sys.stdout
    for name, us in result["step_us"].items():
        print(f"{name:>8}: {us:7.1f} us per decode step ({result['nodes'][name]} nodes)", file=out)
    u = result["u"]
    print(f"shipped / linear: {result['shipped_over_linear']:.2f}x; U relative difference p50 {u['u_rel_diff_p50']:.1e}"
          f", p99 {u['u_rel_diff_p99']:.1e}, max {u['u_rel_diff_max']:.1e}; gate agreement {u['gate_agreement']:.4f} "
          f"at tau {u['tau']:.3g} over {u['positions']} positions", file=out)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
