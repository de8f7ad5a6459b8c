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


def _has_rows(path: Path) -> bool:
    return path.exists() and bool(path.read_text().strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/builtin"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--extra", nargs="*", default=[], help="extra log names to overlay on the device panel")
    ap.add_argument("--stages", nargs="*", choices=STAGES, default=None,
                    help="stages to plot (default: every stage whose log has rows; a run that reused earlier "
                         "stages' checkpoints has empty logs for them)")
    args = ap.parse_args()
    stages = args.stages or [s for s in STAGES if _has_rows(args.run / f"{s}.log.jsonl")]
    if not stages:
        raise SystemExit(f"no stage logs with rows under {args.run}: pass the directory of a `ciar train builtin` run")
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
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
