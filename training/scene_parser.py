"""Analytic scene parser: reads a Scene back from a 64x64 image, real or generated, and scores prompt adherence.

Robust to what a VQ decoder does to flat scenes (slightly wrong colours, ragged edges, small specks):
  * background: the palette background nearest to most pixels;
  * every pixel is labelled with its nearest colour among the shape colours and that background; the
    non-background pixels form 8-connected components, and components under MIN_AREA pixels (specks) are dropped;
  * components are grouped by the grid cell of their centroid (pieces of one broken shape merge again);
  * per cell: colour = the majority label; kind and size = those of the renderer's ideal mask that, placed with
    its centroid on the shape's centroid, overlaps the shape best (intersection over union). Unlike bounding-box
    fill ratios, this is barely moved by a speck touching a shape or a ragged pixel on its edge.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

import numpy as np

from .scenes import (BACKGROUND_RGB, BACKGROUNDS, CELL_EDGES, CELLS, COLOUR_RGB, COLOURS, IMAGE_SIZE, KINDS, SIZES,
                     Scene, Shape, parse_caption, shape_mask)

MIN_AREA = 20  # pixels; the smallest shape (small diamond / triangle) has 61
_SHAPE_RGB = np.array(list(COLOUR_RGB.values()), dtype=np.float64)
_BACKGROUND_RGB = np.array(list(BACKGROUND_RGB.values()), dtype=np.float64)


class _Template(NamedTuple):
    kind: str
    size: str
    mask: np.ndarray
    centroid: tuple[float, float]


def _template(kind: str, size: str) -> _Template:
    mask = shape_mask(kind, size)
    ys, xs = np.nonzero(mask)
    return _Template(kind, size, mask, (float(ys.mean()), float(xs.mean())))


_TEMPLATES = [_template(k, z) for k in KINDS for z in SIZES]
_PAD = max(t.mask.shape[0] for t in _TEMPLATES)  # room to place any template around any centroid


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (RGB Euclidean) for each pixel of float (n, 3)."""
    return ((palette ** 2).sum(1) - 2 * pixels @ palette.T).argmin(1)


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean (h, w) mask, each labelled by its smallest flat pixel index
    (-1 off the mask): min-label propagation with pointer jumping."""
    h, w = mask.shape
    off = h * w
    labels = np.where(mask, np.arange(off).reshape(h, w), off)
    while True:
        padded = np.pad(labels, 1, constant_values=off)
        new = np.min([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
        new = np.where(mask, new, off)
        new = np.append(new.ravel(), off)[new]  # jump: adopt the label of the pixel named by the label
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def _cell_at(y: float, x: float) -> str:
    """Grid cell containing the pixel-centre coordinate (y, x)."""
    return CELLS[3 * bisect_right(CELL_EDGES[1:-1], y) + bisect_right(CELL_EDGES[1:-1], x)]


def _iou(padded: np.ndarray, area: int, centroid: tuple[float, float], t: _Template) -> float:
    """IoU of a shape (its mask padded by _PAD, its area and centroid) with a template on the same centroid."""
    oy, ox = round(centroid[0] - t.centroid[0]) + _PAD, round(centroid[1] - t.centroid[1]) + _PAD
    inter = int((padded[oy:oy + t.mask.shape[0], ox:ox + t.mask.shape[1]] & t.mask).sum())
    return inter / (area + int(t.mask.sum()) - inter)


def _read_shape(mask: np.ndarray, labels: np.ndarray, cell: str) -> Shape:
    """The shape occupying `mask` (its pixels' colour labels in `labels`)."""
    ys, xs = np.nonzero(mask)
    padded = np.pad(mask, _PAD)
    centroid = (float(ys.mean()), float(xs.mean()))
    best = max(_TEMPLATES, key=lambda t: _iou(padded, len(ys), centroid, t))
    colour = COLOURS[int(np.bincount(labels[mask], minlength=len(COLOURS)).argmax())]
    return Shape(best.kind, colour, best.size, cell)


def parse_image(img: np.ndarray) -> Scene:
    """The scene in a uint8 (64, 64, 3) image (see the module docstring for how)."""
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) image, got {img.shape}")
    h, w, _ = img.shape
    pixels = img.reshape(-1, 3).astype(np.float64)
    background = int(np.bincount(_nearest(pixels, _BACKGROUND_RGB), minlength=len(BACKGROUNDS)).argmax())
    palette = np.vstack([_SHAPE_RGB, _BACKGROUND_RGB[background]])  # label len(COLOURS) = background
    labels = _nearest(pixels, palette).reshape(h, w)
    components = _components(labels < len(COLOURS))
    ids, areas = np.unique(components[components >= 0], return_counts=True)
    by_cell: dict[str, np.ndarray] = {}
    for i in ids[areas >= MIN_AREA]:
        mask = components == i
        ys, xs = np.nonzero(mask)
        cell = _cell_at(ys.mean() + 0.5, xs.mean() + 0.5)
        by_cell[cell] = by_cell[cell] | mask if cell in by_cell else mask
    shapes = tuple(_read_shape(mask, labels, cell) for cell, mask in by_cell.items())
    return Scene(shapes, BACKGROUNDS[background])


def _agreement(a: Shape, b: Shape) -> int:
    return int(a.kind == b.kind) + int(a.colour == b.colour) + int(a.size == b.size)


def adherence(prompt: Scene, parsed: Scene) -> float:
    """Fraction of the prompt's attributes present in the parsed image: the background, and per prompted shape
    its kind, colour, size and cell. A prompted shape is matched to the parsed shape in its cell; failing that,
    to the unclaimed parsed shape (one in no prompted cell) agreeing on most of kind / colour / size, which then
    scores those but not the cell. Each parsed shape left unmatched adds 1 to the denominator: a modest penalty
    for extra shapes (one prompted shape drawn exactly right plus one extra shape scores 5/6)."""
    prompted_cells = {s.cell for s in prompt.shapes}
    in_cell = {s.cell: s for s in parsed.shapes}
    unclaimed = [s for s in parsed.shapes if s.cell not in prompted_cells]
    score = float(prompt.background == parsed.background)
    for want in prompt.shapes:
        if want.cell in in_cell:
            score += 1 + _agreement(want, in_cell[want.cell])
        elif unclaimed:
            best = max(unclaimed, key=lambda s: _agreement(want, s))
            score += _agreement(want, best)
            unclaimed.remove(best)
    return score / (4 * len(prompt.shapes) + 1 + len(unclaimed))


def adherence_batch(prompts: list[str], images: np.ndarray) -> np.ndarray:
    """Adherence (float64 (n,)) of each image (uint8 (n, 64, 64, 3)) to its prompt caption."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    return np.array([adherence(parse_caption(p), parse_image(img)) for p, img in zip(prompts, images)],
                    dtype=np.float64)
