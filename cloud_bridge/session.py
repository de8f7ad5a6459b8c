"""What a device session asks of the cloud and what the cloud answers, in the device's terms (torch-free). The
runtime's `Verifier` protocol speaks these; the bridge client turns them into protocol frames."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
class Chain:
    """The drafts one Verify carries: k consecutive device drafts, each with its sparse q and interval features."""
    drafts: np.ndarray  # (k,) int64
    q_ids: tuple[np.ndarray, ...]  # per draft: the token ids where its q is positive
    q_probs: tuple[np.ndarray, ...]  # per draft: q at those ids
    features: np.ndarray  # (k, F) float32

    def __post_init__(self) -> None:
        k = len(self.drafts)
        if k < 1 or len(self.q_ids) != k or len(self.q_probs) != k or len(self.features) != k:
            raise ValueError(f"a chain needs k >= 1 drafts with one q and one feature row each; got {k} drafts, "
                             f"{len(self.q_ids)} / {len(self.q_probs)} q and {len(self.features)} feature rows")

    def __len__(self) -> int:
        return len(self.drafts)


@dataclass(frozen=True)
class Verdict:
    n_accepted: int  # drafts the cloud kept (0..k for a chain of k)
    next_token: int | None  # the token after them (a correction or the bonus), None past the last position
    verified: bool = True  # False when the cloud could not be reached and the draft was kept locally

    @classmethod
    def kept_locally(cls, chain: Chain) -> Verdict:
        """No cloud to ask: the device keeps every draft of `chain`, unverified."""
        return cls(n_accepted=len(chain), next_token=None, verified=False)


class Verifier:
    """What the device loop asks of the cloud (the runtime's interface; `BridgeClient`, `DirectVerifier` and
    `LocalVerifier` implement it). A verification is asynchronous in shape: `submit` sends the request and returns
    at once with a handle, `result` waits for its verdict, so the device can draft on in between. One request is
    out at a time: the loop calls `result` before it submits again."""

    def open(self, params: SessionParams) -> np.ndarray:
        """Start a session; returns the prefix tokens the cloud wrote (possibly none)."""
        raise NotImplementedError

    def submit(self, start: int, tokens: np.ndarray, features: np.ndarray, chain: Chain) -> object:
        """`tokens` (n,) accepted on the device since the last sync, at positions start..start+n-1, with their
        interval features (n, F); then the chain of k drafts with their sparse distributions and features."""
        raise NotImplementedError

    def result(self, pending: object) -> Verdict:
        """The verdict on a submitted request."""
        raise NotImplementedError

    def settled(self, pending: object) -> bool:
        """Whether the verdict is already known without the cloud (offline: the drafts are kept), so that the
        device has nothing to wait for and no reason to draft ahead."""
        return False

    def verify(self, start: int, tokens: np.ndarray, features: np.ndarray, chain: Chain) -> Verdict:
        """Submit and wait: one verification, synchronously."""
        return self.result(self.submit(start, tokens, features, chain))

    def close(self) -> None:
        pass
