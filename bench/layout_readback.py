"""How well the built-in caption encoder reads the scene layout back from held-out captions (MODEL_CARD.md).

Loads the text stage of a `ciar train builtin` run (the encoder and its pre-training head, which does not ship)
and scores, on held-out prompts never trained on, the fraction of cells whose content (empty, or which shape),
colour and size, and of backgrounds, the head names right, and the fraction of captions read back whole.

    python bench/layout_readback.py --run runs/builtin --prompts 1000 --json docs/results/layout_readback.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ciar.models.text import CaptionEncoder
from ciar.training import stages
from ciar.training.layout import LayoutHead, layout_readback
from ciar.training.scenes import heldout_prompts, parse_caption


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/builtin"), help="a run directory with text.ckpt.pt")
    ap.add_argument("--prompts", type=int, default=1000, help="held-out prompts to score")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args()
    ckpt, configs = args.run / "text.ckpt.pt", args.run / "configs.json"
    for path in (ckpt, configs):
        if not path.exists():
            raise SystemExit(f"{path} not found: point --run at a `ciar train builtin` run past its text stage")
    cfg = json.loads(configs.read_text())["text"]
    text = CaptionEncoder(stages.text_config(cfg))
    head = LayoutHead(text.config.out_dim)
    state = torch.load(ckpt, weights_only=True)
    text.load_state_dict(state["modules"]["text"])
    head.load_state_dict(state["modules"]["layout_head"])
    prompts = heldout_prompts(args.prompts)
    result = {"run": str(args.run), "prompts": len(prompts), "step": int(state["step"]),
              **{k: round(v, 4) for k, v in layout_readback(text.eval(), head.eval(), prompts,
                                                            [parse_caption(p) for p in prompts]).items()}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
