"""The device side of the engine, behind one small interface (`Proposer`):

- `DeviceProposer`: the one-layer device model + Inter-Head in PyTorch eager, with its own static KV cache (CFG
  doubled batch);
- `BundleProposer`: the same model as exported by `ciar export` (ONNX or ExecuTorch), run by the on-device
  runtime's backend: the graph a phone runs, at the runtime's per-token cost. One image at a time (batch 1). A
  bare-gate bundle (`ciar export --gate entropy|maxprob|latent`) has no Inter-Head: its drafts carry no U (nan)
  and no features, so it proposes for the bare gates only, at a bare device's cost.

Both rewind by overwriting: `ingest(tokens, at)` writes the cache from `at` on, and the causal mask hides what lies
beyond the current position.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ciar.models import DeviceModel, SamplingConfig, interfuse, interval_stats, model_probs, sample
from ciar.models.interval import NO_NEIGHBOUR, neighbour_ids
from ciar.models.sampling import processed_probs
from ciar.runtime.generator import neighbour_ids as neighbour_ids_np

from .types import Draft


class Proposer(Protocol):
    feature_dim: int  # the width of Draft.features (what the cloud's phi reads); 0: no Inter-Head

    def start(self, cond: Tensor, num_tokens: int) -> None: ...

    def ingest(self, tokens: Tensor, at: int) -> None: ...

    def draft(self, generator: torch.Generator) -> Draft: ...


class DeviceProposer:
    def __init__(self, model: DeviceModel, sampling: SamplingConfig, feature_top: int = 8) -> None:
        self.model, self.sampling, self.feature_top = model.eval(), sampling, feature_top
        self.feature_dim = model.config.dim + feature_top + 3  # [h_device; interval stats]
        self.pos = 0  # image tokens ingested

    @torch.inference_mode()
    def start(self, cond: Tensor, num_tokens: int) -> None:
        self.batch = cond.shape[0]
        self.cond = self.model.cfg_condition(cond) if self.sampling.guided else cond
        P = self.model.config.cls_token_num
        self.cache = self.model.new_cache(self.cond.shape[0], P + num_tokens)
        self.tokens = torch.full((self.batch, num_tokens), NO_NEIGHBOUR, dtype=torch.long)  # for the neighbours
        self._set(self.model.forward_interval(cond=self.cond, cache=self.cache))
        self.pos = 0

    def _set(self, out) -> None:
        self.centre, self.radius, self.hidden = out.centre[:, -1], out.radius[:, -1], out.hidden[:, -1]

    @torch.inference_mode()
    def ingest(self, tokens: Tensor, at: int) -> None:
        """Feed image tokens (B, n) at image positions at..at+n-1 (earlier cache entries beyond `at` are
        rewound simply by overwriting)."""
        P = self.model.config.cls_token_num
        rows = self.cond.shape[0] // self.batch
        pos = torch.arange(P + at, P + at + tokens.shape[1])
        self._set(self.model.forward_interval(tokens=tokens.repeat(rows, 1), input_pos=pos, cache=self.cache))
        self.tokens[:, at:at + tokens.shape[1]] = tokens
        self.pos = at + tokens.shape[1]

    @torch.inference_mode()
    def draft(self, generator: torch.Generator) -> Draft:
        """Draw the token at position `pos` from the processed centre; compute U and the interval features."""
        s = self.sampling
        q = model_probs(self.centre, s)
        # the ids left of and above `pos` (entries from `pos` on may be a rewound branch: never read)
        neighbours = neighbour_ids(self.tokens, self.model.config.grid_size)[:, self.pos]
        iv = interfuse(*self.model.processed_box(self.centre, self.radius, neighbours, s.cfg_scale, s.temperature))
        feats = torch.cat([self.hidden[: self.batch], interval_stats(iv.p_lo, iv.p_up, self.feature_top)], -1)
        return Draft(token=sample(q, generator), q=q, u=iv.u, features=feats)


class BundleProposer:
    """The device side run from an exported bundle by `ciar.runtime`'s backend (onnxruntime or ExecuTorch).

    The graph returns the processed centre (CFG-combined, temperature-scaled), U and the interval features per
    position; the draft is then drawn as `DeviceProposer` draws it (top-k / top-p, the torch generator), so the
    two differ only by the graph's numerics and quantization. `device` embeds the condition prefix (the bundle's
    caption encoder reads words; the engine gets encoded captions).
    """

    def __init__(self, bundle: str | Path, device: DeviceModel, sampling: SamplingConfig, threads: int = 1) -> None:
        from ciar.runtime.backend import make_backend
        from ciar.runtime.bundle import BundleError, load_bundle

        self.bundle = load_bundle(bundle)
        m = self.bundle.manifest["model"]
        if m["dim"] != device.config.dim or m["vocab_size"] != device.config.vocab_size:
            raise BundleError(f"{self.bundle.path}: exported from a device model with dim {m['dim']} and vocabulary "
                              f"{m['vocab_size']}, not this one ({device.config.dim}, {device.config.vocab_size}); "
                              "export it from the same weights")
        self.model = device.eval()
        self.backend = make_backend(self.bundle, threads, cfg_scale=sampling.cfg_scale,
                                    temperature=sampling.temperature)
        # the graph has applied CFG and temperature: filtering (or greedy's argmax) is what is left
        self.post = dataclasses.replace(sampling, cfg_scale=1.0, temperature=0.0 if sampling.greedy else 1.0)
        self.feature_dim, self.grid, self.P = m["feature_dim"], m["grid"], m["cls_token_num"]
        # a bare-gate graph's U is its own score, not the interval's: its drafts carry none
        self.no_u = None if self.bundle.gate == "interval" else torch.full((1,), torch.nan)
        self.max_tokens = m["block_size"]
        self.embeddings = np.load(self.bundle.file("token_embeddings"))
        self.pos = 0  # image tokens ingested

    @torch.inference_mode()
    def start(self, cond: Tensor, num_tokens: int) -> None:
        if cond.shape[0] != 1:
            raise ValueError(f"an exported device graph decodes one image at a time; got a batch of {cond.shape[0]}")
        if num_tokens > self.max_tokens:
            raise ValueError(f"the bundle's cache holds {self.max_tokens} image tokens; asked for {num_tokens}")
        prefix = self.model.embed_condition(self.model.cfg_condition(cond)).numpy()  # (2, P, dim)
        self.tokens = np.full(num_tokens, NO_NEIGHBOUR, np.int64)  # for the neighbours
        self.backend.reset()
        self._set(self.backend.step(prefix, 0, np.full((self.P, 2), NO_NEIGHBOUR, np.int64)))
        self.pos = 0

    def _set(self, step) -> None:
        # copies: a one-token step returns views of the backend's buffers, which the next step overwrites
        self.centre = torch.from_numpy(np.array(step.centre[-1:]))
        self.u = torch.from_numpy(np.array(step.u[-1:])) if self.no_u is None else self.no_u
        self.features = torch.from_numpy(np.array(step.features[-1:]))

    def ingest(self, tokens: Tensor, at: int) -> None:
        """Feed image tokens (1, n) at image positions at..at+n-1; the last output predicts position at+n."""
        ids = tokens[0].numpy()
        n = len(ids)
        self.tokens[at:at + n] = ids
        e = self.embeddings[ids]
        nb = neighbour_ids_np(self.tokens, at + 1, n, self.grid)
        self._set(self.backend.step(np.stack([e, e]), self.P + at, nb))
        self.pos = at + n

    @torch.inference_mode()
    def draft(self, generator: torch.Generator) -> Draft:
        q = processed_probs(self.centre, self.post)
        return Draft(token=sample(q, generator), q=q, u=self.u, features=self.features)
