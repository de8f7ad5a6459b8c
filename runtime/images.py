"""PNG output: the generated image, and the uncertainty map (which tokens went to the cloud) over it."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(image, scale, 0), scale, 1)


def uncertainty_map(image: np.ndarray, sent: np.ndarray, prefix: np.ndarray, scale: int = 4) -> np.ndarray:
    """The image, dimmed, with every token cell tinted: red = its draft went to the cloud, blue = the cloud wrote
    it (prefix), clear = kept on the device. sent/prefix: (T,) bool over the token grid (row-major)."""
    grid = int(round(np.sqrt(sent.size)))
    cell = image.shape[0] // grid
    big = upscale(image, scale).astype(np.float32) * 0.6 + 255 * 0.4 * 0.5
    tint = np.zeros((grid, grid, 3), np.float32)
    tint[sent.reshape(grid, grid)] = (230, 30, 30)
    tint[prefix.reshape(grid, grid)] = (40, 90, 230)
    mask = (sent | prefix).reshape(grid, grid)
    tint_big = upscale(tint, cell * scale)
    mask_big = upscale(mask, cell * scale)[..., None]
    out = np.where(mask_big, 0.45 * big + 0.55 * tint_big, big)
    out[:: cell * scale, :, :] = 255  # a faint grid: one line per token row / column
    out[:, :: cell * scale, :] = 255
    return out.clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
