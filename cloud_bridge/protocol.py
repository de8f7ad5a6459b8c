"""The ciar wire protocol: binary websocket frames between the device and the cloud bridge (docs/PROTOCOL.md).

Torch-free (numpy + stdlib), no pickle, no JSON. A frame is a 22-byte little-endian header and a typed payload.
Every message is a frozen dataclass with `encode()`; `decode(frame, limits)` checks a frame completely and raises
nothing but `ProtocolError`. Checks that need no limits run when a message is built (so a bad message cannot be
encoded either); `Message.validate(limits)` adds the rest.
"""
from __future__ import annotations

import hashlib
import math
import operator
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Generic, NamedTuple, TypeVar

import numpy as np

MAGIC = b"CI"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER = struct.Struct("<2sBBHQII")  # magic, version, type, flags, session, seq, payload length
HEADER_BYTES = HEADER.size  # 22
NO_TOKEN = 0xFFFF  # "no next token" in a Verdict (the image is complete); never a valid id
PROB_TOLERANCE = 5e-3  # |sum(q) - 1| allowed: fp16 rounding of a full-vocabulary q stays below 2.5e-3
FP16_TINY = 2.0 ** -24  # the smallest positive fp16: a probability > 0 never rounds to 0 on the wire
U16, F16 = np.dtype("<u2"), np.dtype("<f2")
U16_MAX, U32_MAX, U64_MAX = 2 ** 16 - 1, 2 ** 32 - 1, 2 ** 64 - 1


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    OPEN = 3
    OPENED = 4
    VERIFY = 5
    VERDICT = 6
    RESUME = 7
    RESUMED = 8
    CLOSE = 9
    ERROR = 10


class ErrorCode(IntEnum):
    # the frame itself (raised by decode)
    BAD_VERSION = 1
    BAD_FRAME = 2
    TOO_LARGE = 3
    BAD_TOKEN = 4
    BAD_DISTRIBUTION = 5
    BAD_FEATURES = 6
    BAD_PARAMS = 7
    # the frame against the session's state (raised by the server)
    BAD_POSITION = 8
    BAD_SEQUENCE = 9
    UNEXPECTED = 10
    UNAUTHORIZED = 11
    UNKNOWN_SESSION = 12
    FOREIGN_SESSION = 13
    # the server
    RATE_LIMITED = 14
    BUSY = 15
    TIMEOUT = 16
    INTERNAL = 17

    @property
    def retryable(self) -> bool:
        """The same request may succeed later (after a backoff)."""
        return self in (ErrorCode.RATE_LIMITED, ErrorCode.BUSY, ErrorCode.TIMEOUT)


def ws_frame_bytes(payload: int, client: bool) -> int:
    """Websocket framing around one binary message (RFC 6455): 2 bytes, +2 or +8 for longer payloads, +4 mask
    on client frames."""
    extra = 0 if payload <= 125 else 2 if payload <= 65535 else 8
    return 2 + extra + (4 if client else 0)


class ProtocolError(ValueError):
    """The one exception of this module: a frame or message that breaks the protocol, with its error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


# ---------------------------------------------------------------------------------------------- value checks
def _int(value: object, lo: int, hi: int, what: str, code: ErrorCode = ErrorCode.BAD_FRAME) -> int:
    try:
        v = operator.index(value)  # type: ignore[call-overload]
    except TypeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} must be an integer") from None
    if not lo <= v <= hi:
        raise ProtocolError(code, f"{what} = {v} is outside [{lo}, {hi}]")
    return v


def _real(value: object, what: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"{what} must be a number") from None
    if not math.isfinite(v):
        raise ProtocolError(ErrorCode.BAD_PARAMS, f"{what} must be finite, got {v}")
    return v


def _utf8(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} must be a str")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} is not valid Unicode") from None
    if len(raw) > U16_MAX:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{what} is {len(raw)} bytes (at most {U16_MAX})")
    return raw


def _at_most(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{n} {what} (limit {limit})")


def _frozen(a: np.ndarray) -> np.ndarray:
    """`a` itself when already read-only (decoded from a frame), else a read-only copy."""
    if a.flags.writeable:
        a = a.copy()
        a.flags.writeable = False
    return a


def _as_array(value: object, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} is not an array") from None


def _ids(value: object, what: str) -> np.ndarray:
    """A read-only uint16 vector of token ids."""
    a = _as_array(value, what)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} must be a 1-D integer array")
    if a.size and (int(a.min()) < 0 or int(a.max()) > U16_MAX):
        raise ProtocolError(ErrorCode.BAD_TOKEN, f"{what} must be uint16 token ids")
    return _frozen(a.astype(U16, copy=False))


def _halves(value: object, ndim: int, what: str, code: ErrorCode) -> np.ndarray:
    """A read-only fp16 array (values too large for fp16 become inf, which the callers refuse)."""
    a = _as_array(value, what)
    if a.ndim != ndim or (a.size and a.dtype.kind not in "fiu"):
        raise ProtocolError(code, f"{what} must be a {ndim}-D real array")
    with np.errstate(over="ignore"):
        return _frozen(a.astype(F16, copy=False))


def _check_vocab(ids: np.ndarray, limits: Limits, what: str) -> None:
    if ids.size and int(ids.max()) >= limits.vocab_size:
        raise ProtocolError(ErrorCode.BAD_TOKEN, f"{what}: id {int(ids.max())} >= vocab size {limits.vocab_size}")


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# ---------------------------------------------------------------------------------------------------- limits
_LIMITS = struct.Struct("<IIHHHHHHH")


@dataclass(frozen=True)
class Limits:
    """What a peer accepts; the server announces its own in Welcome. Field order = wire order in Welcome."""

    max_frame_bytes: int = 8 << 20
    max_num_tokens: int = 4096  # image tokens per session (positions 0 .. max_num_tokens - 1)
    vocab_size: int = 16384  # token ids are < vocab_size <= 65535 (0xFFFF is NO_TOKEN)
    feature_dim: int = 0  # F of the interval features (a Verify carries F or 0 columns)
    max_verify_tokens: int = 4096  # accepted tokens in one Verify
    max_drafts: int = 16  # drafts (k) in one Verify
    max_q_support: int = U16_MAX  # support of one draft's sparse q (never more than vocab_size anyway)
    max_caption_bytes: int = 1024
    max_text_bytes: int = 4096  # auth token, client name, model name, close reason, error text

    def __post_init__(self) -> None:
        bounds = {"max_frame_bytes": (HEADER_BYTES, U32_MAX), "max_num_tokens": (1, U32_MAX),
                  "vocab_size": (2, U16_MAX), "max_drafts": (1, U16_MAX), "max_q_support": (1, U16_MAX)}
        for name, value in vars(self).items():
            lo, hi = bounds.get(name, (0, U16_MAX))
            _int(value, lo, hi, f"Limits.{name}", ErrorCode.BAD_PARAMS)

    def pack(self) -> bytes:
        return _LIMITS.pack(*vars(self).values())


# ---------------------------------------------------------------------------------------------------- frames
class Header(NamedTuple):
    type: MsgType
    session: int
    seq: int
    payload_bytes: int


def read_header(frame: object, limits: Limits) -> Header:
    """Check a frame's size and header (not its payload); the server uses it to address an Error reply."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.BAD_FRAME, "not a binary frame")
    size = memoryview(frame).nbytes
    if size > limits.max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {size} bytes (limit {limits.max_frame_bytes})")
    if size < HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame of {size} bytes is shorter than the header")
    magic, version, kind, flags, session, seq, length = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"version {version} (this peer speaks {VERSION})")
    if kind not in _TYPES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown message type {kind}")
    if flags:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"flags {flags:#06x}: none are defined in version {VERSION}")
    if length != size - HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"payload length {length} but {size - HEADER_BYTES} bytes follow")
    return Header(MsgType(kind), session, seq, length)


def decode(frame: object, limits: Limits) -> Message:
    """Parse and fully validate one frame. Raises only ProtocolError."""
    header = read_header(frame, limits)
    cls = _TYPES[header.type]
    ids: dict[str, int] = {}
    for name, value in (("session", header.session), ("seq", header.seq)):
        if name in cls.HEADER_FIELDS:
            ids[name] = value
        elif value:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{cls.__name__} frames carry {name} 0, got {value}")
    reader = _Reader(bytes(frame))  # type: ignore[arg-type]
    message = cls._parse(reader, ids)
    reader.end()
    message.validate(limits)
    return message


class _Reader:
    """Sequential little-endian reads over a payload; running short is BAD_FRAME."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, HEADER_BYTES

    def _take(self, n: int) -> int:
        if n > len(self.data) - self.pos:
            raise ProtocolError(ErrorCode.BAD_FRAME, "payload is truncated")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack_from(self.data, self._take(fmt.size))

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.data, dtype, count, self._take(count * dtype.itemsize))

    def text(self, what: str) -> str:
        (n,) = self.unpack(_LEN)
        raw = self.data[self._take(n):self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{what} is not valid UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{len(self.data) - self.pos} trailing bytes")


_LEN = struct.Struct("<H")


def _text(raw: bytes) -> bytes:
    return _LEN.pack(len(raw)) + raw


class Message:
    """Base of the message dataclasses. Equal messages have equal (canonical) encodings."""

    TYPE: ClassVar[MsgType]
    HEADER_FIELDS: ClassVar[tuple[str, ...]] = ()  # which of session, seq the header carries for this type

    def encode(self) -> bytes:
        payload = self._payload()
        ids = {name: getattr(self, name) for name in self.HEADER_FIELDS}
        return HEADER.pack(MAGIC, VERSION, self.TYPE, 0, ids.get("session", 0), ids.get("seq", 0),
                           len(payload)) + payload

    def _payload(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Message:
        raise NotImplementedError

    def validate(self, limits: Limits) -> None:
        """Checks against the receiver's limits (those without limits ran when the message was built)."""

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.encode() == other.encode()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.encode())


# -------------------------------------------------------------------------------------------------- messages
_VERSIONS = struct.Struct("<B")


@dataclass(frozen=True, eq=False, kw_only=True)
class Hello(Message):
    """Client -> server, first frame: bearer token, client name, protocol versions spoken (ascending)."""

    TYPE = MsgType.HELLO
    auth_token: str
    client: str
    versions: tuple[int, ...] = SUPPORTED_VERSIONS

    def __post_init__(self) -> None:
        _utf8(self.auth_token, "auth token")
        _utf8(self.client, "client name")
        try:
            versions = tuple(_int(v, 1, 255, "version", ErrorCode.BAD_VERSION) for v in self.versions)
        except TypeError:
            raise ProtocolError(ErrorCode.BAD_FRAME, "versions must be a sequence of integers") from None
        if not 1 <= len(versions) <= 255 or list(versions) != sorted(set(versions)):
            raise ProtocolError(ErrorCode.BAD_VERSION, "versions must be 1 to 255 distinct ascending numbers")
        _set(self, "versions", versions)

    def _payload(self) -> bytes:
        return (_text(self.auth_token.encode()) + _text(self.client.encode()) +
                _VERSIONS.pack(len(self.versions)) + bytes(self.versions))

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Hello:
        token, client = r.text("auth token"), r.text("client name")
        (n,) = r.unpack(_VERSIONS)
        return cls(auth_token=token, client=client, versions=tuple(r.array(np.dtype("u1"), n).tolist()))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.auth_token.encode()), limits.max_text_bytes, "bytes of auth token")
        _at_most(len(self.client.encode()), limits.max_text_bytes, "bytes of client name")


def choose_version(offered: tuple[int, ...]) -> int:
    """The highest version both sides speak (server side, on Hello)."""
    common = set(offered) & set(SUPPORTED_VERSIONS)
    if not common:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"no common version: offered {offered}, "
                                                   f"supported {SUPPORTED_VERSIONS}")
    return max(common)


_TIMEOUT = struct.Struct("<I")


@dataclass(frozen=True, eq=False, kw_only=True)
class Welcome(Message):
    """Server -> client, answers Hello: the server's limits, its session idle timeout, the cloud model's name."""

    TYPE = MsgType.WELCOME
    limits: Limits
    idle_timeout_ms: int
    model: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):
            raise ProtocolError(ErrorCode.BAD_FRAME, "limits must be a Limits")
        _set(self, "idle_timeout_ms", _int(self.idle_timeout_ms, 0, U32_MAX, "idle timeout"))
        _utf8(self.model, "model name")

    def _payload(self) -> bytes:
        return self.limits.pack() + _TIMEOUT.pack(self.idle_timeout_ms) + _text(self.model.encode())

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Welcome:
        limits = Limits(*r.unpack(_LIMITS))
        (timeout,) = r.unpack(_TIMEOUT)
        return cls(limits=limits, idle_timeout_ms=timeout, model=r.text("model name"))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.model.encode()), limits.max_text_bytes, "bytes of model name")


_OPEN = struct.Struct("<QdddIIHH")  # seed, cfg_scale, temperature, top_p, num_tokens, prefix_tokens, top_k, options
_OPT_FEATURES = 1


@dataclass(frozen=True, eq=False, kw_only=True)
class Open(Message):
    """Client -> server: start a session (one image). The cloud writes the first `prefix_tokens` itself."""

    TYPE = MsgType.OPEN
    caption: str
    seed: int
    num_tokens: int
    prefix_tokens: int = 0
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    use_interval_features: bool = True

    def __post_init__(self) -> None:
        _utf8(self.caption, "caption")
        _set(self, "seed", _int(self.seed, 0, U64_MAX, "seed", ErrorCode.BAD_PARAMS))
        num = _int(self.num_tokens, 1, U32_MAX, "num_tokens", ErrorCode.BAD_PARAMS)
        _set(self, "num_tokens", num)
        _set(self, "prefix_tokens", _int(self.prefix_tokens, 0, num, "prefix_tokens", ErrorCode.BAD_PARAMS))
        _set(self, "top_k", _int(self.top_k, 0, U16_MAX, "top_k", ErrorCode.BAD_PARAMS))
        for name in ("cfg_scale", "temperature", "top_p"):
            _set(self, name, _real(getattr(self, name), name))
        for name, ok in (("cfg_scale", self.cfg_scale >= 0), ("temperature", self.temperature >= 0),
                         ("top_p", 0 < self.top_p <= 1)):
            if not ok:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"{name} = {getattr(self, name)} is out of range")
        if not isinstance(self.use_interval_features, (bool, np.bool_)):
            raise ProtocolError(ErrorCode.BAD_PARAMS, "use_interval_features must be a bool")
        _set(self, "use_interval_features", bool(self.use_interval_features))

    def _payload(self) -> bytes:
        return _OPEN.pack(self.seed, self.cfg_scale, self.temperature, self.top_p, self.num_tokens,
                          self.prefix_tokens, self.top_k, _OPT_FEATURES if self.use_interval_features else 0) + \
            _text(self.caption.encode())

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Open:
        seed, cfg, temp, top_p, num, prefix, top_k, options = r.unpack(_OPEN)
        if options & ~_OPT_FEATURES:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown Open options {options:#06x}")
        return cls(caption=r.text("caption"), seed=seed, num_tokens=num, prefix_tokens=prefix, cfg_scale=cfg,
                   temperature=temp, top_k=top_k, top_p=top_p, use_interval_features=bool(options))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.caption.encode()), limits.max_caption_bytes, "bytes of caption")
        _at_most(self.num_tokens, limits.max_num_tokens, "image tokens")
        if self.top_k > limits.vocab_size:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"top_k {self.top_k} > vocab size {limits.vocab_size}")


_COUNT = struct.Struct("<I")


@dataclass(frozen=True, eq=False, kw_only=True)
class Opened(Message):
    """Server -> client, answers Open: the new session id (in the header) and the prefix tokens 0 .. m-1."""

    TYPE = MsgType.OPENED
    HEADER_FIELDS = ("session",)
    session: int
    tokens: np.ndarray

    def __post_init__(self) -> None:
        _set(self, "session", _int(self.session, 1, U64_MAX, "session"))
        _set(self, "tokens", _ids(self.tokens, "prefix tokens"))

    def _payload(self) -> bytes:
        return _COUNT.pack(len(self.tokens)) + self.tokens.tobytes()

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Opened:
        (n,) = r.unpack(_COUNT)
        return cls(**ids, tokens=r.array(U16, n))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.tokens), limits.max_num_tokens, "prefix tokens")
        _check_vocab(self.tokens, limits, "prefix tokens")


@dataclass(frozen=True, eq=False)
class SparseQ:
    """One draft's distribution q on its support: strictly ascending ids, fp16 probabilities in (0, 1] summing to 1
    within PROB_TOLERANCE; q is 0 elsewhere."""

    ids: np.ndarray
    probs: np.ndarray

    def __post_init__(self) -> None:
        ids, probs = _ids(self.ids, "q ids"), _halves(self.probs, 1, "q probabilities", ErrorCode.BAD_DISTRIBUTION)
        _set(self, "ids", ids)
        _set(self, "probs", probs)
        if len(ids) != len(probs) or not len(ids):
            raise ProtocolError(ErrorCode.BAD_DISTRIBUTION, f"{len(ids)} q ids and {len(probs)} probabilities")
        if np.any(np.diff(ids.astype(np.int32)) <= 0):
            raise ProtocolError(ErrorCode.BAD_DISTRIBUTION, "q ids must be strictly ascending (no duplicates)")
        p = probs.astype(np.float64)
        if not np.all((p > 0) & (p <= 1)):
            raise ProtocolError(ErrorCode.BAD_DISTRIBUTION, "q probabilities must be finite and in (0, 1]")
        if abs(p.sum() - 1.0) > PROB_TOLERANCE:
            raise ProtocolError(ErrorCode.BAD_DISTRIBUTION, f"q sums to {p.sum():.6f}, not 1")

    @classmethod
    def from_dense(cls, q: np.ndarray) -> SparseQ:
        """The support of a dense probability vector (entries > 0; tiny ones kept at the smallest fp16)."""
        q = np.asarray(q, dtype=np.float64)
        ids = np.flatnonzero(q > 0)
        return cls(ids, np.maximum(q[ids], FP16_TINY))

    def to_dense(self, vocab_size: int) -> np.ndarray:
        """The dense q (float64, renormalised to sum exactly 1); ids must be < vocab_size (decode checked)."""
        q = np.zeros(vocab_size)
        q[self.ids] = self.probs
        return q / q.sum()


_VERIFY = struct.Struct("<IHHH")  # start, n accepted, k drafts, F feature columns


@dataclass(frozen=True, eq=False, kw_only=True)
class Verify(Message):
    """Client -> server: the `tokens` the device accepted since the last sync (image positions start ..
    start+n-1), then k >= 1 `drafts` (positions start+n ..) each with the sparse q it was drawn from, and the
    interval features of all n + k positions as one (n + k, F) fp16 matrix (F = 0: none)."""

    TYPE = MsgType.VERIFY
    HEADER_FIELDS = ("session", "seq")
    session: int
    seq: int
    start: int
    tokens: np.ndarray
    drafts: np.ndarray
    q: tuple[SparseQ, ...]
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        _set(self, "session", _int(self.session, 1, U64_MAX, "session"))
        _set(self, "seq", _int(self.seq, 1, U32_MAX, "seq"))
        _set(self, "start", _int(self.start, 0, U32_MAX, "start", ErrorCode.BAD_POSITION))
        tokens, drafts = _ids(self.tokens, "tokens"), _ids(self.drafts, "drafts")
        _set(self, "tokens", tokens)
        _set(self, "drafts", drafts)
        _at_most(len(tokens), U16_MAX, "accepted tokens")
        if not 1 <= len(drafts) <= U16_MAX:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{len(drafts)} drafts (need 1 .. {U16_MAX})")
        self._check_q()
        self._check_features(len(tokens) + len(drafts))

    def _check_q(self) -> None:
        q = tuple(self.q) if isinstance(self.q, (tuple, list)) else ()
        if len(q) != len(self.drafts) or not all(isinstance(x, SparseQ) for x in q):
            raise ProtocolError(ErrorCode.BAD_FRAME, "need one SparseQ per draft")
        _set(self, "q", q)
        for i, (draft, dist) in enumerate(zip(self.drafts, q)):
            if not np.any(dist.ids == draft):
                raise ProtocolError(ErrorCode.BAD_DISTRIBUTION, f"draft {i} (token {draft}) is outside its q")

    def _check_features(self, rows: int) -> None:
        f = np.zeros((rows, 0)) if self.features is None else self.features
        f = _halves(f, 2, "features", ErrorCode.BAD_FEATURES)
        _set(self, "features", f)
        if f.shape[0] != rows:
            raise ProtocolError(ErrorCode.BAD_FEATURES, f"features have {f.shape[0]} rows, need n + k = {rows}")
        _at_most(f.shape[1], U16_MAX, "feature columns")
        if not np.isfinite(f).all():
            raise ProtocolError(ErrorCode.BAD_FEATURES, "features must be finite")

    def _payload(self) -> bytes:
        counts = np.array([len(x.ids) for x in self.q], U16)
        return b"".join([_VERIFY.pack(self.start, len(self.tokens), len(self.drafts), self.features.shape[1]),
                         self.tokens.tobytes(), self.drafts.tobytes(), counts.tobytes(),
                         *(x.ids.tobytes() for x in self.q), *(x.probs.tobytes() for x in self.q),
                         self.features.tobytes()])

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Verify:
        start, n, k, f = r.unpack(_VERIFY)
        tokens, drafts, counts = r.array(U16, n), r.array(U16, k), r.array(U16, k)
        ends = np.cumsum(counts, dtype=np.int64).tolist()
        q_ids, q_probs = r.array(U16, ends[-1] if k else 0), r.array(F16, ends[-1] if k else 0)
        q = tuple(SparseQ(q_ids[a:b], q_probs[a:b]) for a, b in zip([0] + ends[:-1], ends))
        features = r.array(F16, (n + k) * f).reshape(n + k, f)
        return cls(**ids, start=start, tokens=tokens, drafts=drafts, q=q, features=features)

    def validate(self, limits: Limits) -> None:
        n, k, f = len(self.tokens), len(self.drafts), self.features.shape[1]
        _at_most(n, limits.max_verify_tokens, "accepted tokens")
        _at_most(k, limits.max_drafts, "drafts")
        if f not in (0, limits.feature_dim):
            raise ProtocolError(ErrorCode.BAD_FEATURES, f"{f} feature columns (0 or {limits.feature_dim})")
        if self.start + n + k > limits.max_num_tokens:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"positions {self.start} .. {self.start + n + k - 1} "
                                                        f"past {limits.max_num_tokens} image tokens")
        _check_vocab(self.tokens, limits, "tokens")
        _check_vocab(self.drafts, limits, "drafts")
        for dist in self.q:
            _at_most(len(dist.ids), limits.max_q_support, "q support entries")
            _check_vocab(dist.ids, limits, "q ids")


_VERDICT = struct.Struct("<HH")


@dataclass(frozen=True, eq=False, kw_only=True)
class Verdict(Message):
    """Server -> client, answers Verify `seq`: the first `n_accepted` drafts stand, then `next_token` (the cloud's
    correction or bonus token; None when the image is complete)."""

    TYPE = MsgType.VERDICT
    HEADER_FIELDS = ("session", "seq")
    session: int
    seq: int
    n_accepted: int
    next_token: int | None

    def __post_init__(self) -> None:
        _set(self, "session", _int(self.session, 1, U64_MAX, "session"))
        _set(self, "seq", _int(self.seq, 1, U32_MAX, "seq"))
        _set(self, "n_accepted", _int(self.n_accepted, 0, U16_MAX, "n_accepted"))
        if self.next_token is not None:
            _set(self, "next_token", _int(self.next_token, 0, NO_TOKEN - 1, "next_token", ErrorCode.BAD_TOKEN))

    def _payload(self) -> bytes:
        return _VERDICT.pack(self.n_accepted, NO_TOKEN if self.next_token is None else self.next_token)

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Verdict:
        n, token = r.unpack(_VERDICT)
        return cls(**ids, n_accepted=n, next_token=None if token == NO_TOKEN else token)

    def validate(self, limits: Limits) -> None:
        _at_most(self.n_accepted, limits.max_drafts, "accepted drafts")
        if self.next_token is not None and self.next_token >= limits.vocab_size:
            raise ProtocolError(ErrorCode.BAD_TOKEN, f"next token {self.next_token} >= vocab {limits.vocab_size}")


_SEQ = struct.Struct("<I")


@dataclass(frozen=True, eq=False, kw_only=True)
class Resume(Message):
    """Client -> server after a reconnect: continue `session`; `last_seq` is the last Verdict the client got."""

    TYPE = MsgType.RESUME
    HEADER_FIELDS = ("session",)
    session: int
    last_seq: int

    def __post_init__(self) -> None:
        _set(self, "session", _int(self.session, 1, U64_MAX, "session"))
        _set(self, "last_seq", _int(self.last_seq, 0, U32_MAX, "last_seq"))

    def _payload(self) -> bytes:
        return _SEQ.pack(self.last_seq)

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Resume:
        (last,) = r.unpack(_SEQ)
        return cls(**ids, last_seq=last)


_RESUMED = struct.Struct("<III")  # next_seq, position, count


@dataclass(frozen=True, eq=False, kw_only=True)
class Resumed(Message):
    """Server -> client, answers Resume: the seq it expects next, and the final tokens from image position
    `position` on that the client has not been told (empty when it missed nothing)."""

    TYPE = MsgType.RESUMED
    HEADER_FIELDS = ("session",)
    session: int
    next_seq: int
    position: int
    tokens: np.ndarray

    def __post_init__(self) -> None:
        _set(self, "session", _int(self.session, 1, U64_MAX, "session"))
        _set(self, "next_seq", _int(self.next_seq, 1, U32_MAX, "next_seq"))
        _set(self, "position", _int(self.position, 0, U32_MAX, "position", ErrorCode.BAD_POSITION))
        _set(self, "tokens", _ids(self.tokens, "missed tokens"))

    def _payload(self) -> bytes:
        return _RESUMED.pack(self.next_seq, self.position, len(self.tokens)) + self.tokens.tobytes()

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Resumed:
        next_seq, position, n = r.unpack(_RESUMED)
        return cls(**ids, next_seq=next_seq, position=position, tokens=r.array(U16, n))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.tokens), limits.max_num_tokens, "missed tokens")
        if self.position + len(self.tokens) > limits.max_num_tokens:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"tokens run past {limits.max_num_tokens} image tokens")
        _check_vocab(self.tokens, limits, "missed tokens")


@dataclass(frozen=True, eq=False, kw_only=True)
class Close(Message):
    """Either way: end `session` (0: the whole connection). No reply."""

    TYPE = MsgType.CLOSE
    HEADER_FIELDS = ("session",)
    session: int = 0
    reason: str = ""

    def __post_init__(self) -> None:
        _set(self, "session", _int(self.session, 0, U64_MAX, "session"))
        _utf8(self.reason, "close reason")

    def _payload(self) -> bytes:
        return _text(self.reason.encode())

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Close:
        return cls(**ids, reason=r.text("close reason"))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.reason.encode()), limits.max_text_bytes, "bytes of close reason")


_CODE = struct.Struct("<H")


@dataclass(frozen=True, eq=False, kw_only=True)
class Error(Message):
    """Either way: the request (`session`, `seq`: 0 where unknown or not applicable) failed with `code`."""

    TYPE = MsgType.ERROR
    HEADER_FIELDS = ("session", "seq")
    code: ErrorCode
    text: str = ""
    session: int = 0
    seq: int = 0

    def __post_init__(self) -> None:
        code = _int(self.code, 0, U16_MAX, "error code")
        try:
            _set(self, "code", ErrorCode(code))
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown error code {code}") from None
        _utf8(self.text, "error text")
        _set(self, "session", _int(self.session, 0, U64_MAX, "session"))
        _set(self, "seq", _int(self.seq, 0, U32_MAX, "seq"))

    @classmethod
    def from_exception(cls, error: ProtocolError, session: int = 0, seq: int = 0) -> Error:
        return cls(code=error.code, text=error.message, session=session, seq=seq)

    def _payload(self) -> bytes:
        return _CODE.pack(self.code) + _text(self.text.encode())

    @classmethod
    def _parse(cls, r: _Reader, ids: dict[str, int]) -> Error:
        (code,) = r.unpack(_CODE)
        return cls(**ids, code=code, text=r.text("error text"))

    def validate(self, limits: Limits) -> None:
        _at_most(len(self.text.encode()), limits.max_text_bytes, "bytes of error text")


_TYPES: dict[int, type[Message]] = {cls.TYPE: cls for cls in
                                    (Hello, Welcome, Open, Opened, Verify, Verdict, Resume, Resumed, Close, Error)}


# ------------------------------------------------------------------------------------------ sequence numbers
R = TypeVar("R")


class SequenceTracker(Generic[R]):
    """Server-side sequence state of one session. Verify requests carry seq 1, 2, 3, ..., one in flight at a time.
    A seq is consumed by its Verdict only: a byte-identical retry gets that same Verdict again (so a retry never
    applies a request twice), while a request answered with an Error had no effect and its seq may come again."""

    def __init__(self) -> None:
        self.last = 0  # the last seq answered
        self._reply: R | None = None
        self._digest = b""  # of the last answered request frame
        self._pending: bytes | None = None  # digest of the request being processed

    @property
    def next_seq(self) -> int:
        return self.last + 1

    def check(self, seq: int, frame: bytes) -> R | None:
        """None: `seq` is new; process it, then `answer`. Otherwise the cached reply to send again (a retry).
        Raises BAD_SEQUENCE (out of order, or a 'retry' that differs) or BUSY (the same seq is in flight)."""
        digest = hashlib.blake2b(frame, digest_size=16).digest()
        if seq == self.last and self.last:
            if digest != self._digest:
                raise ProtocolError(ErrorCode.BAD_SEQUENCE, f"seq {seq} reused for a different request")
            return self._reply
        if seq != self.next_seq:
            raise ProtocolError(ErrorCode.BAD_SEQUENCE, f"seq {seq}, expected {self.next_seq}")
        if self._pending is not None:
            raise ProtocolError(ErrorCode.BUSY, f"seq {seq} is still being processed")
        self._pending = digest
        return None

    def answer(self, seq: int, reply: R) -> None:
        """Record the Verdict to the new request `seq` that `check` let through."""
        digest = self._let_through(seq)
        self.last, self._reply, self._digest = seq, reply, digest

    def release(self, seq: int) -> None:
        """The request `seq` that `check` let through failed (an Error was sent) and had no effect."""
        self._let_through(seq)

    def _let_through(self, seq: int) -> bytes:
        if self._pending is None or seq != self.next_seq:
            raise ProtocolError(ErrorCode.INTERNAL, f"seq {seq} was not let through by check")
        digest, self._pending = self._pending, None
        return digest

    def resume(self, last_seq: int) -> R | None:
        """On Resume: None if the client got every reply, else the one reply it missed (the last)."""
        if self._pending is not None:
            raise ProtocolError(ErrorCode.BUSY, f"seq {self.next_seq} is still being processed")
        if last_seq == self.last:
            return None
        if self.last and last_seq == self.last - 1:
            return self._reply
        raise ProtocolError(ErrorCode.BAD_SEQUENCE, f"client acknowledges seq {last_seq}, server answered "
                                                    f"{self.last}")
