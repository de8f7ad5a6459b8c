"""Pre-training objective of the built-in caption encoder: read the scene layout out of the caption.

LlamaGen's GPT never learns language: its T5 encoder is pre-trained on text and frozen. Trained from scratch
through the image loss alone (built-in v1, v2), our encoder had to learn to parse captions and the GPT to draw
at the same time, from 22,400 images. This stage gives the encoder its own text-only task instead: ten
slots (one per grid cell, in `CELLS` order, then one for the background), each trained to say what its cell
holds (no shape, or kind, colour and size) or which background the caption names. Captions are cheap to make
(no image model runs), so the encoder learns this in 4 minutes; the cloud stage then freezes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scenes import BACKGROUNDS, CELLS, COLOURS, KINDS, SIZES, Scene

LAYOUT_SLOTS = len(CELLS) + 1  # the nine cells, then the background
IGNORE = -100  # colour and size targets of an empty cell


@dataclass(frozen=True)
class LayoutTargets:
    kind: Tensor  # (B, 9) int64: 0 = empty cell, 1 + KINDS index
    colour: Tensor  # (B, 9) int64: COLOURS index, IGNORE where empty
    size: Tensor  # (B, 9) int64: SIZES index, IGNORE where empty
    background: Tensor  # (B,) int64: BACKGROUNDS index

    def as_dict(self) -> dict[str, Tensor]:
        return {"kind": self.kind, "colour": self.colour, "size": self.size, "background": self.background}


def layout_targets(scenes: Sequence[Scene]) -> LayoutTargets:
    n = len(scenes)
    kind = torch.zeros(n, len(CELLS), dtype=torch.long)
    colour = torch.full((n, len(CELLS)), IGNORE, dtype=torch.long)
    size = torch.full((n, len(CELLS)), IGNORE, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for s in scene.shapes:
            c = CELLS.index(s.cell)
            kind[b, c], colour[b, c], size[b, c] = 1 + KINDS.index(s.kind), COLOURS.index(s.colour), SIZES.index(s.size)
    background = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes], dtype=torch.long)
    return LayoutTargets(kind, colour, size, background)


class LayoutHead(nn.Module):
    """Linear read-outs of the encoder's output slots (B, 10, D): one shared head per attribute for the cell slots,
    one for the background slot. Used only for pre-training; it does not ship."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.kind = nn.Linear(dim, 1 + len(KINDS))
        self.colour = nn.Linear(dim, len(COLOURS))
        self.size = nn.Linear(dim, len(SIZES))
        self.background = nn.Linear(dim, len(BACKGROUNDS))

    def forward(self, slots: Tensor) -> dict[str, Tensor]:
        if slots.shape[1] != LAYOUT_SLOTS:
            raise ValueError(f"expected {LAYOUT_SLOTS} caption slots (9 cells + background), got {slots.shape[1]}")
        cells, bg = slots[:, :len(CELLS)], slots[:, len(CELLS)]
        return {"kind": self.kind(cells), "colour": self.colour(cells), "size": self.size(cells),
                "background": self.background(bg)}


def _read_back(logits: dict[str, Tensor], t: LayoutTargets) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Per attribute, the (hit, valid) masks of the argmax read-back (valid: not an empty cell's colour or size),
    and per caption whether its whole layout (every cell and the background) is read back right."""
    masks, whole = {}, torch.ones(t.background.shape[0], dtype=torch.bool)
    for k, target in t.as_dict().items():
        hit, valid = logits[k].argmax(-1) == target, target != IGNORE
        masks[k] = hit, valid
        whole &= (hit | ~valid).reshape(whole.shape[0], -1).all(dim=1)
    return masks, whole


def layout_loss(logits: dict[str, Tensor], t: LayoutTargets) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of the four cross-entropies; parts also hold `exact`, the fraction of captions whose whole layout
    (every cell and the background) is read back right."""
    targets = t.as_dict()
    parts = {k: F.cross_entropy(logits[k].flatten(0, -2), targets[k].flatten(), ignore_index=IGNORE)
             for k in targets}
    with torch.no_grad():
        parts["exact"] = _read_back(logits, t)[1].float().mean()
    return sum(parts[k] for k in targets), parts


@torch.no_grad()
def layout_readback(text: nn.Module, head: LayoutHead, captions: Sequence[str], scenes: Sequence[Scene],
                    batch: int = 256) -> dict[str, float]:
    """Accuracy of reading the layout back from captions: per cell (`kind`: empty or which shape, over all nine
    cells; `colour`, `size`: over occupied cells), `background`, and `exact` (every cell and the background)."""
    from .data import caption_batch
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions but {len(scenes)} scenes")
    right = {"kind": 0, "colour": 0, "size": 0, "background": 0, "exact": 0}
    count = dict.fromkeys(right, 0)
    for i in range(0, len(captions), batch):
        masks, whole = _read_back(head(text(*caption_batch(list(captions[i:i + batch])))),
                                  layout_targets(scenes[i:i + batch]))
        for k, (hit, valid) in masks.items():
            right[k] += int((hit & valid).sum())
            count[k] += int(valid.sum())
        right["exact"] += int(whole.sum())
        count["exact"] += whole.shape[0]
    return {k: right[k] / max(count[k], 1) for k in right}
