"""The emulated device-cloud link: round-trip time and bandwidth, and what each message costs on the wire.

Message sizes follow the binary layout of the wire protocol (docs/PROTOCOL.md): a fixed
header, token ids as uint16, the draft's sparse distribution as top-k (uint16 id, fp16 prob) pairs, interval
features as fp16. Time is charged, not slept: the engine adds it to a simulated clock.
"""
from __future__ import annotations

from dataclasses import dataclass

from ciar.cloud_bridge.protocol import HEADER_BYTES, ws_frame_bytes

TOKEN_BYTES = 2  # uint16 ids
PROB_BYTES = 2  # fp16
FEATURE_BYTES = 2  # fp16 per feature value


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rtt_s: float
    bandwidth_bps: float  # bits per second, each direction

    def transfer_s(self, n_bytes: int) -> float:
        return 8.0 * n_bytes / self.bandwidth_bps

    def request_s(self, up_bytes: int, down_bytes: int) -> float:
        """One request/response: a round trip plus serialisation both ways."""
        return self.rtt_s + self.transfer_s(up_bytes) + self.transfer_s(down_bytes)


LINKS = {
    "lan": LinkProfile("lan", 0.001, 1e9),
    "wifi": LinkProfile("wifi", 0.010, 100e6),
    "4g": LinkProfile("4g", 0.050, 20e6),
}


def verify_request_bytes(n_tokens: int, n_drafts: int, q_support: int, feature_dim: int) -> int:
    """Tokens accepted since the last sync plus the drafts, each with its interval features; each draft with its
    sparse q (only the support of q: exact, since q is zero elsewhere). Protocol Verify, websocket framed."""
    frame = HEADER_BYTES + 10 + (n_tokens + n_drafts) * (TOKEN_BYTES + feature_dim * FEATURE_BYTES) + \
        n_drafts * (2 + q_support * (TOKEN_BYTES + PROB_BYTES))
    return frame + ws_frame_bytes(frame, client=True)


def verdict_bytes() -> int:
    """Number of drafts kept and the next token (a correction or the bonus)."""
    frame = HEADER_BYTES + 4
    return frame + ws_frame_bytes(frame, client=False)


def open_bytes(caption_bytes: int) -> int:
    frame = HEADER_BYTES + 46 + caption_bytes
    return frame + ws_frame_bytes(frame, client=True)


def tokens_bytes(n_tokens: int) -> int:
    """Opened: the prefix (or, for the cloud-only base, every token) coming down."""
    frame = HEADER_BYTES + 4 + n_tokens * TOKEN_BYTES
    return frame + ws_frame_bytes(frame, client=False)
