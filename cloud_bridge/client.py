"""The device's cloud client (torch-free: numpy + websockets): the runtime's `Verifier` over the wire protocol.

    client = BridgeClient(ClientConfig("ws://127.0.0.1:8765", token="..."))
    DeviceGenerator(bundle, backend).generate(prompt, seed, tau, verifier=client)

Faults never stop the image: a dropped connection is re-dialled with exponential backoff and the session resumed
by sequence number (the in-flight Verify is re-sent byte for byte, so the server answers it once); a cloud that
is unreachable, refuses, or answers later than `timeout_s` is left behind and the device keeps its drafts
(`verified=False`: the stats count them as never verified). A later Verify tries the cloud again after the
backoff, in a new session that is told every token so far.
"""
from __future__ import annotations

import logging
import ssl
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from . import protocol as pr
from .session import Chain, SessionParams, Verdict, Verifier

log = logging.getLogger("ciar.cloud_bridge.client")


class BridgeError(RuntimeError):
    """The cloud refused this client for good (bad token, no common version, a protocol error)."""


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str = ""
    timeout_s: float = 5.0  # a Verdict later than this: leave the cloud behind for this request
    connect_timeout_s: float = 3.0
    retries: int = 3  # reconnect attempts before going local
    backoff_s: float = 0.1  # first backoff; doubles per attempt, capped at max_backoff_s
    max_backoff_s: float = 2.0
    client_name: str = "ciar-device"
    cafile: str | None = None  # wss:// with a private CA


@dataclass
class ClientStats:
    sessions: int = 0
    verify_requests: int = 0
    verified: int = 0
    unverified: int = 0
    timeouts: int = 0
    reconnects: int = 0
    resumed: int = 0
    retries: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    offline_reason: str | None = None
    verify_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        ms = np.asarray(self.verify_ms) if self.verify_ms else None
        d = {k: v for k, v in vars(self).items() if k != "verify_ms"}
        d["verify_ms_p50"] = float(np.percentile(ms, 50)) if ms is not None else None
        d["verify_ms_p95"] = float(np.percentile(ms, 95)) if ms is not None else None
        return d


# ------------------------------------------------------------------------- messages from the runtime's calls
def open_message(params: SessionParams, limits: pr.Limits, prefix_tokens: int | None = None) -> pr.Open:
    """The Open for a runtime session; interval features go up when both sides agree on their width."""
    use = params.feature_dim > 0 and params.feature_dim == limits.feature_dim
    return pr.Open(caption=params.caption, seed=params.seed, num_tokens=params.num_tokens,
                   prefix_tokens=params.prefix_tokens if prefix_tokens is None else prefix_tokens,
                   cfg_scale=params.cfg_scale, temperature=params.temperature, top_k=params.top_k,
                   top_p=params.top_p, use_interval_features=use)


def verify_message(session: int, seq: int, start: int, tokens: np.ndarray, features: np.ndarray | None,
                   chain: Chain, use_features: bool = True) -> pr.Verify:
    """A Verify: the accepted tokens since `start`, the chain's drafts with their sparse q, and the features of
    both (`features` None or `use_features` False: the session takes none)."""
    q = tuple(pr.SparseQ(np.asarray(ids), np.maximum(np.asarray(probs, np.float64), pr.FP16_TINY))
              for ids, probs in zip(chain.q_ids, chain.q_probs))
    feats = None
    if features is not None and use_features:
        chain_features = np.asarray(chain.features, np.float32)
        feats = np.concatenate([np.asarray(features, np.float32).reshape(len(tokens), chain_features.shape[1]),
                                chain_features])
    return pr.Verify(session=session, seq=seq, start=start, tokens=np.asarray(tokens),
                     drafts=np.asarray(chain.drafts, np.int64), q=q, features=feats)


class _Refused(Exception):
    """An Error frame from the server."""

    def __init__(self, error: pr.Error) -> None:
        super().__init__(f"{error.code.name}: {error.text}")
        self.error = error


@dataclass
class _Pending:
    """A Verify sent (or, with the cloud left behind, not sent) whose Verdict the device has not read yet."""
    start: int
    tokens: np.ndarray
    features: np.ndarray
    chain: Chain
    t0: float
    msg: pr.Verify | None = None  # None: no session, the device keeps its drafts
    frame: bytes = b""
    sent: bool = False


class BridgeClient(Verifier):
    """One image at a time: `open`, `submit` and `result` per uncertain chain of drafts, `close` (the runtime's
    Verifier). The device drafts on between `submit` and `result`: the Verdict waits in the socket."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.stats = ClientStats()
        self.ws = None
        self.limits: pr.Limits | None = None
        self.session = 0
        self.last_seq = 0
        self.params: SessionParams | None = None
        self.use_features = False
        self.known = np.zeros(0, np.int64)  # every token the cloud has decided or been told, from position 0
        self.known_features: list[np.ndarray] = []  # per known token: its features (zeros for cloud tokens)
        self.retry_at = 0.0  # offline: when to try the cloud again
        self.failures = 0

    # ---- the wire --------------------------------------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        self.ws.send(frame)
        self.stats.bytes_up += len(frame) + pr.ws_frame_bytes(len(frame), client=True)

    def _recv(self, timeout: float) -> pr.Message:
        frame = self.ws.recv(timeout=timeout)
        self.stats.bytes_down += len(frame) + pr.ws_frame_bytes(len(frame), client=False)
        msg = pr.decode(frame, self.limits or pr.Limits())
        if isinstance(msg, pr.Error):
            raise _Refused(msg)
        return msg

    def _dial(self) -> None:
        """Connect and say Hello; sets the server's limits."""
        from websockets.sync.client import connect
        self._drop()
        context = None
        if self.config.url.startswith("wss://"):
            context = ssl.create_default_context(cafile=self.config.cafile)
        self._conn = ExitStack()  # a long-lived connection: closed by _drop
        self.ws = self._conn.enter_context(connect(self.config.url, open_timeout=self.config.connect_timeout_s,
                                                   close_timeout=1.0, max_size=None, ssl=context, compression=None))
        self._send(pr.Hello(auth_token=self.config.token, client=self.config.client_name).encode())
        try:
            welcome = self._recv(self.config.timeout_s)
        except _Refused as e:
            raise BridgeError(f"the cloud refused this client: {e}") from None
        if not isinstance(welcome, pr.Welcome):
            raise BridgeError(f"expected Welcome, got {type(welcome).__name__}")
        self.limits = welcome.limits

    def _drop(self) -> None:
        if self.ws is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail in many ways; it is gone anyway
                pass
            self.ws = None

    def _go_local(self, reason: str) -> None:
        log.warning("cloud left behind: %s", reason)
        self._drop()
        self.session = 0
        self.stats.offline_reason = reason
        self.failures += 1
        delay = min(self.config.backoff_s * 2 ** (self.failures - 1), self.config.max_backoff_s)
        self.retry_at = time.monotonic() + delay

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(self.config.backoff_s * 2 ** attempt, self.config.max_backoff_s))

    # ---- the Verifier protocol ---------------------------------------------------------------------------------
    def open(self, params: SessionParams) -> np.ndarray:
        self.params, self.last_seq, self.session, self.failures = params, 0, 0, 0
        self.known, self.known_features = np.zeros(0, np.int64), []
        self.stats.offline_reason = None
        try:
            prefix = self._open_session(params.prefix_tokens)
        except (OSError, TimeoutError, pr.ProtocolError, _Refused, BridgeError) as e:
            self._go_local(f"open failed: {e}")
            return np.zeros(0, np.int64)
        except Exception as e:  # websockets.ConnectionClosed and friends
            self._go_local(f"open failed: {type(e).__name__}: {e}")
            return np.zeros(0, np.int64)
        self._learn(prefix, None)
        return prefix

    def _open_session(self, prefix_tokens: int) -> np.ndarray:
        self._dial()
        msg = open_message(self.params, self.limits, prefix_tokens)
        self.use_features = msg.use_interval_features
        self._send(msg.encode())
        # the cloud writes the prefix: one forward per token, so allow for it
        opened = self._recv(self.config.timeout_s + 0.05 * prefix_tokens)
        if not isinstance(opened, pr.Opened):
            raise BridgeError(f"expected Opened, got {type(opened).__name__}")
        self.session, self.last_seq = opened.session, 0
        self.stats.sessions += 1
        return opened.tokens.astype(np.int64)

    def _learn(self, tokens: np.ndarray, features: np.ndarray | None) -> None:
        self.known = np.concatenate([self.known, np.asarray(tokens, np.int64)])
        width = self.params.feature_dim
        for i in range(len(tokens)):
            self.known_features.append(features[i] if features is not None else np.zeros(width, np.float32))

    def submit(self, start, tokens, features, chain: Chain) -> _Pending:
        """Send the Verify and return at once; `result` waits for its Verdict. A send that fails is not an error
        here: `result` re-dials, resumes the session and sends the same frame again."""
        self.stats.verify_requests += 1
        p = _Pending(start, np.asarray(tokens, np.int64), np.asarray(features, np.float32), chain,
                     time.perf_counter())
        if not self.session:
            if time.monotonic() < self.retry_at:
                return p  # the cloud is left behind: result() keeps the drafts
            # back after an outage: a new session without prefix, told every token so far
            try:
                self._open_session(0)
            except Exception as e:  # noqa: BLE001 - any failure to reach the cloud means: keep going locally
                self._go_local(f"reopen failed: {type(e).__name__}: {e}")
                return p
            p.tokens = np.concatenate([self.known[:start], p.tokens])
            p.features = np.concatenate([np.stack(self.known_features[:start]).reshape(start, -1)
                                         if start else np.zeros((0, p.features.shape[1]), np.float32), p.features])
            p.start = 0
        p.msg = verify_message(self.session, self.last_seq + 1, p.start, p.tokens, p.features, chain,
                               self.use_features)
        p.frame = p.msg.encode()
        try:
            self._send(p.frame)
            p.sent = True
        except Exception:  # noqa: BLE001 - a dropped connection: result() re-dials and re-sends
            self._drop()
        return p

    def settled(self, pending: _Pending) -> bool:
        return pending.msg is None  # the cloud is left behind: the drafts are kept

    def result(self, pending: _Pending) -> Verdict:
        verdict = self._await(pending)
        if verdict.verified:
            self.stats.verified += 1
            self.stats.verify_ms.append(1000 * (time.perf_counter() - pending.t0))
        else:
            self.stats.unverified += 1
        return verdict

    def _await(self, p: _Pending) -> Verdict:
        kept = Verdict.kept_locally(p.chain)  # the cloud is left behind
        if p.msg is None:
            return kept
        for attempt in range(self.config.retries + 1):
            try:
                if self.ws is None:
                    self._resume()
                    p.sent = False
                if not p.sent:
                    self._send(p.frame)
                    p.sent = True
                reply = self._recv(self.config.timeout_s)
                if not isinstance(reply, pr.Verdict) or reply.seq != p.msg.seq or reply.n_accepted > len(p.chain):
                    raise BridgeError(f"unexpected reply {type(reply).__name__} to Verify seq {p.msg.seq}")
                break
            except TimeoutError:
                self.stats.timeouts += 1
                self._go_local(f"no Verdict within {self.config.timeout_s} s")
                return kept
            except _Refused as e:
                if not e.error.code.retryable or attempt == self.config.retries:
                    self._go_local(f"refused: {e}")
                    return kept
                self.stats.retries += 1
                p.sent = False
                self._backoff(attempt)
            except (BridgeError, pr.ProtocolError) as e:
                self._go_local(str(e))
                return kept
            except Exception as e:  # noqa: BLE001 - a dropped connection (ConnectionClosed, OSError): re-dial
                if attempt == self.config.retries:
                    self._go_local(f"connection lost: {type(e).__name__}: {e}")
                    return kept
                self._drop()
                self._backoff(attempt)
        else:  # pragma: no cover - the loop always breaks or returns
            raise AssertionError
        self.last_seq = p.msg.seq
        self.failures = 0
        a, nxt, chain = reply.n_accepted, reply.next_token, p.chain
        decided = np.concatenate([p.tokens, chain.drafts[:a], [] if nxt is None else [nxt]]).astype(np.int64)
        feats = np.concatenate([p.features, np.asarray(chain.features, np.float32)[:a],
                                np.zeros((int(nxt is not None), p.features.shape[1]), np.float32)])
        self.known = np.concatenate([self.known[:p.start], decided])
        self.known_features = self.known_features[:p.start] + list(feats)
        return Verdict(a, nxt, verified=True)

    def _resume(self) -> None:
        """Re-dial and resume the session; the caller then re-sends its in-flight Verify unchanged."""
        self.stats.reconnects += 1
        self._dial()
        self._send(pr.Resume(session=self.session, last_seq=self.last_seq).encode())
        resumed = self._recv(self.config.timeout_s)
        if not isinstance(resumed, pr.Resumed):
            raise BridgeError(f"expected Resumed, got {type(resumed).__name__}")
        self.stats.resumed += 1

    def close(self) -> None:
        if self.ws is not None and self.session:
            try:
                self._send(pr.Close(session=self.session, reason="image complete").encode())
            except Exception:  # noqa: BLE001 - the session times out on the server anyway
                pass
        self._drop()
        self.session = 0

