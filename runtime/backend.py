"""Backends that run the exported device graph. One small interface:

    backend.reset()                         fresh (zero) KV cache
    backend.step(embeds, start, neighbours) -> Step
                                            embeds (2, L, dim) float32 at image/prefix positions start..start+L-1,
                                            neighbours (L, 2) int64: the ids left of and above the image position
                                            each output predicts, -1 for none (`generator.neighbour_ids`);
                                            the embeds and neighbours of a one-token step may be written straight
                                            into `backend.decode_inputs` (then nothing is copied)
    backend.last_run_s                      seconds inside the graph call of the last step (the rest is overhead)

The onnxruntime backend opens the graph twice: as exported (any length L: prefill and blocks of tokens) and with its
length fixed to 1 (`add_free_dimension_override_by_name`), for the decode step that runs once per token: with every
shape known, onnxruntime folds the graph's shape arithmetic away. The graph reads the cache and returns only the
step's new rows (`k_new`, `v_new`), which the backend writes into its cache arrays: no copy of the whole cache per
step. It also returns the draw table of the centre logits (`cdf`, `sampling.draw_table`), so the draw is one search.
The cache and the decode step's inputs and outputs are preallocated and bound once with IO binding, so no array is
allocated per step. The ExecuTorch backend (`executorch_backend.py`) keeps the cache inside the program
(mutable buffers); it needs the ExecuTorch runtime, which on Python 3.11 links against torch, so its module is
imported only when an ExecuTorch bundle is opened.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .bundle import Bundle, BundleError


@dataclass
class Step:
    centre: np.ndarray  # (L, V) processed centre logits (CFG-combined, temperature-scaled)
    u: np.ndarray  # (L,) U score
    features: np.ndarray  # (L, F) [h_device; interval stats]
    cdf: np.ndarray | None = None  # (L, V) float64 draw table of `centre` (`sampling.draw_table`) if the graph has one


class DeviceBackend(Protocol):
    last_run_s: float
    decode_inputs: tuple[np.ndarray, np.ndarray]  # the one-token step's (embeds (2, 1, dim), neighbours (1, 2))

    def reset(self) -> None: ...

    def step(self, embeds: np.ndarray, start: int, neighbours: np.ndarray) -> Step: ...


def open_session(path: Path, threads: int = 1, fixed_length: str | None = None):
    """An onnxruntime CPU session of a device graph as the runtime runs it; `fixed_length`: the name of the length
    dimension to fix to 1 (the one-token decode session)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if fixed_length is not None:
        opts.add_free_dimension_override_by_name(fixed_length, 1)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for unreadable or truncated models
        raise BundleError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); re-export the bundle") from None


class OnnxBackend:
    def __init__(self, bundle: Bundle, threads: int = 1, cfg_scale: float | None = None,
                 temperature: float | None = None, fixed_length_decode: bool = True) -> None:
        """`fixed_length_decode=False` runs decode steps on the any-length session too (the comparison of
        `bench/decode_session.py`)."""
        m = bundle.manifest
        path = bundle.file("device")
        self.session = open_session(path, threads)  # any length: prefill and blocks of tokens
        length = {i.name: i.shape for i in self.session.get_inputs()}.get("embeds", [None, None])[1]
        # the one-token decode step: the same graph with its length fixed (a graph exported with L = 1 already is)
        fixed = fixed_length_decode and isinstance(length, str)
        self.decode_session = open_session(path, threads, length) if fixed else self.session
        self.cache_shape = tuple(m["model"]["cache_shape"])
        self.cls_token_num = m["model"]["cls_token_num"]
        s = m["sampling"]
        self.scalars = {"cfg_scale": np.array([s["cfg_scale"] if cfg_scale is None else cfg_scale], np.float32),
                        "temperature": np.array([(s["temperature"] if temperature is None else temperature) or 1.0],
                                                np.float32)}
        dim, vocab, feats = m["model"]["dim"], m["model"]["vocab_size"], m["model"]["feature_dim"]
        n_layer, rows, heads, _, head_dim = self.cache_shape
        self._k = np.zeros(self.cache_shape, np.float32)  # the KV cache: read by every step, rows written after it
        self._v = np.zeros(self.cache_shape, np.float32)
        # one-token decode: every input and output is a preallocated array, bound once
        self._emb1 = np.zeros((2, 1, dim), np.float32)
        self._pos1 = np.zeros(1, np.int64)
        self._nb1 = np.zeros((1, 2), np.int64)
        self._out1 = {"centre": np.zeros((1, 1, vocab), np.float32), "u": np.zeros((1, 1), np.float32),
                      "features": np.zeros((1, 1, feats), np.float32),
                      "k_new": np.zeros((n_layer, rows, heads, 1, head_dim), np.float32),
                      "v_new": np.zeros((n_layer, rows, heads, 1, head_dim), np.float32),
                      "cdf": np.zeros((1, 1, vocab), np.float64)}
        self._outputs = list(self._out1)  # the graph's outputs, in the order a multi-token step unpacks them
        missing = set(self._outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise BundleError(f"{path}: the device graph has no output {', '.join(sorted(missing))} (format "
                              f"{m['format_version']} bundles have them all); re-export the bundle")
        # a bare-gate graph (`ciar export --gate maxprob`) never reads the neighbours, and ONNX drops an unread input
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.decode_inputs = self._emb1, self._nb1
        self._fast = self._bind_decode()
        o = self._out1
        self._step1 = Step(o["centre"][0], o["u"][0], o["features"][0], o["cdf"][0])  # views of the bound outputs
        self._rows1 = o["k_new"], o["v_new"]
        self.last_run_s = 0.0  # time inside onnxruntime in the last step (the rest is runtime overhead)

    def _bind_decode(self):
        b = self.decode_session.io_binding()
        for name, array in (("embeds", self._emb1), ("input_pos", self._pos1), ("neighbours", self._nb1),
                            ("k_cache", self._k), ("v_cache", self._v), *self.scalars.items()):
            if name in self._inputs:
                b.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in self._out1.items():
            b.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return b

    def reset(self) -> None:
        self._k.fill(0.0)
        self._v.fill(0.0)

    def step(self, embeds: np.ndarray, start: int, neighbours: np.ndarray) -> Step:
        """Run the graph on embeds (2, L, dim) at absolute sequence positions start..start+L-1 and write the
        step's new cache rows there. For L == 1 the returned arrays are views of preallocated buffers, valid until
        the next step."""
        L = embeds.shape[1]
        if start < 0 or start + L > self.cache_shape[3]:
            raise ValueError(f"positions {start}..{start + L - 1} lie outside the cache (0..{self.cache_shape[3] - 1})")
        t0 = time.perf_counter()
        if L == 1:
            if embeds is not self._emb1:
                np.copyto(self._emb1, embeds)
            if neighbours is not self._nb1:
                np.copyto(self._nb1, neighbours)
            self._pos1[0] = start
            t0 = time.perf_counter()
            self.decode_session.run_with_iobinding(self._fast)
            self.last_run_s = time.perf_counter() - t0
            k, v = self._rows1
            result = self._step1
        else:  # prefill or a block of tokens: allocation is fine here
            feeds = {"embeds": np.ascontiguousarray(embeds, dtype=np.float32),
                     "input_pos": np.arange(start, start + L, dtype=np.int64),
                     "neighbours": np.ascontiguousarray(neighbours, dtype=np.int64), "k_cache": self._k,
                     "v_cache": self._v, **self.scalars}
            feeds = {name: value for name, value in feeds.items() if name in self._inputs}
            centre, u, features, k, v, cdf = self.session.run(self._outputs, feeds)
            self.last_run_s = time.perf_counter() - t0
            result = Step(centre[0], u[0], features[0], cdf[0])
        self._k[:, :, :, start:start + L] = k
        self._v[:, :, :, start:start + L] = v
        return result


def make_backend(bundle: Bundle, threads: int = 1, **overrides) -> DeviceBackend:
    if bundle.format == "onnx":
        return OnnxBackend(bundle, threads, **overrides)
    if bundle.format == "executorch":
        from .executorch_backend import ExecuTorchBackend  # needs torch: imported only for an ExecuTorch bundle
        return ExecuTorchBackend(bundle, threads, **overrides)
    raise BundleError(f"{bundle.path}: {bundle.format} bundles cannot run here (Core ML needs an Apple device)")
