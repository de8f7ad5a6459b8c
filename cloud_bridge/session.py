"""What a device session asks of the cloud and what the cloud answers, in the device's terms (torch-free). The
runtime's `Verifier` protocol speaks these; the bridge client turns them into protocol frames."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionParams:
    caption: str
    seed: int
    num_tokens: int
    prefix_tokens: int
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    feature_dim: int = 0  # width of the interval features the device uploads (0: none)


@dataclass(frozen=True)
class Verdict:
    n_accepted: int  # drafts the cloud kept (0 or 1 for one draft)
    next_token: int | None  # the token after them (a correction or the bonus), None past the last position
    verified: bool = True  # False when the cloud could not be reached and the draft was kept locally
