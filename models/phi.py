"""The interval feature projection phi (METHOD.md section 4): f_I = phi([h_device; interval stats]).

The cloud's input embedding of a device-accepted token becomes E(x) + f_I. The last layer starts at zero, so a
cloud with a fresh phi is exactly the base model; phi is trained with the cloud frozen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PhiConfig:
    device_dim: int
    n_stats: int  # interval_stats width: top widths + (Omega, Sigma, U)
    cloud_dim: int
    hidden: int = 256

    @property
    def in_dim(self) -> int:
        return self.device_dim + self.n_stats

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhiConfig":
        return cls(**d)


class IntervalProjection(nn.Module):
    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__()
        self.config = cfg
        self.fc1 = nn.Linear(cfg.in_dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.cloud_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: Tensor) -> Tensor:
        """features (..., device_dim + n_stats) = [h_device; interval_stats] -> (..., cloud_dim).

        The stats (widths, Omega, Sigma, U) span orders of magnitude, so phi reads their logarithms."""
        if features.shape[-1] != self.config.in_dim:
            raise ValueError(f"interval features have width {features.shape[-1]}, expected {self.config.in_dim}")
        hidden, stats = features.split([self.config.device_dim, self.config.n_stats], dim=-1)
        x = torch.cat([hidden, torch.log(stats.clamp_min(0) + 1e-8)], dim=-1)
        return self.fc2(F.gelu(self.fc1(x)))


def check_phi_device(phi: IntervalProjection | None, device: torch.device) -> None:
    """phi conditions the cloud's forward, so it must sit where the cloud model's weights are; ValueError if not."""
    where = None if phi is None else next(phi.parameters()).device
    if where is not None and where != device:
        raise ValueError(f"phi is on {where} but the cloud model on {device}: move both "
                         "(`BuiltinModels.cloud_to`, or `.to(device)` on each)")
