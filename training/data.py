"""Training batches from the scene stream. Step i's batch is a pure function of (seed, i): resumable, reproducible."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .scenes import MAX_CAPTION_TOKENS, SceneStream, encode_caption


def scene_batch(seed: int, step: int, n: int) -> tuple[Tensor, list[str]]:
    """(images (n, 3, 64, 64) float in [-1, 1], captions) for training step `step`."""
    images, captions, _ = SceneStream(seed=(seed, step)).batch(n)
    return images_to_tensor(images), captions


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: Tensor) -> np.ndarray:
    """float (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def caption_batch(captions: list[str], max_tokens: int = MAX_CAPTION_TOKENS) -> tuple[Tensor, Tensor]:
    """(ids (n, max_tokens) int64, mask (n, max_tokens) bool)."""
    pairs = [encode_caption(c, max_tokens) for c in captions]
    ids = torch.from_numpy(np.stack([p[0] for p in pairs])).long()
    mask = torch.from_numpy(np.stack([p[1] for p in pairs])).bool()
    return ids, mask
