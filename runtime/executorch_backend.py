"""device.pte through the ExecuTorch Python runtime: the one device-side backend that needs torch.

The ExecuTorch runtime takes and returns torch tensors and, on Python 3.11, links against torch, so this module is
imported only when an ExecuTorch bundle is opened (`backend.make_backend`); the onnxruntime path never loads it.
On a phone the same .pte runs under ExecuTorch's C++ / Java runtime instead.
"""
from __future__ import annotations

import time

import numpy as np

from .backend import Step
from .bundle import Bundle, BundleError


class ExecuTorchBackend:
    """device.pte through the ExecuTorch runtime (XNNPACK + the LLM custom ops). The KV cache is the method's state,
    so `reset` loads a fresh method (its cache buffers start from the zeros stored in the program, about 10 ms).
    Positions must be consecutive (start..start+L-1), as the generator always passes them."""

    def __init__(self, bundle: Bundle, threads: int = 1, cfg_scale: float | None = None,
                 temperature: float | None = None) -> None:
        try:
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (the .pte's llama:: ops)
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError as e:
            raise BundleError(f"{bundle.file('device')}: the ExecuTorch runtime is not available ({e}); install "
                              "ciar[export] or use an ONNX bundle") from None
        # the ExecuTorch Python runtime takes and returns torch tensors and, on Python 3.11, links against torch
        # (it has already imported it): the one device-side path that needs torch, and only when chosen
        import torch
        self._torch = torch
        # both pools to `threads`: custom_sdpa runs multi-token attention on torch's intra-op pool, and with the two
        # pools sized differently an 8-token prefill took 250 ms instead of 1.5 ms here
        portable_lib._unsafe_reset_threadpool(threads)
        torch.set_num_threads(threads)
        self._path = bundle.file("device")
        self._runtime, self._data = Runtime.get(), self._path.read_bytes()
        m = bundle.manifest
        s = m["sampling"]
        self._scalars = (torch.tensor([s["cfg_scale"] if cfg_scale is None else cfg_scale], dtype=torch.float32),
                         torch.tensor([(s["temperature"] if temperature is None else temperature) or 1.0],
                                      dtype=torch.float32))
        self._emb1 = torch.zeros(2, 1, m["model"]["dim"])
        self._pos1 = torch.zeros(1, dtype=torch.int64)
        self._nb1 = torch.zeros(1, 2, dtype=torch.int64)
        # views: written in place per step
        self._emb1_np, self._pos1_np, self._nb1_np = self._emb1.numpy(), self._pos1.numpy(), self._nb1.numpy()
        self.decode_inputs = self._emb1_np, self._nb1_np
        self.last_run_s = 0.0
        self.reset()

    def reset(self) -> None:
        try:
            self._method = self._runtime.load_program(self._data).load_method("forward")
        except RuntimeError as e:
            raise BundleError(f"{self._path}: the ExecuTorch runtime cannot load it ({str(e)[:200]}); re-export "
                              "the bundle") from None

    def step(self, embeds: np.ndarray, start: int, neighbours: np.ndarray) -> Step:
        """Run the program on embeds (2, L, dim) at positions start..start+L-1 (writes its cache there)."""
        torch = self._torch
        if embeds.shape[1] == 1:
            if embeds is not self._emb1_np:
                np.copyto(self._emb1_np, embeds)
            if neighbours is not self._nb1_np:
                np.copyto(self._nb1_np, neighbours)
            self._pos1_np[0] = start
            inputs = (self._emb1, self._pos1, self._nb1, *self._scalars)
        else:
            inputs = (torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32)),
                      torch.arange(start, start + embeds.shape[1]),
                      torch.from_numpy(np.ascontiguousarray(neighbours, dtype=np.int64)), *self._scalars)
        t0 = time.perf_counter()
        centre, u, features = self._method.execute(inputs)
        self.last_run_s = time.perf_counter() - t0
        return Step(centre[0].numpy(), u[0].numpy(), features[0].numpy())
