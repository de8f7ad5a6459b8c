"""Procedural scenes (ciar.training.scenes) and the analytic scene parser (ciar.training.scene_parser)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ciar.training.scene_parser import MIN_AREA, adherence, adherence_batch, parse_image
from ciar.training.scenes import (BACKGROUND_RGB, CAPTION_VOCAB, COLOUR_RGB, MAX_CAPTION_TOKENS, N_TEMPLATES,
                                  SHAPE_SIDE, UNK_ID, Scene, SceneStream, Shape, caption, cell_box, encode_caption,
                                  heldout_prompts, is_heldout, parse_caption, render, sample_scene, shape_origin,
                                  tokenize)

N_EVAL = 300  # held-out prompts per adherence test (the full 1000 take a few seconds more)


def scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def corrupt(img: np.ndarray, rng: np.random.Generator, sigma: float = 12.0, specks: int = 5) -> np.ndarray:
    """Per-pixel Gaussian colour noise plus a few random specks (1x1 to 3x3, random colour)."""
    out = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    for _ in range(specks):
        y, x = rng.integers(0, img.shape[0] - 2, size=2)
        side = int(rng.integers(1, 4))
        out[y:y + side, x:x + side] = rng.integers(0, 256, size=3)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def heldout() -> tuple[list[str], np.ndarray]:
    prompts = heldout_prompts(N_EVAL)
    return prompts, np.stack([render(parse_caption(p)) for p in prompts])


# ------------------------------------------------------------------------------------------------- scenes

def test_stream_is_deterministic_from_seed():
    a_img, a_cap, a_sc = SceneStream(seed=(7, 3)).batch(16)
    b_img, b_cap, b_sc = SceneStream(seed=(7, 3)).batch(16)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, c_cap, _ = SceneStream(seed=(7, 4)).batch(16)
    assert c_cap != a_cap and not np.array_equal(c_img, a_img)
    stream = SceneStream(seed=(7, 3))
    samples = [next(stream) for _ in range(16)]  # iteration walks the same sequence as batch
    assert [s.caption for s in samples] == a_cap and np.array_equal(np.stack([s.image for s in samples]), a_img)
    assert SceneStream(5).batch(2)[1] == SceneStream(5).batch(2)[1]  # plain int seeds too


def test_stream_is_endless_and_batch_types():
    stream = SceneStream(0)
    images, captions, scene_list = stream.batch(5)
    assert images.shape == (5, 64, 64, 3) and images.dtype == np.uint8
    assert len(captions) == len(scene_list) == 5 and all(isinstance(s, Scene) for s in scene_list)
    assert all(parse_caption(c) == s for c, s in zip(captions, scene_list))
    for i, sample in zip(range(200), stream):
        assert np.array_equal(sample.image, render(sample.scene))
    assert i == 199


def test_sample_scene_is_deterministic_and_varied():
    assert scenes(1, 50) == scenes(1, 50)
    many = scenes(2, 3000)
    assert {len(s.shapes) for s in many} == {1, 2, 3}
    for attr in ("kind", "colour", "size", "cell"):
        values = {getattr(shape, attr) for s in many for shape in s.shapes}
        assert len(values) == {"kind": 4, "colour": 8, "size": 2, "cell": 9}[attr]
    assert len({s.background for s in many}) == len(BACKGROUND_RGB)


def test_render_size_dtype_and_flat_colours():
    for scene in scenes(3, 100):
        img = render(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert np.array_equal(img, render(scene))
        colours = {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}
        expected = {BACKGROUND_RGB[scene.background]} | {COLOUR_RGB[s.colour] for s in scene.shapes}
        assert colours <= expected  # hard edges: no blended colours


def test_shapes_stay_in_their_cell_and_never_touch():
    for scene in scenes(4, 300):
        full = (render(scene) != BACKGROUND_RGB[scene.background]).any(-1)
        total = 0
        for shape in scene.shapes:
            alone = (render(Scene((shape,), scene.background)) != BACKGROUND_RGB[scene.background]).any(-1)
            y0, y1, x0, x1 = cell_box(shape.cell)
            ys, xs = np.nonzero(alone)
            # at least 2 pixels of margin inside the cell: shapes in neighbouring cells are >= 4 pixels apart
            assert ys.min() >= y0 + 2 and ys.max() <= y1 - 3 and xs.min() >= x0 + 2 and xs.max() <= x1 - 3
            assert ys.max() - ys.min() + 1 == SHAPE_SIDE[shape.size] == xs.max() - xs.min() + 1
            assert (full & alone).sum() == alone.sum()
            total += alone.sum()
        assert full.sum() == total  # nothing else drawn, nothing overlapping


def test_scene_is_canonical_and_validated():
    a = Shape("circle", "red", "small", "top left")
    b = Shape("square", "blue", "large", "centre")
    assert Scene((b, a), "white") == Scene((a, b), "white")
    assert Scene((b, a), "white").key == "white|top left:small:red:circle|centre:large:blue:square"
    with pytest.raises(ValueError):
        Scene((a, Shape("square", "blue", "large", "top left")), "white")
    with pytest.raises(ValueError):
        Shape("hexagon", "red", "small", "top")
    with pytest.raises(ValueError):
        Scene((a,), "purple")
    assert shape_origin(a) == (5, 5) and shape_origin(b) == (23, 23)  # centred in the cell


# ----------------------------------------------------------------------------------------------- captions

def test_every_template_round_trips():
    rng = np.random.default_rng(5)
    for scene in scenes(6, 300):
        for t in range(N_TEMPLATES):
            text = caption(scene, rng, template=t)
            assert parse_caption(text) == scene, text
            assert all(w in CAPTION_VOCAB for w in tokenize(text)), text


def test_captions_vary_and_fit_the_token_budget():
    rng = np.random.default_rng(7)
    three = [s for s in scenes(8, 3000) if len(s.shapes) == 3 and " " in s.background][:200]
    lengths = [len(tokenize(caption(s, rng, template=t))) for s in three for t in range(N_TEMPLATES) for _ in range(5)]
    assert max(lengths) <= MAX_CAPTION_TOKENS
    texts = [caption(s, rng) for s in scenes(9, 200)]
    assert len(set(texts)) == len(texts)
    assert sum(t.startswith("on a") for t in texts) > 10 and sum("background:" in t for t in texts) > 40


@pytest.mark.parametrize("text", [
    "a small red circle at the top left",  # no background
    "a small red circle at the top left, on a white background, on a black background",
    "a small red circle at the top left, on a mauve background",
    "a small red blue circle at the top left, on a white background",
    "a small red circle, on a white background",  # no position
    "a small red circle at the top left and a large green square at the top left, on a white background",
    "two shapes on a white background: a small red circle at the top left",
    "a small red hexagon at the top left, on a white background",
])
def test_parse_caption_rejects_malformed(text: str):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_encode_caption():
    text = "on a pale blue background: a large red circle at the top left"
    ids, mask = encode_caption(text, 20)
    n = len(tokenize(text))
    assert ids.shape == mask.shape == (20,) and ids.dtype == np.int64 and mask.dtype == np.bool_
    assert mask[:n].all() and not mask[n:].any() and (ids[n:] == 0).all() and (ids[:n] > 1).all()
    assert [CAPTION_VOCAB[i] for i in ids[:n]] == tokenize(text)
    assert encode_caption(text, n)[1].all()
    with pytest.raises(ValueError):
        encode_caption(text, n - 1)
    ids, _ = encode_caption("a large zebra", 8)
    assert ids[2] == UNK_ID
    assert CAPTION_VOCAB[:2] == ("<pad>", "<unk>") and len(set(CAPTION_VOCAB)) == len(CAPTION_VOCAB)


# ------------------------------------------------------------------------------------------------ held out

def test_heldout_prompts_are_fixed_distinct_and_never_trained_on():
    prompts = heldout_prompts(1000)
    keys = frozenset(parse_caption(p).key for p in prompts)
    assert len(keys) == 1000 and all(is_heldout(parse_caption(p)) for p in prompts)
    assert heldout_prompts(100) == prompts[:100]
    _, _, trained = SceneStream(seed=0).batch(20_000)
    assert not any(is_heldout(s) for s in trained)
    assert keys.isdisjoint(s.key for s in trained)


# --------------------------------------------------------------------------------------------------- parser

def test_real_renders_adhere(heldout):
    prompts, images = heldout
    scores = adherence_batch(prompts, images)
    assert scores.shape == (N_EVAL,) and scores.mean() >= 0.98


def test_wrong_images_score_low(heldout):
    prompts, images = heldout
    assert adherence_batch(prompts, np.roll(images, 1, axis=0)).mean() < 0.7


def test_noisy_renders_still_adhere(heldout):
    prompts, images = heldout
    rng = np.random.default_rng(11)
    noisy = np.stack([corrupt(img, rng) for img in images])
    assert adherence_batch(prompts, noisy).mean() >= 0.95


def test_parser_ignores_specks_and_merges_broken_shapes():
    scene = Scene((Shape("square", "green", "large", "centre"),), "black")
    img = render(scene)
    img[0:3, 0:3] = COLOUR_RGB["red"]  # a speck (9 pixels < MIN_AREA) in an empty cell
    img[31, 21:43] = BACKGROUND_RGB["black"]  # split the square in two
    assert 9 < MIN_AREA and parse_image(img) == scene
    only_specks = np.tile(np.array(BACKGROUND_RGB["grey"], dtype=np.uint8), (64, 64, 1))
    only_specks[10:13, 50:53] = COLOUR_RGB["blue"]
    assert parse_image(only_specks) == Scene((), "grey")


def test_adherence_scoring():
    a = Shape("circle", "red", "small", "top left")
    b = Shape("square", "blue", "large", "centre")
    prompt = Scene((a, b), "white")
    assert adherence(prompt, prompt) == 1.0
    assert adherence(prompt, Scene((), "black")) == 0.0
    assert adherence(prompt, Scene((a, Shape("square", "blue", "small", "centre")), "white")) == 8 / 9
    moved = Shape("square", "blue", "large", "bottom")  # right shape, wrong cell: 3 of 4 attributes
    assert adherence(prompt, Scene((a, moved), "white")) == 8 / 9
    extra = Shape("diamond", "cyan", "small", "right")  # an extra shape costs one attribute's worth
    assert adherence(prompt, Scene((a, b, extra), "white")) == 9 / 10
    with pytest.raises(ValueError):
        adherence_batch(["a small red circle at the top left, on a white background"], np.zeros((2, 64, 64, 3)))


def test_attribute_breakdown_is_perfect_on_renders_and_finds_what_is_wrong(heldout):
    from ciar.training.evaluate import attribute_accuracy
    prompts, images = heldout
    wanted = [parse_caption(p) for p in prompts]
    exact = attribute_accuracy(wanted, [parse_image(img) for img in images])
    assert min(v for k, v in exact.items() if k != "extra_shapes_per_image") >= 0.98
    assert exact["extra_shapes_per_image"] <= 0.02
    # the same layouts with every shape recoloured: cells and kinds stay right, colours go wrong
    recoloured = []
    for p in prompts:
        scene = parse_caption(p)
        shapes = [dataclasses.replace(s, colour=next(c for c in COLOUR_RGB if c != s.colour and c != scene.background))
                  for s in scene.shapes]
        recoloured.append(render(dataclasses.replace(scene, shapes=tuple(shapes))))
    wrong = attribute_accuracy(wanted, [parse_image(img) for img in recoloured])
    assert wrong["cell"] >= 0.98 and wrong["kind_in_cell"] >= 0.98 and wrong["colour_in_cell"] <= 0.02
