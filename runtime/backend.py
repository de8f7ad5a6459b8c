"""Backends that run the exported device graph. One small interface:

    backend.reset()                         fresh (zero) KV cache
    backend.step(embeds, start) -> Step     embeds (2, L, dim) float32 at image/prefix positions start..start+L-1

The onnxruntime backend preallocates its cache buffers once and binds them with IO binding: a decode step writes the
new cache into the other buffer of a pair and the pair swaps, so no array is allocated per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .bundle import Bundle, BundleError


@dataclass
class Step:
    centre: np.ndarray  # (L, V) processed centre logits (CFG-combined, temperature-scaled)
    u: np.ndarray  # (L,) U score
    features: np.ndarray  # (L, F) [h_device; interval stats]


class DeviceBackend(Protocol):
    def reset(self) -> None: ...

    def step(self, embeds: np.ndarray, start: int) -> Step: ...


class OnnxBackend:
    def __init__(self, bundle: Bundle, threads: int = 1, cfg_scale: float | None = None,
                 temperature: float | None = None) -> None:
        import onnxruntime as ort

        m = bundle.manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(bundle.file("device")), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable or truncated models
            raise BundleError(f"{bundle.file('device')}: onnxruntime cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); re-export the bundle") from None
        self.cache_shape = tuple(m["model"]["cache_shape"])
        self.cls_token_num = m["model"]["cls_token_num"]
        s = m["sampling"]
        self.scalars = {"cfg_scale": np.array([s["cfg_scale"] if cfg_scale is None else cfg_scale], np.float32),
                        "temperature": np.array([(s["temperature"] if temperature is None else temperature) or 1.0],
                                                np.float32)}
        dim, vocab, feats = m["model"]["dim"], m["model"]["vocab_size"], m["model"]["feature_dim"]
        self._k = [np.zeros(self.cache_shape, np.float32) for _ in range(2)]
        self._v = [np.zeros(self.cache_shape, np.float32) for _ in range(2)]
        # one-token decode: every input and output is a preallocated array, bound once per cache parity
        self._emb1 = np.zeros((2, 1, dim), np.float32)
        self._pos1 = np.zeros(1, np.int64)
        self._out1 = {"centre": np.zeros((1, 1, vocab), np.float32), "u": np.zeros((1, 1), np.float32),
                      "features": np.zeros((1, 1, feats), np.float32)}
        self._fast = [self._bind_decode(parity) for parity in (0, 1)]
        self._cur = 0
        self.last_run_s = 0.0  # time inside onnxruntime in the last step (the rest is runtime overhead)

    def _bind_decode(self, cur: int):
        b, nxt = self.session.io_binding(), 1 - cur
        for name, array in (("embeds", self._emb1), ("input_pos", self._pos1), ("k_cache", self._k[cur]),
                            ("v_cache", self._v[cur]), *self.scalars.items()):
            b.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in (*self._out1.items(), ("k_cache_out", self._k[nxt]), ("v_cache_out", self._v[nxt])):
            b.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return b

    def reset(self) -> None:
        for a in (*self._k, *self._v):
            a.fill(0.0)
        self._cur = 0

    def step(self, embeds: np.ndarray, start: int) -> Step:
        """Run the graph on embeds (2, L, dim) at absolute sequence positions start..start+L-1. For L == 1 the
        returned arrays are views of preallocated buffers, valid until the next step."""
        cur, nxt = self._cur, 1 - self._cur
        t0 = time.perf_counter()
        if embeds.shape[1] == 1:
            np.copyto(self._emb1, embeds)
            self._pos1[0] = start
            t0 = time.perf_counter()
            self.session.run_with_iobinding(self._fast[cur])
            self.last_run_s = time.perf_counter() - t0
            o = self._out1
            result = Step(o["centre"][0], o["u"][0], o["features"][0])
        else:  # prefill or a block of tokens: allocation is fine here
            feeds = {"embeds": np.ascontiguousarray(embeds, dtype=np.float32),
                     "input_pos": np.arange(start, start + embeds.shape[1], dtype=np.int64),
                     "k_cache": self._k[cur], "v_cache": self._v[cur], **self.scalars}
            centre, u, features, k, v = self.session.run(None, feeds)
            self.last_run_s = time.perf_counter() - t0
            np.copyto(self._k[nxt], k)
            np.copyto(self._v[nxt], v)
            result = Step(centre[0], u[0], features[0])
        self._cur = nxt
        return result


def make_backend(bundle: Bundle, threads: int = 1, **overrides) -> DeviceBackend:
    if bundle.format == "onnx":
        return OnnxBackend(bundle, threads, **overrides)
    if bundle.format == "executorch":
        raise BundleError(f"{bundle.path}: ExecuTorch bundles need the ExecuTorch runtime backend, which this "
                          "version of ciar-device does not include yet; use an ONNX bundle")
    raise BundleError(f"{bundle.path}: {bundle.format} bundles cannot run here (Core ML needs an Apple device)")
