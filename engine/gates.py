"""Gates: which device drafts go to the cloud. Each gate scores a draft; a draft is sent iff score >= tau.

`calibrate_tau` turns a target cloud-call rate into tau (a quantile of the scores on held-out prompts);
`BudgetController` (torch-free, in `ciar.runtime.budget`: the device runtime runs it too) nudges tau within one
image to hold its cloud-call budget (prefix forwards included).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ciar.models.sampling import BARE_SCORES, bare_score
from ciar.runtime.budget import BudgetController

from .types import Draft

SCORES = ("interval", "entropy", "maxprob", "latent", "random", "always", "never")
__all__ = ["SCORES", "BudgetController", "calibrate_tau", "gate_score"]


def gate_score(kind: str, draft: Draft, generator: torch.Generator, codebook: Tensor | None = None) -> Tensor:
    """(B,) scores; higher = more uncertain. The latent gate reads the VQ `codebook` (V, D)."""
    if kind == "interval":
        return draft.u
    if kind in BARE_SCORES:
        return bare_score(kind, draft.q, codebook)
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
