"""Plot the loss curves of a `ciar train builtin` run (one panel per stage) to a PNG.

    python bench/loss_curves.py --run runs/builtin --out docs/results/loss_curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ciar.training.builtin import STAGES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/builtin"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--extra", nargs="*", default=[], help="extra log names to overlay on the device panel")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 3.2))
    for ax, stage in zip(axes, STAGES):
        for name in [stage] + (args.extra if stage == "device" else []):
            path = args.run / f"{name}.log.jsonl"
            if not path.exists():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
        ax.set(title=stage, xlabel="step", ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
