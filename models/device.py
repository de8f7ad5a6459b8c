"""The device model: the cloud architecture cut to one transformer layer, plus the Inter-Head (METHOD.md s.1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import GPTConfig
from .gpt import GPT, KVCache
from .interval import InterHead, process_interval


@dataclass
class DeviceOutput:
    centre: Tensor  # (B, L, V) centre logits c (the model's ordinary logits)
    radius: Tensor  # (B, L, V) r >= 0
    hidden: Tensor  # (B, L, dim) final hidden state h_device


def device_config(cloud: GPTConfig, n_layer: int = 1) -> GPTConfig:
    """The cloud's config with `n_layer` layers (one by default)."""
    return cloud.replace(n_layer=n_layer)


class DeviceModel(GPT):
    """A LlamaGen GPT plus `inter_head` (the radius and its neighbour scale). State-dict keys are LlamaGen's plus
    `inter_head.*`."""

    def __init__(self, cfg: GPTConfig, init_radius: float = 0.1, radius_hidden: int = 0) -> None:
        super().__init__(cfg)
        self.inter_head = InterHead(cfg.dim, cfg.vocab_size, init_radius, radius_hidden)

    def forward_interval(self, *, cond: Tensor | None = None, tokens: Tensor | None = None,
                         input_pos: Tensor | None = None, cache: KVCache | None = None,
                         cond_mask: Tensor | None = None, cond_drop: Tensor | None = None) -> DeviceOutput:
        out = self(cond=cond, tokens=tokens, input_pos=input_pos, cache=cache, cond_mask=cond_mask,
                   cond_drop=cond_drop)
        return DeviceOutput(out.logits, self.inter_head(out.hidden), out.hidden)

    def processed_box(self, centre: Tensor, radius: Tensor, neighbours: Tensor, cfg_scale: float,
                      temperature: float) -> tuple[Tensor, Tensor]:
        """The box the gate reads, in processed-logit space: `process_interval` of the raw [cond; uncond] outputs,
        then the radius scaled by the Inter-Head's neighbour scale. neighbours (B, ..., 2): `neighbour_ids` of the
        positions (one row per image, not doubled)."""
        c, r = process_interval(centre, radius, cfg_scale, temperature)
        return c, self.inter_head.scale(c, r, neighbours)


def with_identity_neighbour_scale(device: DeviceModel, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights saved before the Inter-Head had its neighbour scale (v4 and older) lack `inter_head.neighbour.*`:
    fill in the untrained scale (output layer zero: exactly the old box). Every other key stays strict."""
    own = device.state_dict()
    missing = [k for k in own if k not in state]
    if missing and all(k.startswith("inter_head.neighbour.") for k in missing):
        return {**state, **{k: own[k] if not k.startswith("inter_head.neighbour.2.") else torch.zeros_like(own[k])
                            for k in missing}}
    return state


def build_device_model(cloud_cfg: GPTConfig, n_layer: int = 1, cloud: GPT | None = None,
                       radius_hidden: int = 0) -> DeviceModel:
    """A device model for `cloud_cfg`. Given the trained `cloud`, start from its embeddings, condition embedder,
    first `n_layer` layers, final norm and output head (the Inter-Head radius starts small and uniform)."""
    device = DeviceModel(device_config(cloud_cfg, n_layer), radius_hidden=radius_hidden)
    if cloud is not None:
        if cloud.config.replace(n_layer=n_layer) != device.config:
            raise ValueError("the cloud model's config does not match cloud_cfg")
        own = device.state_dict()
        shared = {k: v for k, v in cloud.state_dict().items() if k in own and own[k].shape == v.shape}
        with torch.no_grad():
            device.load_state_dict(shared, strict=False)
    return device
