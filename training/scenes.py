"""Procedurally generated captioned scenes: the data the project's own text-to-image models are trained on.

A scene is 1-3 flat-coloured shapes on a plain background, each shape alone in one cell of a 3x3 grid over a
64x64 image. Shapes are drawn with hard edges (no antialiasing) and a margin of at least 2 pixels inside their
cell, so they never overlap, touch or leave their cell. Captions come from several templates, fully determine
the scene, and `parse_caption` inverts every one of them.

Held-out split: a scene is held out iff a stable hash (blake2b) of its canonical key (`Scene.key`: background
plus the shapes in cell order) is 0 modulo HELDOUT_MODULUS. Membership is a pure function of the scene, so the
check is O(1), needs no stored set, and holds for any number of held-out prompts; hashing (rather than holding
out one drawn sample) also keeps the small space of one-shape scenes from being drained. `SceneStream` rejects
held-out scenes; `heldout_prompts` keeps only them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np

from ciar.models.text import PAD_ID, UNK_ID, tokenize  # noqa: F401 - re-exported
from ciar.models.text import encode_caption as _encode_caption

IMAGE_SIZE = 64
MAX_SHAPES = 3
KINDS = ("circle", "square", "triangle", "diamond")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 130, 20),
    "purple": (120, 40, 170),
    "cyan": (30, 200, 210),
    "magenta": (230, 40, 190),
}
COLOURS = tuple(COLOUR_RGB)
# RGB (Euclidean) distances: shape colours >= 90 apart, every background >= 115 from every shape colour,
# backgrounds >= 55 from each other
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (150, 150, 150),
    "pale blue": (190, 215, 250),
    "pale green": (200, 240, 200),
    "pale pink": (250, 205, 215),
}
BACKGROUNDS = tuple(BACKGROUND_RGB)
SIZES = ("small", "large")
SHAPE_SIDE = {"small": 11, "large": 17}  # bounding-box side in pixels
# row-major 3x3 grid; a name is "<vertical> <horizontal>", either part dropped when central
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
CELL_EDGES = (0, 21, 43, 64)  # pixel boundaries of the grid rows / columns (cells are 21 or 22 pixels wide)
HELDOUT_MODULUS = 16  # 1/16 of all scenes are held out
HELDOUT_SEED = 20_240_917


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: str

    def __post_init__(self) -> None:
        _check(self.kind, KINDS, "kind")
        _check(self.colour, COLOURS, "colour")
        _check(self.size, SIZES, "size")
        _check(self.cell, CELLS, "cell")


@dataclass(frozen=True)
class Scene:
    """Shapes (at most one per cell; stored in CELLS order, so equality ignores the order given) on a background."""
    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self) -> None:
        _check(self.background, BACKGROUNDS, "background")
        cells = [s.cell for s in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes in one cell: {cells}")
        object.__setattr__(self, "shapes", tuple(sorted(self.shapes, key=lambda s: CELLS.index(s.cell))))

    @property
    def key(self) -> str:
        """Canonical text key, e.g. 'white|top left:large:red:circle|centre:small:blue:triangle'."""
        return "|".join([self.background] + [f"{s.cell}:{s.size}:{s.colour}:{s.kind}" for s in self.shapes])


class Sample(NamedTuple):
    image: np.ndarray  # uint8 (64, 64, 3)
    caption: str
    scene: Scene


# ---------------------------------------------------------------------------------------------------- rendering

def shape_mask(kind: str, size: str) -> np.ndarray:
    """Boolean (side, side) mask of a shape, sampled at pixel centres. Triangles point up, base on the bottom row."""
    _check(kind, KINDS, "kind")
    _check(size, SIZES, "size")
    side = SHAPE_SIDE[size]
    t = (np.arange(side) + 0.5) / side * 2 - 1  # pixel centres in (-1, 1)
    v, u = np.meshgrid(t, t, indexing="ij")  # v: down, u: right
    if kind == "circle":
        return u * u + v * v <= 1
    if kind == "square":
        return np.ones((side, side), dtype=bool)
    if kind == "triangle":
        return np.abs(u) <= (v + 1) / 2
    return np.abs(u) + np.abs(v) <= 1


_MASKS = {(k, z): shape_mask(k, z)[..., None] for k in KINDS for z in SIZES}  # (side, side, 1)
_SHAPE_PIXEL = {name: np.array(rgb, dtype=np.uint8) for name, rgb in COLOUR_RGB.items()}
_CANVAS = {name: np.tile(np.array(rgb, dtype=np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 1))
           for name, rgb in BACKGROUND_RGB.items()}


def cell_box(cell: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) pixel bounds of a grid cell, end-exclusive."""
    row, col = divmod(CELLS.index(cell), 3)
    return CELL_EDGES[row], CELL_EDGES[row + 1], CELL_EDGES[col], CELL_EDGES[col + 1]


def shape_origin(shape: Shape) -> tuple[int, int]:
    """Top-left pixel of the shape's bounding box: centred in its cell."""
    y0, y1, x0, x1 = cell_box(shape.cell)
    side = SHAPE_SIDE[shape.size]
    return y0 + (y1 - y0 - side) // 2, x0 + (x1 - x0 - side) // 2


def render(scene: Scene) -> np.ndarray:
    """uint8 (64, 64, 3) image of the scene: flat colours, hard edges, deterministic."""
    img = _CANVAS[scene.background].copy()
    for s in scene.shapes:
        mask = _MASKS[s.kind, s.size]
        oy, ox = shape_origin(s)
        np.copyto(img[oy:oy + mask.shape[0], ox:ox + mask.shape[1]], _SHAPE_PIXEL[s.colour], where=mask)
    return img


# ----------------------------------------------------------------------------------------------------- sampling

def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene: 1-3 shapes in distinct cells, every attribute uniform (held-out ones included)."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = rng.permutation(len(CELLS))[:n]
    attrs = (rng.random((n, 3)) * (len(KINDS), len(COLOURS), len(SIZES))).astype(int)  # kind, colour, size
    shapes = tuple(Shape(KINDS[k], COLOURS[c], SIZES[z], CELLS[cell]) for cell, (k, c, z) in zip(cells, attrs))
    return Scene(shapes, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def is_heldout(scene: Scene) -> bool:
    """Whether the scene belongs to the held-out evaluation split (see the module docstring)."""
    digest = hashlib.blake2b(scene.key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_MODULUS == 0


def sample_training_scene(rng: np.random.Generator) -> Scene:
    """A random scene outside the held-out split (rejection sampling)."""
    while True:
        scene = sample_scene(rng)
        if not is_heldout(scene):
            return scene


# ----------------------------------------------------------------------------------------------------- captions

_CELL_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "at the top centre"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "at the left"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom centre"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
_SHAPE_FORMS = (
    "a {size} {colour} {kind} {where}",
    "{where} there is a {size} {colour} {kind}",
    "a {size} {kind} in {colour} {where}",
)
_SCENE_TEMPLATES = (
    "{shapes}, on a {background} background",
    "on a {background} background: {shapes}",
    "{count} on a {background} background: {shapes}",
    "a {background} background with {shapes}",
    "{shapes} against a {background} background",
)
N_TEMPLATES = len(_SCENE_TEMPLATES)
_COUNT_PHRASES = ("one shape", "two shapes", "three shapes")


def _shape_phrase(shape: Shape, rng: np.random.Generator) -> str:
    form = _SHAPE_FORMS[int(rng.integers(len(_SHAPE_FORMS)))]
    phrases = _CELL_PHRASES[shape.cell]
    where = phrases[int(rng.integers(len(phrases)))]
    return form.format(size=shape.size, colour=shape.colour, kind=shape.kind, where=where)


def caption(scene: Scene, rng: np.random.Generator, template: int | None = None) -> str:
    """A caption that fully determines the scene; template (0..N_TEMPLATES-1) and wording are drawn from rng
    unless `template` is given. Shapes are listed in random order."""
    if not scene.shapes:
        raise ValueError("a caption needs at least one shape")
    if template is None:
        template = int(rng.integers(N_TEMPLATES))
    parts = [_shape_phrase(scene.shapes[i], rng) for i in rng.permutation(len(scene.shapes))]
    shapes = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return _SCENE_TEMPLATES[template].format(shapes=shapes, background=scene.background,
                                             count=_COUNT_PHRASES[len(parts) - 1])


# ---------------------------------------------------------------------------------------------------- tokenizer

_FILLER_WORDS = ("a", "the", "on", "at", "in", "there", "is", "with", "against", "background", "corner",
                 "shape", "shapes", ",", ":", "and")
_COUNT_WORDS = {"one": 1, "two": 2, "three": 3}
_VERTICAL, _HORIZONTAL, _CENTRAL = ("top", "bottom"), ("left", "right"), ("centre", "middle")
# index 0 = padding, 1 = unknown word; the rest is every word any template can produce, in a fixed order
CAPTION_VOCAB: tuple[str, ...] = ("<pad>", "<unk>") + tuple(dict.fromkeys(
    _FILLER_WORDS + tuple(_COUNT_WORDS) + SIZES + COLOURS + KINDS + _VERTICAL + _HORIZONTAL + _CENTRAL
    + tuple(w for name in BACKGROUNDS for w in tokenize(name))))
_WORD_ID = {w: i for i, w in enumerate(CAPTION_VOCAB)}
# longest possible caption: 8 (count template + two-word background) + 3 x 11 (longest shape phrase) + 2 = 43
MAX_CAPTION_TOKENS = 48


def encode_caption(text: str, max_len: int = MAX_CAPTION_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """The caption's word ids and mask in this vocabulary (the rule: `ciar.models.text.encode_caption`)."""
    return _encode_caption(text, _WORD_ID, max_len)


# -------------------------------------------------------------------------------------------------- caption parse

def _take_background(words: list[str]) -> tuple[str, list[str]]:
    """The background named right before the single word 'background', and the words without that phrase."""
    if words.count("background") != 1:
        raise ValueError("a caption names exactly one background")
    i = words.index("background")
    for name in sorted(BACKGROUNDS, key=lambda b: -len(b.split())):
        n = len(name.split())
        if words[max(i - n, 0):i] == name.split():
            return name, words[:i - n] + words[i + 1:]
    raise ValueError(f"unknown background before 'background': {words[:i]}")


def _clauses(words: list[str]) -> list[list[str]]:
    """Split at ',', ':' and 'and': every shape phrase is exactly one clause."""
    out: list[list[str]] = [[]]
    for w in words:
        if w in (",", ":", "and"):
            out.append([])
        else:
            out[-1].append(w)
    return out


def _parse_clause(words: list[str]) -> Shape | None:
    """The shape a clause describes, or None for a clause of filler words only."""
    found: dict[str, list[str]] = {"kind": [], "colour": [], "size": [], "vertical": [], "horizontal": []}
    central = False
    for w in words:
        if w in KINDS:
            found["kind"].append(w)
        elif w in COLOURS:
            found["colour"].append(w)
        elif w in SIZES:
            found["size"].append(w)
        elif w in _VERTICAL:
            found["vertical"].append(w)
        elif w in _HORIZONTAL:
            found["horizontal"].append(w)
        elif w in _CENTRAL:
            central = True
        elif w not in _FILLER_WORDS and w not in _COUNT_WORDS:
            raise ValueError(f"unexpected word {w!r} in caption")
    if not central and not any(found.values()):
        return None
    text = " ".join(words)
    for what in ("kind", "colour", "size"):
        if len(found[what]) != 1:
            raise ValueError(f"shape phrase {text!r} must name exactly one {what}")
    if len(found["vertical"]) > 1 or len(found["horizontal"]) > 1:
        raise ValueError(f"shape phrase {text!r} names two positions")
    if not (central or found["vertical"] or found["horizontal"]):
        raise ValueError(f"shape phrase {text!r} names no position")
    cell = " ".join(found["vertical"] + found["horizontal"]) or "centre"
    return Shape(found["kind"][0], found["colour"][0], found["size"][0], cell)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (inverse of `caption` for every template); ValueError if malformed."""
    background, words = _take_background(tokenize(text))
    shapes = tuple(s for s in map(_parse_clause, _clauses(words)) if s is not None)
    if not shapes:
        raise ValueError(f"caption names no shape: {text!r}")
    counts = [_COUNT_WORDS[w] for w in words if w in _COUNT_WORDS]
    if counts and counts != [len(shapes)]:
        raise ValueError(f"caption announces {counts} shapes but describes {len(shapes)}: {text!r}")
    return Scene(shapes, background)


# ------------------------------------------------------------------------------------------------------ streams

class SceneStream:
    """Endless stream of training samples (never a held-out scene), a pure function of the seed. Iteration and
    `batch` draw from one shared generator: together they walk a single fixed sequence of samples."""

    def __init__(self, seed: int | Sequence[int] = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def __iter__(self) -> SceneStream:
        return self

    def __next__(self) -> Sample:
        scene = sample_training_scene(self._rng)
        return Sample(render(scene), caption(scene, self._rng), scene)

    def batch(self, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """The next n samples as (images uint8 (n, 64, 64, 3), captions, scenes)."""
        images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        captions, scenes = [], []
        for i in range(n):
            images[i], text, scene = next(self)
            captions.append(text)
            scenes.append(scene)
        return images, captions, scenes


@lru_cache(maxsize=4)
def _heldout_prompts(n: int) -> tuple[str, ...]:
    rng = np.random.default_rng(HELDOUT_SEED)
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < n:
        scene = sample_scene(rng)
        if is_heldout(scene) and scene.key not in seen:
            seen.add(scene.key)
            prompts.append(caption(scene, rng))
    return tuple(prompts)


def sampled_heldout_prompts(n: int, seed: int) -> list[str]:
    """n captions of held-out scenes drawn independently from `seed` (a scene may repeat): prompts as a user of the
    scene distribution would write them, for calibrating what a setting spends. `heldout_prompts` keeps each scene
    once, so the further down its list, the fewer one-shape scenes are left (shapes per prompt: 1.66 in its first
    100, 1.95 in 801-1000; independent draws: 1.65)."""
    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        scene = sample_scene(rng)
        if is_heldout(scene):
            prompts.append(caption(scene, rng))
    return prompts


def heldout_prompts(n: int = 1000) -> list[str]:
    """The fixed held-out evaluation prompts: n captions of n distinct held-out scenes, from a fixed seed.
    A shorter list is a prefix of a longer one."""
    return list(_heldout_prompts(n))
