"""`ciar eval`: quality of the built-in model (cloud or device alone) on held-out prompts, and the gate AUROC."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=["quality", "gate"], default="quality",
                   help="quality (default): adherence, FD, precision/recall/F1; gate: AUROC of U, entropy, maxprob")
    p.add_argument("--mode", choices=["cloud", "device", "vq"], default="cloud",
                   help="which model generates (quality); vq: the VQ's reconstructions of the real renders, the "
                        "ceiling of any generator")
    p.add_argument("--prompts", type=int, default=100, help="number of held-out prompts (default 100)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a built-in weights directory (default: the shipped weights)")
    p.add_argument("--cfg-scale", type=float, default=None, help="override the default CFG scale")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--bootstrap", type=int, default=0,
                   help="gate: also resample the prompts N times (paired) for 95%% intervals of U's AUROC minus each "
                        "other score's (default 0: off; 1000 takes about a minute on 300 prompts)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ciar.models.builtin import load_builtin
    from ciar.training.evaluate import gate_auroc, generate_images, quality
    from ciar.training.features import load_feature_net
    from ciar.training.scenes import heldout_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bootstrap < 0 or (args.bootstrap and args.what != "gate"):
        raise SystemExit("ciar eval: --bootstrap takes N >= 0 and applies to `ciar eval gate` only")
    models = load_builtin(args.checkpoint)
    if args.cfg_scale is not None:
        models.sampling = dataclasses.replace(models.sampling, cfg_scale=args.cfg_scale)
    prompts = heldout_prompts(max(args.prompts, 1000))[: args.prompts]
    if args.what == "gate":
        result = gate_auroc(models, prompts, args.seed, bootstrap=args.bootstrap)
    else:
        with tqdm(total=len(prompts), desc=f"generating ({args.mode})", file=sys.stderr, disable=args.json) as bar:
            images = generate_images(models, prompts, args.mode, args.seed, progress=bar.update)
        result = dataclasses.asdict(quality(images, prompts, args.mode, load_feature_net(models.directory)))
    result["cfg_scale"] = models.sampling.cfg_scale
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0
