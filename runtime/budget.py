"""The per-image cloud-call budget (torch-free): the engine's methods and the device runtime hold it alike."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class BudgetController:
    """An image's cloud calls per token: held near `target_rate` (a target), or never over it (`cap`, a ceiling).

    Cloud calls count as METHOD.md section 8 counts them: one per cloud forward, the prefix's included. `reserve`
    takes the prefix's forwards off the image's budget; from there `update(sent, positions)` compares the rate of
    verifications over all positions decoded after the prefix with what the budget leaves per position, raising
    tau while the image has sent too many and lowering it while too few. The rate is the image's so far, not a
    recent window's, so the scores still decide where in the image the budget goes: a controller held to an even
    spend per 8 positions sent as many but in the wrong places (300 prompts: adherence 0.80 vs 0.91,
    docs/BENCHMARKS.md section 3). Without a prefix the allowance is the target.

    A ceiling (`BudgetController.capped(tau, cap)`, `ceiling=True`) does not steer: tau stays where calibration put
    it until the image has made every cloud call `cap` allows (`reserve` counts the cloud's prefill forward and the
    prefix's), then goes to infinity, and nothing more is sent. An image under the cap is the image of tau fixed;
    none spends more. (A cap that also raised tau by the rate so far, as the target controller does, spent fewer
    calls for worse images: BENCHMARKS section 3m.)
    """

    tau: float
    target_rate: float
    gain: float = 0.05
    ceiling: bool = False  # a cap: tau fixed, no verification past the image's budget
    allowance: float = field(init=False)  # verifications per position after the prefix
    limit: int | None = field(init=False, default=None)  # a ceiling's verifications per image (set by `reserve`)

    @classmethod
    def capped(cls, tau: float, cap: float) -> "BudgetController":
        """A ceiling of `cap` cloud calls per token at a fixed `tau`."""
        return cls(tau, cap, ceiling=True)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"target_rate must be in [0, 1], got {self.target_rate}")
        self.allowance = self.target_rate

    def reserve(self, prefix: int, total: int) -> None:
        """The cloud writes `prefix` of the image's `total` tokens, one forward each, out of the budget. A ceiling
        also takes the cloud's prefill forward off the verifications it allows (tau is infinite if none are left)."""
        if not 0 <= prefix < total:
            raise ValueError(f"need 0 <= prefix < total, got prefix={prefix}, total={total}")
        self.allowance = min(1.0, max(0.0, (self.target_rate * total - prefix) / (total - prefix)))
        if self.ceiling:
            self.limit = max(0, math.floor(self.target_rate * total + 1e-9) - 1 - prefix)
            if not self.limit:
                self.tau = math.inf

    def update(self, sent: int, positions: int) -> float:
        """`sent` verifications over the first `positions` positions after the prefix -> the new tau."""
        if self.ceiling:
            if self.limit is not None and sent >= self.limit:
                self.tau = math.inf  # the image's budget is spent
        elif positions and self.tau > 0 and math.isfinite(self.tau):
            error = (sent / positions - self.allowance) / max(self.allowance, 1e-3)
            self.tau = self.tau * math.exp(min(self.gain * error, 50.0))
        return self.tau
