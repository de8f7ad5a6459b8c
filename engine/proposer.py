"""The device side: the one-layer device model + Inter-Head with its own static KV cache (CFG doubled batch)."""
from __future__ import annotations

import torch
from torch import Tensor

from ciar.models import DeviceModel, SamplingConfig, interfuse, interval_stats, model_probs, sample
from ciar.models.interval import NO_NEIGHBOUR, neighbour_ids

from .types import Draft


class DeviceProposer:
    def __init__(self, model: DeviceModel, sampling: SamplingConfig, feature_top: int = 8) -> None:
        self.model, self.sampling, self.feature_top = model.eval(), sampling, feature_top
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
