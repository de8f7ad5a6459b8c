"""The numpy twin of `ciar.models.sampling` (top-k, top-p, temperature, draws from a seeded numpy Generator).

The device graph already applies CFG and temperature (and the ONNX graph returns the draw table); the runtime
filters and draws. tests/test_export_runtime.py pins this module to the torch one.
"""
from __future__ import annotations

import numpy as np


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """-inf outside the top-k (ties at the k-th value kept), then outside the nucleus of mass top_p (last dim)."""
    out = logits.astype(np.float32, copy=True)
    if top_k and top_k < out.shape[-1]:
        kth = np.partition(out, -top_k, axis=-1)[..., -top_k:].min(-1, keepdims=True)
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(out, order, -1)
        probs = softmax(sorted_logits)
        remove_sorted = (np.cumsum(probs, -1) - probs) > top_p
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        out[remove] = -np.inf
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = x - np.max(x, axis=-1, keepdims=True)  # a new array: the exponent and the division work in place
    np.exp(e, out=e)
    e /= e.sum(-1, keepdims=True)
    return e


def processed_probs(logits: np.ndarray, top_k: int, top_p: float, greedy: bool) -> np.ndarray:
    """Probabilities the draft is drawn from; one-hot at the argmax when greedy."""
    if greedy:
        p = np.zeros_like(logits, dtype=np.float64)
        np.put_along_axis(p, logits.argmax(-1)[..., None], 1.0, -1)
        return p
    if (top_k == 0 or top_k >= logits.shape[-1]) and top_p >= 1.0:  # no filter: skip its copy (hot path)
        return softmax(logits.astype(np.float64))
    return softmax(filter_logits(logits, top_k, top_p).astype(np.float64))


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a 1-D distribution by inverse CDF (one uniform from `rng`)."""
    return draw_at(np.cumsum(probs), rng.random())


def draw_table(logits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The unnormalised inverse-CDF table of softmax(logits) for a 1-D array, in float64: cumsum(exp(logits - max)),
    written into `out` when given (the numpy twin of `ciar.models.sampling.draw_table`, which the exported ONNX
    device graph returns as `cdf`). The ufuncs themselves, not x.max() / np.cumsum (Python wrappers around them):
    straight after a graph call the caches are cold and each layer of calls costs a few microseconds."""
    out = np.empty(logits.shape, np.float64) if out is None else out
    np.subtract(logits, np.maximum.reduce(logits), out=out)
    np.exp(out, out=out)
    np.add.accumulate(out, out=out)
    return out


def draw_at(table: np.ndarray, u: float) -> int:
    """The token at uniform `u` in [0, 1) of an inverse-CDF table: the first index whose entry exceeds u times
    the last (the normalisation folded into the threshold)."""
    j = int(table.searchsorted(u * table[-1], side="right"))
    return j if j < table.size else table.size - 1


class Sampler:
    """The draft draw of the generation loop: `sample(processed_probs(x))` without its temporaries: the draw
    table of the logits (`draw_table`) in one preallocated buffer, or the one the device graph returned, then one
    search; `probs` gives the distribution itself (what a verifier is sent)."""

    def __init__(self, vocab: int, top_k: int, top_p: float, greedy: bool) -> None:
        self.top_k, self.top_p, self.greedy = top_k, top_p, greedy
        self.filtered = not ((top_k == 0 or top_k >= vocab) and top_p >= 1.0)
        self._cdf = np.empty(vocab, np.float64)

    def draw(self, logits: np.ndarray, u: float, table: np.ndarray | None = None) -> int:
        """The token at uniform `u` in [0, 1) (inverse CDF). `table`: the graph's `draw_table(logits)`, if it gave
        one; it serves the unfiltered draw (filters change the distribution, so they draw from the logits)."""
        if self.greedy:
            return int(logits.argmax())
        if self.filtered:
            return draw_at(draw_table(filter_logits(logits, self.top_k, self.top_p), self._cdf), u)
        return draw_at(draw_table(logits, self._cdf) if table is None else table, u)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return processed_probs(logits, self.top_k, self.top_p, self.greedy)
