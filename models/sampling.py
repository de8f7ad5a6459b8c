"""The one CFG + sampling path used by every model and method.

Order (LlamaGen t2i): doubled batch [cond; uncond] -> CFG combine on logits -> temperature -> top-k -> top-p
-> softmax -> draw from an explicit `torch.Generator`. Draft and verification use the same function, which
is what makes speculative acceptance exact. `ciar.runtime.sampling` is the numpy twin; tests pin them together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """cfg_scale 1.0 disables guidance (no doubled batch); temperature 0 means greedy (argmax);
    top_k 0 and top_p 1.0 disable filtering."""

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def cfg_combine(logits: Tensor, scale: float) -> Tensor:
    """[cond; uncond] along dim 0 -> uncond + scale * (cond - uncond)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * scale


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k, then outside the nucleus of mass top_p (last dim).

    Ties at the k-th value are kept. A token is dropped by top-p when the mass of the tokens ranked above it
    already exceeds top_p (so the most likely token always stays).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove_sorted = (probs.cumsum(-1) - probs) > top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def process_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """CFG-combined logits -> temperature-scaled, filtered logits (greedy keeps the scale at 1)."""
    if not cfg.greedy and cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    return filter_logits(logits, cfg.top_k, cfg.top_p)


def processed_probs(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """The processed distribution that sampling draws from; one-hot at the argmax when greedy."""
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(process_logits(logits, cfg), dim=-1)


def model_probs(raw_logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """Raw model logits (doubled batch when guided) -> processed probabilities."""
    logits = cfg_combine(raw_logits, cfg.cfg_scale) if cfg.guided else raw_logits
    return processed_probs(logits, cfg)


def entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of each distribution along the last dim, with 0 log 0 = 0: the entropy gate's score."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


BARE_SCORES = ("entropy", "maxprob", "latent")  # the gates that read the device's own distribution, no Inter-Head


def latent_spread(probs: Tensor, codebook: Tensor) -> Tensor:
    """E_{x,y~probs} ||e_x - e_y||^2: how far apart two draws of the distribution lie in the VQ codebook's latent
    space (V, D): twice the trace of the codebook vectors' covariance under it. Zero when every likely code decodes
    alike, however many there are: the latent gate's score."""
    mu = probs @ codebook
    return 2 * (probs @ (codebook * codebook).sum(-1) - (mu * mu).sum(-1))


def latent_distance(a: Tensor, b: Tensor, codebook: Tensor) -> Tensor:
    """E_{x~a, y~b} ||e_x - e_y||^2 for two distributions (last dim) over the VQ `codebook` (V, D): how far a draw
    of one lies from a draw of the other in the latent space. `latent_spread(q)` is `latent_distance(q, q)`, kept
    in its own form (one codebook product instead of two) because the device computes it at every step; the bench
    scripts' latent oracles read this one (a one-hot `a` scores one drawn token)."""
    sq = (codebook * codebook).sum(-1)
    return a @ sq + b @ sq - 2 * ((a @ codebook) * (b @ codebook)).sum(-1)


def bare_score(kind: str, probs: Tensor, codebook: Tensor | None = None) -> Tensor:
    """A bare gate's score of the processed distribution (last dim); higher = more uncertain: its entropy, 1 minus
    its largest probability, or its `latent_spread` over the VQ `codebook` (V, D). The engine's gates and the
    exported bare-gate device graphs both call this."""
    if kind == "entropy":
        return entropy(probs)
    if kind == "maxprob":
        return 1.0 - probs.amax(-1)
    if kind == "latent":
        if codebook is None:
            raise ValueError("the latent gate reads the VQ codebook: pass codebook (VQModel.quantize.codebook())")
        return latent_spread(probs, codebook.to(probs.dtype))
    raise ValueError(f"unknown bare gate {kind!r}; choose one of {BARE_SCORES}")


def draw_table(logits: Tensor) -> Tensor:
    """The unnormalised inverse-CDF table of softmax(logits) along the last dim, in float64: cumsum(exp(logits -
    max)). The draw at a uniform u is the first index whose entry exceeds u times the last entry
    (`ciar.runtime.sampling.draw_at`). The exported ONNX device graph returns it beside the centre logits, so the
    runtime's per-token draw is one search; `ciar.runtime.sampling.draw_table` is the numpy twin."""
    shifted = (logits - logits.amax(-1, keepdim=True)).double()
    return shifted.exp().cumsum(-1)


def sample(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of the last dim; probs (..., V) -> (...) int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
