"""The emulated device-cloud link: round-trip time and bandwidth, and what each message costs on the wire.

Message sizes follow the binary layout of the wire protocol (docs/PROTOCOL.md once the bridge lands): a fixed
header, token ids as uint16, the draft's sparse distribution as top-k (uint16 id, fp16 prob) pairs, interval
features as fp16. Time is charged, not slept: the engine adds it to a simulated clock.
"""
from __future__ import annotations

from dataclasses import dataclass

HEADER_BYTES = 16  # version, type, session, sequence number, counts
TOKEN_BYTES = 2  # uint16 id (vocabularies up to 65536)
PROB_BYTES = 2  # fp16
FEATURE_BYTES = 2  # fp16 per feature value
WS_FRAME_BYTES = 6  # websocket framing (client frames carry a 4-byte mask)


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
    sparse q (only the support of q: exact, since q is zero elsewhere)."""
    per_token = TOKEN_BYTES + feature_dim * FEATURE_BYTES
    return WS_FRAME_BYTES + HEADER_BYTES + (n_tokens + n_drafts) * per_token + \
        n_drafts * q_support * (TOKEN_BYTES + PROB_BYTES)


def verdict_bytes(n_tokens: int) -> int:
    """Number of accepted drafts plus the tokens the cloud sampled (correction / bonus)."""
    return WS_FRAME_BYTES + HEADER_BYTES + 2 + n_tokens * TOKEN_BYTES


def prompt_bytes(n_caption_tokens: int) -> int:
    return WS_FRAME_BYTES + HEADER_BYTES + n_caption_tokens * TOKEN_BYTES


def tokens_bytes(n_tokens: int) -> int:
    return WS_FRAME_BYTES + HEADER_BYTES + n_tokens * TOKEN_BYTES
