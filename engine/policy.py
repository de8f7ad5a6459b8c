"""Acceptance policies: given the cloud's processed distributions p and the device's q over a chain of k drafts,
decide how many drafts to keep and sample the next token (vLLM's rejection sampler).

Shapes: p (B, k + 1, V) -- the last row is the bonus distribution after all k drafts; q (B, k, V); drafts (B, k).
Returns (n_accepted (B,) in [0, k], next_token (B,)): the token at position n_accepted (a correction sampled
from the residual on rejection, or the bonus token from p[:, k] when every draft was accepted).
Every uniform and every draw comes from the explicit generator.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ciar.models.sampling import sample


class AcceptancePolicy(Protocol):
    def __call__(self, p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        ...


def _leading_true(accept: Tensor) -> Tensor:
    """Number of leading True values per row."""
    return accept.long().cumprod(dim=1).sum(dim=1)


def _next_token(p: Tensor, residual: Tensor, n: Tensor, generator: torch.Generator) -> Tensor:
    """Sample the token at position n of each row: from the residual row n when n < k, else from p[:, k]."""
    k = residual.shape[1]
    rows = torch.arange(p.shape[0])
    rejected = n < k
    dist = torch.where(rejected[:, None], residual[rows, n.clamp(max=k - 1)], p[rows, n])
    return sample(dist, generator)


def speculative_sampling(p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Exact speculative sampling (Leviathan et al. / Chen et al.): keep draft x with probability
    min(1, p(x) / q(x)); on the first rejection sample from norm(max(0, p - q)). The output is distributed exactly
    as p, for any q."""
    k = drafts.shape[1]
    p_x = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_x = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(drafts.shape, generator=generator, dtype=p.dtype)
    n = _leading_true(u * q_x < p_x)  # u < p/q without dividing by q (q_x > 0 for a drawn token)
    residual = (p[:, :k] - q).clamp_min(0)
    # where p == q exactly (no rejection possible) the residual is empty; fall back to p to stay well defined
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p[:, :k], residual)
    return n, _next_token(p, residual / residual.sum(-1, keepdim=True), n, generator)


class LanternPolicy:
    """LANTERN relaxed acceptance (Jang et al., ICLR 2025): the target mass of x's nearest VQ-codebook
    neighbours is added to p(x), taking neighbours in order of distance while their total stays <= delta; on
    rejection x and those neighbours are zeroed in p, which is renormalised and sampled. Lossy by design."""

    def __init__(self, neighbours: Tensor, delta: float = 0.1) -> None:
        self.neighbours, self.delta = neighbours, delta  # neighbours: (V, n) ids, nearest first

    def __call__(self, p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        k = drafts.shape[1]
        nb = self.neighbours[drafts]  # (B, k, n)
        nb_mass = p[:, :k].gather(-1, nb)
        take = nb_mass.cumsum(-1) <= self.delta
        p_x = p[:, :k].gather(-1, drafts[..., None])[..., 0] + (nb_mass * take).sum(-1)
        q_x = q.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(drafts.shape, generator=generator, dtype=p.dtype)
        n = _leading_true(u * q_x < p_x)
        zeroed = p[:, :k].clone()
        zeroed.scatter_(-1, drafts[..., None], 0.0)
        zeroed.scatter_(-1, nb, torch.where(take, 0.0, nb_mass))
        empty = zeroed.sum(-1, keepdim=True) <= 0
        zeroed = torch.where(empty, p[:, :k], zeroed)
        return n, _next_token(p, zeroed / zeroed.sum(-1, keepdim=True), n, generator)
