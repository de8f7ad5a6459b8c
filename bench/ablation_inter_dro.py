"""Ablation of the Inter-DRO terms (MODEL_CARD.md): anchor only; + align; + DRO reweighting (the paper's loss);
and our additions (training/inter_dro.py says why): + coverage, + width, + rank (the shipped device since v3.1 is
anchor+align+rank).

Retrains the device model of a finished `ciar train builtin` run with each loss variant (same data, seed and
steps as the shipped one) and measures, on held-out prompts, the gate AUROC of U / entropy / max-prob and the
device-only adherence. Writes one JSON file.

    python bench/ablation_inter_dro.py --run runs/builtin --prompts 100 --json docs/results/ablation.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ciar.models.builtin import load_builtin
from ciar.training import stages
from ciar.training.builtin import CONFIG_DIR, load_stage_configs
from ciar.training.inter_dro import InterDROConfig
from ciar.training.evaluate import gate_auroc, generate_images, quality
from ciar.training.features import load_feature_net
from ciar.training.scenes import heldout_prompts

# Each variant names every term it uses: every term beyond the anchors is off unless named, so a variant means the
# same loss whatever the shipped device config turns on (the lambda_* weights come from that config).
_ANCHORS_ONLY = {"use_align": False, "use_dro": False, "lambda_cov": 0.0, "lambda_width": 0.0, "lambda_rank": 0.0}
VARIANTS = {name: {**_ANCHORS_ONLY, **terms} for name, terms in {
    "anchor": {},
    "anchor+align": {"use_align": True},
    "anchor+align+dro": {"use_align": True, "use_dro": True},
    "anchor+align+dro+coverage": {"use_align": True, "use_dro": True, "lambda_cov": 3.0},
    "anchor+align+width": {"use_align": True, "lambda_width": 1.0},
    "anchor+align+width0.2": {"use_align": True, "lambda_width": 0.2},
    "anchor+align+rank": {"use_align": True, "lambda_rank": 1.0},  # the shipped device since v3.1
    "anchor+align+rank3": {"use_align": True, "lambda_rank": 3.0},
    "anchor+align+width+rank": {"use_align": True, "lambda_width": 1.0, "lambda_rank": 1.0},
    "anchor+align+rank+mlp": {"use_align": True, "lambda_rank": 1.0},
}.items()}
# variants that also change the device model (not only its loss): the radius head's hidden MLP width
ARCHITECTURE = {"anchor+align+rank+mlp": {"radius_hidden": 256}}


def _run_device_config(run: Path) -> tuple[InterDROConfig, int] | None:
    """The loss and steps the run's own device stage was trained with (its configs.json), if it finished."""
    configs, ckpt = run / "configs.json", run / "device.ckpt.pt"
    if not (configs.exists() and ckpt.exists()):
        return None
    device = json.loads(configs.read_text())["device"]
    return InterDROConfig(**device["loss"]), device["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/builtin"), help="a finished built-in training run")
    ap.add_argument("--configs", type=Path, default=None,
                    help="stage configs of the run (default: the shipped ones); the device config is the base")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=None,
                    help="device-stage steps for every variant (default: the device config's); runs get their own "
                         "checkpoint names, so a longer run never resumes a shorter one")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    models = load_builtin(args.run / "weights")
    cfg = load_stage_configs(args.configs or CONFIG_DIR)["device"]
    suffix = ""
    if args.steps is not None and args.steps != cfg["steps"]:
        cfg, suffix = {**cfg, "steps": args.steps}, f"_s{args.steps}"
    prompts = heldout_prompts(max(1000, args.prompts))[: args.prompts]
    cloud = stages.CloudModels(models.text, models.cloud)
    run_device = _run_device_config(args.run)
    results = {}
    for name in args.variants:
        t0 = time.perf_counter()
        variant = {**cfg, **ARCHITECTURE.get(name, {}), "loss": {**cfg["loss"], **VARIANTS[name]}}
        if run_device == (InterDROConfig(**variant["loss"]), variant["steps"]) and name not in ARCHITECTURE:
            device = models.device  # the run's own device was trained this way: reuse it
        else:
            device = stages.train_device(variant, models.vq, cloud, args.run, name=f"ablation_{name}{suffix}")
        m = dataclasses.replace(models, device=device)
        gate = gate_auroc(m, prompts, args.seed)
        q = quality(generate_images(m, prompts, "device", args.seed), prompts, "device",
                    load_feature_net(models.directory))
        results[name + suffix] = {"steps": variant["steps"], "loss": variant["loss"],
                                  "radius_hidden": variant.get("radius_hidden", 0), "gate": gate,
                                  "device_quality": dataclasses.asdict(q),
                                  "seconds": round(time.perf_counter() - t0, 1)}
        print(name + suffix, json.dumps(results[name + suffix]["gate"]["auroc"]), f"adherence={q.adherence:.3f}",
              flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"prompts": args.prompts, "seed": args.seed, "threads": torch.get_num_threads(),
                                     "variants": results}, indent=1))


if __name__ == "__main__":
    main()
