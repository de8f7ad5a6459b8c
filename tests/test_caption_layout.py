"""The caption encoder's pre-training objective (`ciar.training.layout`): targets, loss, the read-back metric."""
from __future__ import annotations

import pytest
import torch

from ciar.training.layout import IGNORE, LAYOUT_SLOTS, LayoutHead, layout_loss, layout_targets
from ciar.training.scenes import BACKGROUNDS, CELLS, COLOURS, KINDS, SIZES, Scene, Shape

SCENE = Scene((Shape("triangle", "blue", "small", "centre"), Shape("circle", "red", "large", "top left")), "grey")


def test_targets_name_each_cell_and_the_background():
    t = layout_targets([SCENE])
    tl, centre = CELLS.index("top left"), CELLS.index("centre")
    assert t.kind[0, tl] == 1 + KINDS.index("circle") and t.kind[0, centre] == 1 + KINDS.index("triangle")
    assert t.colour[0, tl] == COLOURS.index("red") and t.size[0, centre] == SIZES.index("small")
    empty = [i for i in range(len(CELLS)) if i not in (tl, centre)]
    assert (t.kind[0, empty] == 0).all() and (t.colour[0, empty] == IGNORE).all() and (t.size[0, empty] == IGNORE).all()
    assert t.background.tolist() == [BACKGROUNDS.index("grey")]


def _one_hot_logits(t) -> dict[str, torch.Tensor]:
    def hot(target, n):
        return torch.nn.functional.one_hot(target.clamp(min=0), n).float() * 20
    return {"kind": hot(t.kind, 1 + len(KINDS)), "colour": hot(t.colour, len(COLOURS)), "size": hot(t.size, len(SIZES)),
            "background": hot(t.background, len(BACKGROUNDS))}


def test_exact_counts_only_fully_right_layouts():
    t = layout_targets([SCENE, SCENE])
    logits = _one_hot_logits(t)
    loss, parts = layout_loss(logits, t)
    assert parts["exact"] == 1.0 and loss < 1e-6
    wrong = {k: v.clone() for k, v in logits.items()}
    wrong["colour"][1, CELLS.index("top left")] = torch.roll(wrong["colour"][1, CELLS.index("top left")], 1)
    _, parts = layout_loss(wrong, t)
    assert parts["exact"] == 0.5 and parts["colour"] > 1
    # an empty cell's colour is ignored: any colour logit there changes nothing
    ignored = {k: v.clone() for k, v in logits.items()}
    ignored["colour"][:, CELLS.index("bottom")] = torch.randn(2, len(COLOURS)) * 50
    _, parts = layout_loss(ignored, t)
    assert parts["exact"] == 1.0


def test_head_checks_the_slot_count():
    head = LayoutHead(8)
    assert head(torch.randn(2, LAYOUT_SLOTS, 8))["kind"].shape == (2, len(CELLS), 1 + len(KINDS))
    with pytest.raises(ValueError, match="caption slots"):
        head(torch.randn(2, LAYOUT_SLOTS - 1, 8))


class _Oracle(torch.nn.Module):
    """A 'head' that returns one-hot logits of the true layout (batch after batch, in order), with one caption's
    colour wrong when asked."""

    def __init__(self, scenes, wrong: int | None = None) -> None:
        super().__init__()
        t = layout_targets(scenes)
        self.logits, self.seen = _one_hot_logits(t), 0
        if wrong is not None:
            cell = t.colour[wrong].ne(IGNORE).nonzero()[0, 0]
            self.logits["colour"][wrong, cell] = torch.roll(self.logits["colour"][wrong, cell], 1)

    def forward(self, slots):
        rows = slice(self.seen, self.seen + slots.shape[0])
        self.seen += slots.shape[0]
        return {k: v[rows] for k, v in self.logits.items()}


def test_readback_scores_an_oracle_and_a_mistake():
    from ciar.training.layout import layout_readback
    from ciar.training.scenes import heldout_prompts, parse_caption
    prompts = heldout_prompts(4)
    scenes = [parse_caption(p) for p in prompts]
    text = lambda ids, mask: torch.zeros(ids.shape[0], LAYOUT_SLOTS, 8)  # noqa: E731 - the oracle ignores it
    assert layout_readback(text, _Oracle(scenes), prompts, scenes) == {
        "kind": 1.0, "colour": 1.0, "size": 1.0, "background": 1.0, "exact": 1.0}
    r = layout_readback(text, _Oracle(scenes, wrong=2), prompts, scenes, batch=3)  # also across batches
    shapes = sum(len(s.shapes) for s in scenes)
    assert r["exact"] == 0.75 and r["colour"] == (shapes - 1) / shapes and r["kind"] == 1.0
    with pytest.raises(ValueError, match="captions but"):
        layout_readback(text, _Oracle(scenes), prompts[:3], scenes)
