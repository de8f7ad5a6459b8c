"""The per-image cloud-call budget (torch-free): the engine's methods and the device runtime hold it alike."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class BudgetController:
    """Multiplicative tau controller holding an image's cloud calls per token near `target_rate`.

    Cloud calls count as METHOD.md section 8 counts them: one per cloud forward, the prefix's included. `reserve`
    takes the prefix's forwards off the image's budget; from there `update(sent, positions)` compares the rate of
    verifications over all positions decoded after the prefix with what the budget leaves per position, raising
    tau while the image has sent too many and lowering it while too few. The rate is the image's so far, not a
    recent window's, so the scores still decide where in the image the budget goes: a controller held to an even
    spend per 8 positions sent as many but in the wrong places (300 prompts: adherence 0.80 vs 0.91,
    docs/BENCHMARKS.md section 3). Without a prefix the allowance is the target.

    `min_tau` is the lowest tau the controller may set. At its start tau (`BudgetController.capped(tau, cap)`) the
    controller is a cap: it raises tau while an image spends more than `cap` and lets it fall back, never below
    where calibration put it, so an image that needs fewer verifications keeps its fewer (steered to the target, tau
    also falls through quiet stretches: at ~0.1 calls per token that cost 0.04 adherence, BENCHMARKS section 3l).
    """

    tau: float
    target_rate: float
    gain: float = 0.05
    min_tau: float = 0.0
    allowance: float = field(init=False)  # verifications per position after the prefix

    @classmethod
    def capped(cls, tau: float, cap: float) -> "BudgetController":
        """A ceiling of `cap` calls per token from `tau`: tau rises while the image is over it, never below `tau`."""
        return cls(tau, cap, min_tau=tau)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"target_rate must be in [0, 1], got {self.target_rate}")
        self.allowance = self.target_rate

    def reserve(self, prefix: int, total: int) -> None:
        """The cloud writes `prefix` of the image's `total` tokens, one forward each, out of the budget."""
        if not 0 <= prefix < total:
            raise ValueError(f"need 0 <= prefix < total, got prefix={prefix}, total={total}")
        self.allowance = min(1.0, max(0.0, (self.target_rate * total - prefix) / (total - prefix)))

    def update(self, sent: int, positions: int) -> float:
        """`sent` verifications over the first `positions` positions after the prefix -> the new tau."""
        if positions and self.tau > 0 and math.isfinite(self.tau):
            error = (sent / positions - self.allowance) / max(self.allowance, 1e-3)
            self.tau = max(self.min_tau, self.tau * math.exp(min(self.gain * error, 50.0)))
        return self.tau
