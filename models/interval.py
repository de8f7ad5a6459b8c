"""Inter-Head, InterFuse tight softmax bounds and the U score (METHOD.md sections 2-3).

For a logit box [c - r, c + r]:
    p_lo_i = exp(c_i - r_i) / (exp(c_i - r_i) + sum_{j != i} exp(c_j + r_j))
    p_up_i = exp(c_i + r_i) / (exp(c_i + r_i) + sum_{j != i} exp(c_j - r_j))
which guarantees sum(p_lo) <= 1 <= sum(p_up) and p_lo <= softmax(c') <= p_up for any c' in the box.
U = ||p_up - p_lo||_1 * std(p_up - p_lo).

The bounds have two forms, one per reader: `interval_bounds` (probabilities from a few elementwise ops per bound:
the gate, U and the interval features, in every exported device graph) and `interval_log_bounds` (log-probabilities, exact for
any logits: the Inter-DRO loss, which takes their logs, where an underflowed probability would be -inf). Tests pin
the two to each other. `ciar.runtime` never recomputes these: the exported device graph outputs U, computed by
this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import entropy


def log_sum_exp_excluding(x: Tensor) -> Tensor:
    """log(sum_{j != i} exp(x_j)) for every i along the last dim, in O(V) and without cancellation.

    For every entry but the argmax, softmax(x)_i <= 1/2, so S + log1p(-softmax_i) is exact to rounding. For the
    argmax itself the sum is recomputed with that entry masked out.
    """
    total = torch.logsumexp(x, dim=-1, keepdim=True)
    # clamp: only the argmax can exceed 1/2, and its value is replaced below (avoids inf * 0 in backward)
    p = torch.exp(x - total).clamp(max=0.5)
    excl = total + torch.log1p(-p)
    top = x.argmax(dim=-1, keepdim=True)
    excl_top = torch.logsumexp(x.scatter(-1, top, float("-inf")), dim=-1, keepdim=True)
    return excl.scatter(-1, top, excl_top)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) + exp(b)) from exportable ops (ONNX has no logaddexp); -inf + -inf stays -inf."""
    m = torch.maximum(a, b)
    out = m + torch.log1p(torch.exp(-(a - b).abs()))
    return torch.where(m == float("-inf"), m, out)


def interval_log_bounds(centre: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """(log p_lo, log p_up) of the InterFuse bounds for the logit box [centre - radius, centre + radius]."""
    # both bounds are invariant to a common shift; shifting by the max keeps large logits (|c| ~ 1e4) exact
    shift = (centre + radius).amax(dim=-1, keepdim=True).detach()
    lo, up = centre - radius - shift, centre + radius - shift
    log_p_lo = lo - _logaddexp(lo, log_sum_exp_excluding(up))
    log_p_up = up - _logaddexp(up, log_sum_exp_excluding(lo))
    return log_p_lo, log_p_up


def _at_max(top: Tensor, x: Tensor) -> Tensor:
    """1.0 where x equals `top` (x's largest value, broadcast), else 0.0: `x == top` as a float from arithmetic,
    since ExecuTorch runs a comparison and a bool cast as two portable kernels (1-4 us a call) and this as one."""
    return 1.0 - torch.sign(top - x)


def _bound(x: Tensor, other: Tensor) -> Tensor:
    """e^x_i / (e^x_i + sum_{j != i} e^other_j) for every i, as 1 / (1 + R_i e^(s_i - x_i)) with R_i = sum_{j != i}
    e^(other_j - s_i), taken at a scale s_i where R_i neither overflows nor cancels: s_i = m = max(other) for every
    entry but the largest (R_i = S - e_i >= 1, two roundings at most), and the second largest m2 for the largest
    itself, whose R_i = sum_j e^(min(other_j, m2) - m2) - 1 >= 1 (its own term clipped to 1, then taken away; a tie
    at the top counts the other tied entry). So the bound is right for any box width and temperature: an overflowing
    e^(s_i - x_i) gives 0 (to the dtype's smallest normal), an underflowing one 1. The largest entry's values are
    blended in arithmetically rather than by a mask and `where`: ExecuTorch's portable `where` made the step 3%
    slower than the log-space form, and Core ML's converter wants static shapes for a scatter. Every op here but
    the top-2, the sums and the sign runs in ExecuTorch's XNNPACK delegate (its portable kernels are scalar loops
    at 1.5-4 us a call: docs/BENCHMARKS.md section 1)."""
    top2 = other.detach().topk(min(2, other.shape[-1]), dim=-1)
    m = top2.values[..., :1]
    m2 = torch.maximum(top2.values[..., -1:], m - 1e4)  # a row whose entries but one are -inf: R = 0, a bound of 1
    is_top = _at_max(m, other)
    e = torch.exp(other - m)
    rest = e.sum(-1, keepdim=True) - e
    rest_top = torch.exp(torch.minimum(other, m2) - m2).sum(-1, keepdim=True) - 1.0
    rest = rest + is_top * (rest_top - rest)
    scale = m + is_top * (m2 - m)
    # capped where e^(s_i - x_i) would overflow (the bound is then < 1e-38 either way): inf would make the
    # backward pass 0 * inf. A one divided by the denominator, not its reciprocal: ExecuTorch's XNNPACK delegate
    # runs a division, and a reciprocal falls to a portable kernel.
    cap = math.log(torch.finfo(x.dtype).max) - 1.0
    return torch.ones_like(m) / (1.0 + rest * torch.exp((scale - x).clamp_max(cap)))


def interval_bounds(centre: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """(p_lo, p_up) of the InterFuse bounds for the logit box [centre - radius, centre + radius], in linear space:
    p_lo_i = 1 / (1 + sum_{j != i} e^(up_j - lo_i)), p_up_i = 1 / (1 + sum_{j != i} e^(lo_j - up_i)).

    The same bounds as exp(`interval_log_bounds`) to float32 rounding (`_bound`), from cheaper ops: a top-2, two
    exponentials and two sums per bound instead of two leave-one-out log-sum-exps and a log-add-exp (the int8 ONNX
    device step is 1.1x faster; docs/BENCHMARKS.md section 1)."""
    lo, up = centre - radius, centre + radius
    return _bound(lo, up), _bound(up, lo)


def u_score(p_lo: Tensor, p_up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, Omega, Sigma): Omega = L1 width of the interval, Sigma = population std of the widths, U = Omega*Sigma."""
    delta = p_up - p_lo
    omega = delta.sum(-1)
    sigma = delta.std(-1, unbiased=False)
    return omega * sigma, omega, sigma


@dataclass
class Interval:
    """The interval distribution of one or more positions as the gate reads it: bounds (..., V), scores (...)."""

    p_lo: Tensor
    p_up: Tensor
    u: Tensor
    omega: Tensor
    sigma: Tensor


def interfuse(centre: Tensor, radius: Tensor) -> Interval:
    """The tight softmax bounds over the logit box (`interval_bounds`) and U."""
    p_lo, p_up = interval_bounds(centre, radius)
    u, omega, sigma = u_score(p_lo, p_up)
    return Interval(p_lo, p_up, u, omega, sigma)


def cfg_combine_interval(centre: Tensor, radius: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """CFG on a box: centre as for logits; radius by interval arithmetic, |1-s| r_uncond + |s| r_cond.

    Inputs are the doubled batch [cond; uncond] along dim 0.
    """
    c_cond, c_uncond = centre.chunk(2, dim=0)
    r_cond, r_uncond = radius.chunk(2, dim=0)
    c = c_uncond + (c_cond - c_uncond) * scale
    r = abs(1.0 - scale) * r_uncond + abs(scale) * r_cond
    return c, r


def process_interval(centre: Tensor, radius: Tensor, cfg_scale: float, temperature: float) -> tuple[Tensor, Tensor]:
    """The box in processed-logit space: CFG combine (when guided), then temperature (greedy keeps scale 1).

    Top-k / top-p filtering applies to sampling from the centre only, not to the box (our choice).
    """
    if cfg_scale != 1.0:
        centre, radius = cfg_combine_interval(centre, radius, cfg_scale)
    if temperature not in (0.0, 1.0):
        centre, radius = centre / temperature, radius / temperature
    return centre, radius


def interval_stats(p_lo: Tensor, p_up: Tensor, top: int) -> Tensor:
    """The compact interval features uploaded with a verification request: the `top` largest widths
    (descending), then Omega, Sigma and U. Shape (..., top + 3)."""
    delta = p_up - p_lo
    widths = torch.topk(delta, min(top, delta.shape[-1]), dim=-1).values
    widths = F.pad(widths, (0, top - widths.shape[-1]))  # vocabularies smaller than `top`: zero widths
    u, omega, sigma = u_score(p_lo, p_up)
    return torch.cat([widths, omega[..., None], sigma[..., None], u[..., None]], dim=-1)


NEIGHBOUR_FEATURES = 9
NO_NEIGHBOUR = -1  # the id of a missing neighbour (first image row, first position)


def neighbour_ids(tokens: Tensor, grid: int) -> Tensor:
    """(..., T, 2) int64: for every image position t of `tokens` (..., T), the ids of its left (t - 1) and above
    (t - grid) neighbours in raster order, NO_NEIGHBOUR where there is none. The left neighbour of a row's first
    token is the previous row's last (raster order: it is the token the model has just read)."""
    pad = torch.full((*tokens.shape[:-1], grid), NO_NEIGHBOUR, dtype=torch.long, device=tokens.device)
    shifted = torch.cat([pad, tokens.long()], dim=-1)  # shifted[..., grid + t] = tokens[..., t]
    T = tokens.shape[-1]
    return torch.stack([shifted[..., grid - 1: grid - 1 + T], shifted[..., :T]], dim=-1)


def neighbour_features(centre: Tensor, neighbours: Tensor) -> Tensor:
    """(..., NEIGHBOUR_FEATURES) features of a position from its processed centre logits (..., V) and its
    neighbours (..., 2) (`neighbour_ids`): for the left and the above token, its log-probability under the centre
    relative to the argmax's (clamped to [-10, 0], / 10) and whether it is the argmax; whether an above token
    exists; whether left and above agree; the centre's max probability, top-2 margin and entropy / 3. On flat
    regions the next token repeats its neighbours, so these say whether the device is continuing one."""
    log_p = torch.log_softmax(centre.float(), dim=-1)
    top2 = log_p.topk(2, dim=-1).values
    log_p_nb = torch.gather(log_p, -1, neighbours.clamp_min(0))  # (..., 2)
    # the indicators in float arithmetic on ids cast once (exact: ids are integers far below 2^24): ExecuTorch runs
    # every comparison, logical and and bool cast as a portable kernel, 1-4 us a call; an argmax is "its
    # log-probability is the largest" (`_at_max`; the same but for an exact tie at the top)
    ids = neighbours.to(log_p.dtype)
    present = (ids + 1.0).clamp(0.0, 1.0)  # NO_NEIGHBOUR = -1
    rel = (log_p_nb - top2[..., :1]).clamp_min(-10.0) / 10.0 * present
    is_argmax = _at_max(top2[..., :1], log_p_nb) * present
    agree = (1.0 - (ids[..., :1] - ids[..., 1:]).abs().clamp_max(1.0)) * present[..., 1:]
    p_top = top2.exp()
    return torch.cat([rel, is_argmax, present[..., 1:], agree, p_top[..., :1], p_top[..., :1] - p_top[..., 1:],
                      entropy(log_p.exp())[..., None] / 3.0], dim=-1)


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) as max(x, 0) + log(1 + e^-|x|): `F.softplus` to one rounding of 1 (1.2e-7) absolute, in
    elementwise ops that every exporter vectorizes (onnxruntime's Softplus kernel is scalar: 23 against 10 us for a
    step's 2 x 1024 radii; ExecuTorch runs log1p as a portable kernel, 11 us, and log in its XNNPACK delegate; ONNX
    has no log1p and exports it as this). A radius only enters the box as c -+ r, where an error below the rounding
    of c is lost anyway."""
    return x.clamp_min(0.0) + torch.log(1.0 + torch.exp(-x.abs()))


class InterHead(nn.Module):
    """The radius half of the Inter-Head: r = softplus(W_r h + b) >= 0, then, in processed-logit space, scaled per
    position by the neighbour scale: r' = r * exp(g(f)), f = `neighbour_features` of the processed centre and the
    tokens left of and above the position, g a small MLP (`inter_head.neighbour.*`, `neighbour_hidden` wide)
    whose output layer starts at zero, so an untrained g leaves the box as it was (our addition, see METHOD.md s.2
    and docs/MODEL_CARD.md: h alone does not tell the one-layer device whether it is continuing a flat region).

    The centre half is the model's own output projection (`GPT.output`), so a device model's backbone stays a
    plain LlamaGen state dict and only `inter_head.*` is new. With `hidden` > 0 (an experiment, off in the
    shipped model) h first passes a residual SiLU MLP of that width, h + W_2 silu(W_1 h), whose output layer starts
    at zero: the head starts as the linear one and gains capacity (`inter_head.mlp.*`).
    """

    def __init__(self, dim: int, vocab_size: int, init_radius: float = 0.1, hidden: int = 0,
                 neighbour_hidden: int = 32) -> None:
        super().__init__()
        self.neighbour = nn.Sequential(nn.Linear(NEIGHBOUR_FEATURES, neighbour_hidden), nn.SiLU(),
                                       nn.Linear(neighbour_hidden, 1))
        nn.init.zeros_(self.neighbour[2].weight)
        nn.init.zeros_(self.neighbour[2].bias)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)) if hidden else None
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.radius = nn.Linear(dim, vocab_size, bias=True)
        nn.init.normal_(self.radius.weight, std=0.02 / dim**0.5)
        nn.init.constant_(self.radius.bias, float(torch.log(torch.expm1(torch.tensor(init_radius)))))

    def pre_radius(self, hidden: Tensor) -> Tensor:
        """W_r h + b (h through the MLP first, where there is one): the radius before its softplus, float32."""
        if self.mlp is not None:
            hidden = hidden + self.mlp(hidden)
        return self.radius(hidden).float()

    def forward(self, hidden: Tensor) -> Tensor:
        return softplus(self.pre_radius(hidden))

    def scale(self, centre: Tensor, radius: Tensor, neighbours: Tensor) -> Tensor:
        """The neighbour-scaled radius of the processed box (centre, radius) (..., V); neighbours (..., 2)."""
        return radius * torch.exp(self.neighbour(neighbour_features(centre.detach(), neighbours)))
