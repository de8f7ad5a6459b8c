"""The Inter-DRO loss (METHOD.md section 5): fit the device's interval to the cloud's processed distribution.

L = [anchor(p_mid) + align] + anchor(p_up) + [anchor(p_lo) + lo_dro]
anchor(p) = lambda_v * ||p - p_cloud||_1 + lambda_p * CE(p_cloud, norm(p))
align     = lambda_beta * KL(p_cloud || p_mid)
lo_dro    = sum_n w_n CE_n(p_cloud, norm(p_lo)),  w = softmax(alpha * CE) over the batch, detached.
coverage  = lambda_cov * sum_i [relu(p_cloud_i - p_up_i) + relu(p_lo_i - p_cloud_i)]   (our addition, see below)
width     = lambda_width * (log(Omega + eps) - log(TV(p_mid, p_cloud) + eps))^2, TV detached   (our addition)
rank      = lambda_rank * mean over pairs (i disagrees, j agrees) of softplus(log U_j - log U_i)      (our addition)

Why the coverage term: with ONE radius per token the box is symmetric, and the anchors of the two bounds pull the
radius in opposite directions. Where p_cloud lies outside [p_lo, p_up], widening moves p_up towards it exactly as
fast (to first order) as it moves p_lo away, so the anchor L1 and CE terms give the radius no net gradient; where
p_cloud lies inside, the two L1 terms add up to the width p_up - p_lo and shrink it. The paper's sum therefore
closes the box (measured: the v0 radius never opened and U ranked below the device's entropy). The coverage term
penalises only the violations, so the radius widens where the centre misses the cloud until the box covers it,
against the anchors' width cost (lambda_cov > lambda_v makes covering worth its width). lambda_cov = 0 is the
paper's loss; tests/test_training.py measures both gradients.

Why the width term: the gate needs the box to be wide where the cloud would reject the device's token. The
total-variation distance TV(p_mid, p_cloud) = ||p_mid - p_cloud||_1 / 2 is exactly the probability that speculative
sampling rejects a draft from p_mid, so the width term regresses the box's volume Omega (in log space, so that
0.001 vs 0.01 matters as much as 0.1 vs 1) onto it. The target is detached, so the term cannot lower itself by moving
the centre towards or away from the cloud; it sizes the box. lambda_width = 0 is the paper's loss.

Why the rank term (shipped since v3.1): the gate compares U itself, and U = Omega * Sigma, not Omega. The rank term
is a pairwise logistic (RankNet-style) surrogate of U's AUROC within the batch: every position where the device's
argmax differs from the cloud's should score a larger U than every position where they agree. It is scale-free
(only log-U differences count), so it orders the boxes without asking for any particular width, and it acts on U
exactly as the exported graph computes it. The label is the cloud's argmax, which the training step already has.
lambda_rank = 0 is the paper's loss. `docs/MODEL_CARD.md` has the ablation (width and rank terms on the v3 cloud).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ciar.models.interval import u_score


@dataclass(frozen=True)
class InterDROConfig:
    lambda_v: float = 1.0
    lambda_p: float = 1.0
    lambda_beta: float = 1.0
    alpha: float = 1.0
    use_align: bool = True
    use_dro: bool = True
    lambda_cov: float = 0.0  # 0: the paper's loss exactly
    lambda_width: float = 0.0  # 0: the paper's loss exactly
    width_eps: float = 1e-4
    lambda_rank: float = 0.0  # 0: the paper's loss exactly


def _cross_entropy(p_target: Tensor, log_q: Tensor) -> Tensor:
    """Per-row CE(p_target, q) = -sum p log q, with 0 * log 0 = 0."""
    return -(p_target * log_q.clamp_min(-1e4)).sum(-1)


def _anchor(log_p: Tensor, p_cloud: Tensor, cfg: InterDROConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (anchor loss per row, CE per row against the normalised p, L1 distance ||p - p_cloud||_1 per row)."""
    l1 = (log_p.exp() - p_cloud).abs().sum(-1)
    ce = _cross_entropy(p_cloud, log_p - torch.logsumexp(log_p, -1, keepdim=True))
    return cfg.lambda_v * l1 + cfg.lambda_p * ce, ce, l1


def rank_loss(u: Tensor, disagree: Tensor) -> Tensor | None:
    """The rank term: mean over (disagreeing i, agreeing j) pairs of softplus(log U_j - log U_i), a pairwise
    surrogate of U's AUROC for `disagree` (N,) bool. None when the batch has only one class. The pairs take
    N_dis x N_agree floats: 1M for a batch of 2048 positions."""
    if not disagree.any() or disagree.all():
        return None
    log_u = torch.log(u.clamp_min(1e-30))
    return F.softplus(-(log_u[disagree][:, None] - log_u[~disagree][None, :])).mean()


def inter_dro_loss(log_p_lo: Tensor, log_p_mid: Tensor, log_p_up: Tensor, p_cloud: Tensor,
                   cfg: InterDROConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """All inputs (N, V); returns the scalar loss and its detached parts (means over rows)."""
    mid, _, l1_mid = _anchor(log_p_mid, p_cloud, cfg)
    up, _, _ = _anchor(log_p_up, p_cloud, cfg)
    lo, ce_lo, _ = _anchor(log_p_lo, p_cloud, cfg)
    parts = {"anchor_mid": mid.mean(), "anchor_up": up.mean(), "anchor_lo": lo.mean()}
    loss = parts["anchor_mid"] + parts["anchor_up"] + parts["anchor_lo"]
    if cfg.use_align:
        log_cloud = torch.log(p_cloud.clamp_min(1e-30))
        parts["align"] = cfg.lambda_beta * (p_cloud * (log_cloud - log_p_mid)).sum(-1).mean()
        loss = loss + parts["align"]
    if cfg.lambda_cov:
        violation = (p_cloud - log_p_up.exp()).clamp_min(0) + (log_p_lo.exp() - p_cloud).clamp_min(0)
        parts["coverage"] = cfg.lambda_cov * violation.sum(-1).mean()
        loss = loss + parts["coverage"]
    if cfg.lambda_width or cfg.lambda_rank:
        u, omega, _ = u_score(log_p_lo.exp(), log_p_up.exp())
    if cfg.lambda_width:
        tv = 0.5 * l1_mid.detach()  # TV(p_mid, p_cloud): half the mid anchor's L1
        gap = torch.log(omega + cfg.width_eps) - torch.log(tv + cfg.width_eps)
        parts["width"] = cfg.lambda_width * gap.square().mean()
        loss = loss + parts["width"]
    if cfg.lambda_rank:
        rank = rank_loss(u, log_p_mid.argmax(-1) != p_cloud.argmax(-1))
        if rank is not None:
            parts["rank"] = cfg.lambda_rank * rank
            loss = loss + parts["rank"]
    if cfg.use_dro:
        w = torch.softmax(cfg.alpha * ce_lo.detach(), dim=0)
        parts["lo_dro"] = (w * ce_lo).sum()
        loss = loss + parts["lo_dro"]
    return loss, {k: v.detach() for k, v in parts.items()}
