"""Gates: which device drafts go to the cloud. Each gate scores a draft; a draft is sent iff score >= tau.

`calibrate_tau` turns a target cloud-call rate into tau (a quantile of the scores on held-out prompts);
`BudgetController` nudges tau within one image to hold a cloud-call budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .types import Draft

SCORES = ("interval", "entropy", "maxprob", "random", "always", "never")


def gate_score(kind: str, draft: Draft, generator: torch.Generator) -> Tensor:
    """(B,) scores; higher = more uncertain."""
    if kind == "interval":
        return draft.u
    if kind == "entropy":
        q = draft.q
        return -(q * q.clamp_min(1e-30).log()).sum(-1)
    if kind == "maxprob":
        return 1.0 - draft.q.max(-1).values
    if kind == "random":
        return torch.rand(draft.token.shape, generator=generator)
    if kind == "always":
        return torch.full(draft.token.shape, math.inf)
    if kind == "never":
        return torch.full(draft.token.shape, -math.inf)
    raise ValueError(f"unknown gate {kind!r}; choose one of {SCORES}")


def calibrate_tau(scores: np.ndarray, cloud_rate: float) -> float:
    """The tau that sends a fraction `cloud_rate` of these draft scores to the cloud."""
    if not 0.0 <= cloud_rate <= 1.0:
        raise ValueError(f"cloud_rate must be in [0, 1], got {cloud_rate}")
    if cloud_rate >= 1.0:
        return -math.inf
    if cloud_rate <= 0.0:
        return math.inf
    return float(np.quantile(np.asarray(scores, np.float64), 1.0 - cloud_rate))


@dataclass
class BudgetController:
    """Multiplicative tau controller holding the per-image share of drafts sent near `target_rate`."""

    tau: float
    target_rate: float
    gain: float = 0.05

    def update(self, sent: int, drafted: int) -> float:
        if drafted and self.tau > 0 and math.isfinite(self.tau):
            self.tau *= math.exp(self.gain * (sent / drafted - self.target_rate) / max(self.target_rate, 1e-3))
        return self.tau
