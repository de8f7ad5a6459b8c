"""`ciar generate`: one image from a caption with the built-in model (cloud or device alone)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="a large red circle at the top left and a small blue square in the centre, "
                                       "on a white background", help="the caption")
    p.add_argument("--mode", choices=["cloud", "device"], default="cloud", help="which model draws (default cloud)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): same seed, same image")
    p.add_argument("--out", type=Path, default=Path("image.png"), help="output PNG (default image.png)")
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the 64x64 image (default 4)")
    p.add_argument("--checkpoint", type=Path, default=None, help="built-in weights directory (default: shipped)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ciar.models.builtin import load_builtin
    from ciar.training.evaluate import generate_images

    models = load_builtin(args.checkpoint)
    image = generate_images(models, [args.prompt], args.mode, args.seed)[0]
    image = np.repeat(np.repeat(image, args.scale, 0), args.scale, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(args.out)
    print(f"wrote {args.out}")
    return 0
