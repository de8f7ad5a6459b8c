"""The wire protocol: round trips, the shared test vectors (byte for byte), hostile frames refused with the right
error code, fuzzing (nothing but ProtocolError escapes decode), sequence-number semantics, byte costs."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciar.cloud_bridge import protocol
from ciar.cloud_bridge.protocol import (HEADER_BYTES, Close, Error, ErrorCode, Hello, Limits, Message, MsgType, Open,
                                        Opened, ProtocolError, Resume, Resumed, SequenceTracker, SparseQ, Verdict,
                                        Verify, Welcome, choose_version, decode, read_header)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "protocol_vectors.json").read_text())
LIMITS = Limits(max_frame_bytes=4096, max_num_tokens=256, vocab_size=1024, feature_dim=4, max_verify_tokens=16,
                max_drafts=4, max_q_support=8, max_caption_bytes=64, max_text_bytes=64)
FUZZ = settings(max_examples=250, deadline=None, database=None)


# ----------------------------------------------------------------------------------------- raw frame builders
def frame(kind: int, payload: bytes, *, session: int = 0, seq: int = 0, magic: bytes = b"CI", version: int = 1,
          flags: int = 0, length: int | None = None) -> bytes:
    """A frame packed by hand, with no checks (so it can be wrong on purpose)."""
    n = len(payload) if length is None else length
    return struct.pack("<2sBBHQII", magic, version, kind, flags, session, seq, n) + payload


def u16(values) -> bytes:
    return np.asarray(values, dtype="<u2").tobytes()


def f16(values) -> bytes:
    return np.asarray(values, dtype=np.float64).astype("<f2").tobytes()


def text(raw: bytes) -> bytes:
    return struct.pack("<H", len(raw)) + raw


Q = (([3, 17, 1000], [0.25, 0.6875, 0.0625]), ([17], [1.0]))


def verify_frame(*, start=3, tokens=(1, 2, 3), drafts=(17, 17), q=Q, F=4, features=None, session=7, seq=1,
                 counts=None) -> bytes:
    """A Verify packed by hand: n tokens, k drafts, per-draft counts, ids, probs, (n + k) x F features."""
    rows = len(tokens) + len(drafts)
    features = np.arange(rows * F).reshape(rows, F) / 8 if features is None else features
    counts = [len(ids) for ids, _ in q] if counts is None else counts
    payload = (struct.pack("<IHHH", start, len(tokens), len(drafts), F) + u16(tokens) + u16(drafts) + u16(counts) +
               b"".join(u16(ids) for ids, _ in q) + b"".join(f16(p) for _, p in q) + f16(np.ravel(features)))
    return frame(MsgType.VERIFY, payload, session=session, seq=seq)


def open_frame(*, caption=b"a red circle", seed=5, cfg=4.0, temp=1.0, top_p=1.0, num=256, prefix=16, top_k=0,
               options=1) -> bytes:
    payload = struct.pack("<QdddIIHH", seed, cfg, temp, top_p, num, prefix, top_k, options) + text(caption)
    return frame(MsgType.OPEN, payload)


def hello_frame(*, token=b"t", client=b"c", versions=b"\x01", session=0) -> bytes:
    return frame(MsgType.HELLO, text(token) + text(client) + bytes([len(versions)]) + versions, session=session)


def with_byte(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1:]


def relength(data: bytes) -> bytes:
    """Fix the header's payload length after an edit (so the edit reaches the payload checks)."""
    return data[:18] + struct.pack("<I", len(data) - HEADER_BYTES) + data[22:]


GOOD = verify_frame()
BAD_LIMITS = struct.pack("<IIHHHHHHH", 4096, 256, 0, 4, 16, 4, 8, 64, 64)  # vocab_size 0
E, TL, TOK, DIST, FEAT, PAR = (ErrorCode.BAD_FRAME, ErrorCode.TOO_LARGE, ErrorCode.BAD_TOKEN,
                               ErrorCode.BAD_DISTRIBUTION, ErrorCode.BAD_FEATURES, ErrorCode.BAD_PARAMS)
MALFORMED: list[tuple[str, bytes, ErrorCode]] = [
    ("empty_frame", b"", E),
    ("truncated_header", GOOD[:HEADER_BYTES - 1], E),
    ("wrong_magic", b"XI" + GOOD[2:], E),
    ("wrong_version", with_byte(GOOD, 2, 2), ErrorCode.BAD_VERSION),
    ("unknown_type", with_byte(GOOD, 3, 99), E),
    ("nonzero_flags", with_byte(GOOD, 4, 1), E),
    ("payload_length_too_big", GOOD[:18] + struct.pack("<I", len(GOOD) - HEADER_BYTES + 1) + GOOD[22:], E),
    ("payload_length_too_small", GOOD[:18] + struct.pack("<I", len(GOOD) - HEADER_BYTES - 1) + GOOD[22:], E),
    ("truncated_payload", relength(GOOD[:-1]), E),
    ("trailing_bytes", relength(GOOD + b"\x00\x00"), E),
    ("oversized_frame", frame(MsgType.CLOSE, text(b"x" * 4100)), TL),
    ("token_id_ge_vocab", verify_frame(tokens=(1, 1024, 3)), TOK),
    ("draft_id_ge_vocab", verify_frame(drafts=(1024, 17), q=(([1024], [1.0]), ([17], [1.0]))), TOK),
    ("q_id_ge_vocab", verify_frame(q=(([17, 1024], [0.5, 0.5]), ([17], [1.0]))), TOK),
    ("negative_probability", verify_frame(q=(([3, 17], [-0.25, 1.25]), ([17], [1.0]))), DIST),
    ("nan_probability", verify_frame(q=(([3, 17], [math.nan, 1.0]), ([17], [1.0]))), DIST),
    ("inf_probability", verify_frame(q=(([3, 17], [math.inf, 1.0]), ([17], [1.0]))), DIST),
    ("zero_probability", verify_frame(q=(([3, 17], [0.0, 1.0]), ([17], [1.0]))), DIST),
    ("q_not_summing_to_1", verify_frame(q=(([3, 17], [0.25, 0.5]), ([17], [1.0]))), DIST),
    ("duplicate_q_ids", verify_frame(q=(([17, 17], [0.5, 0.5]), ([17], [1.0]))), DIST),
    ("unsorted_q_ids", verify_frame(q=(([17, 3], [0.5, 0.5]), ([17], [1.0]))), DIST),
    ("draft_outside_its_q", verify_frame(q=(([3, 4], [0.5, 0.5]), ([17], [1.0]))), DIST),
    ("empty_q_support", verify_frame(q=(([], []), ([17], [1.0]))), DIST),
    ("q_support_over_limit", verify_frame(q=((list(range(9, 18)), [1 / 9] * 9), ([17], [1.0]))), TL),
    ("zero_drafts", verify_frame(drafts=(), q=()), E),
    ("too_many_drafts", verify_frame(drafts=(17,) * 5, q=(([17], [1.0]),) * 5), TL),
    ("too_many_tokens", verify_frame(tokens=(1,) * 17), TL),
    ("feature_dim_mismatch", verify_frame(F=3), FEAT),
    ("nan_feature", verify_frame(features=np.full((5, 4), math.nan)), FEAT),
    ("feature_overflow_inf", verify_frame(features=np.full((5, 4), math.inf)), FEAT),
    ("position_overflow", verify_frame(start=252), ErrorCode.BAD_POSITION),
    ("verify_session_0", verify_frame(session=0), E),
    ("verify_seq_0", verify_frame(seq=0), E),
    ("bad_utf8_caption", open_frame(caption=b"caf\xc3"), E),
    ("caption_too_long", open_frame(caption=b"x" * 65), TL),
    ("num_tokens_over_limit", open_frame(num=257, prefix=0), TL),
    ("num_tokens_zero", open_frame(num=0, prefix=0), PAR),
    ("prefix_over_num_tokens", open_frame(num=16, prefix=17), PAR),
    ("nan_temperature", open_frame(temp=math.nan), PAR),
    ("negative_cfg_scale", open_frame(cfg=-1.0), PAR),
    ("top_p_zero", open_frame(top_p=0.0), PAR),
    ("top_k_over_vocab", open_frame(top_k=1025), PAR),
    ("unknown_open_option", open_frame(options=3), E),
    ("hello_with_session", hello_frame(session=5), E),
    ("hello_no_versions", hello_frame(versions=b""), ErrorCode.BAD_VERSION),
    ("hello_token_too_long", hello_frame(token=b"t" * 65), TL),
    ("welcome_bad_limits", frame(MsgType.WELCOME, BAD_LIMITS + struct.pack("<I", 1000) + text(b"")), PAR),
    ("opened_token_ge_vocab", frame(MsgType.OPENED, struct.pack("<I", 2) + u16([1, 1024]), session=1), TOK),
    ("opened_count_past_payload", frame(MsgType.OPENED, struct.pack("<I", 3) + u16([1, 2]), session=1), E),
    ("verdict_next_token_ge_vocab", frame(MsgType.VERDICT, u16([1, 1024]), session=1, seq=1), TOK),
    ("verdict_accepts_too_many", frame(MsgType.VERDICT, u16([5, 1]), session=1, seq=1), TL),
    ("resumed_position_overflow", frame(MsgType.RESUMED, struct.pack("<III", 2, 255, 2) + u16([1, 2]), session=1),
     ErrorCode.BAD_POSITION),
    ("unknown_error_code", frame(MsgType.ERROR, u16([999]) + text(b"")), E),
    ("close_bad_utf8", frame(MsgType.CLOSE, text(b"\xff\xfe")), E),
]


# -------------------------------------------------------------------------------------------- the vectors
def from_fields(kind: str, fields: dict) -> Message:
    """A message from the JSON fields of a vector (u64 as decimal strings, q as {ids, probs}, features rows)."""
    f = dict(fields)
    for key in ("session", "seed"):
        if key in f:
            f[key] = int(f[key])
    if kind == "Welcome":
        f["limits"] = Limits(**f["limits"])
    if kind == "Hello":
        f["versions"] = tuple(f["versions"])
    if kind == "Verify":
        f["q"] = tuple(SparseQ(x["ids"], x["probs"]) for x in f["q"])
        f["features"] = np.array(f["features"], dtype=np.float64).reshape(len(f["tokens"]) + len(f["drafts"]), -1)
    return getattr(protocol, kind)(**f)


def test_vectors_cover_every_message_type():
    assert Limits(**VECTORS["limits"]) == LIMITS
    assert {v["type"] for v in VECTORS["valid"]} == {t.name.title() for t in MsgType}


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_vector_encodes_byte_for_byte_and_decodes_back(vector):
    message = from_fields(vector["type"], vector["fields"])
    assert message.encode().hex() == vector["hex"]
    decoded = decode(bytes.fromhex(vector["hex"]), LIMITS)
    assert type(decoded).__name__ == vector["type"] and decoded == message


def test_invalid_vectors_are_the_malformed_cases():
    assert [(v["name"], v["hex"], v["code"], v["code_name"]) for v in VECTORS["invalid"]] == \
        [(name, data.hex(), int(code), code.name) for name, data, code in MALFORMED]


# -------------------------------------------------------------------------------------------- round trips
SESSION = 2 ** 64 - 1
ROUND_TRIP = [
    Hello(auth_token="", client="", versions=(1, 2, 7)),
    Welcome(limits=Limits(), idle_timeout_ms=0),
    Open(caption="", seed=0, num_tokens=1),
    Open(caption="ü" * 32, seed=2 ** 64 - 1, num_tokens=256, prefix_tokens=256, cfg_scale=7.5, temperature=0.0,
         top_k=1024, top_p=1e-3, use_interval_features=False),
    Opened(session=1, tokens=np.array([], dtype=np.uint16)),
    Opened(session=SESSION, tokens=np.arange(256)),
    Verify(session=SESSION, seq=2 ** 32 - 1, start=240, tokens=np.arange(12), drafts=[0, 1, 2, 1023],
           q=tuple(SparseQ.from_dense(np.eye(1024)[i] * 0.5 + np.eye(1024)[1023] * 0.5) for i in (0, 1, 2, 1023)),
           features=np.linspace(-3, 3, 16 * 4).reshape(16, 4)),
    Verdict(session=1, seq=1, n_accepted=0, next_token=0),
    Verdict(session=1, seq=1, n_accepted=4, next_token=1023),
    Resume(session=1, last_seq=0),
    Resumed(session=1, next_seq=1, position=256, tokens=[]),
    Close(),
    Error(code=ErrorCode.INTERNAL, text="é" * 32, session=SESSION, seq=2 ** 32 - 1),
]


@pytest.mark.parametrize("message", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    data = message.encode()
    assert read_header(data, LIMITS).type == message.TYPE
    for view in (data, bytearray(data), memoryview(data)):
        assert decode(view, LIMITS) == message


def test_decoded_arrays_are_read_only():
    m = decode(GOOD, LIMITS)
    assert isinstance(m, Verify)
    for a in (m.tokens, m.drafts, m.features, m.q[0].ids, m.q[0].probs):
        assert not a.flags.writeable


def test_sparse_q_from_and_to_dense():
    dense = np.zeros(1024)
    dense[[3, 17, 900]] = [0.2, 0.8 - 1e-9, 1e-9]  # 1e-9 would round to 0 in fp16: kept at the smallest fp16
    q = SparseQ.from_dense(dense)
    assert q.ids.tolist() == [3, 17, 900] and q.probs[2] > 0
    back = q.to_dense(1024)
    assert back.sum() == pytest.approx(1.0) and np.abs(back - dense).max() < 1e-3


# ------------------------------------------------------------------------------------------- hostile frames
@pytest.mark.parametrize("name,data,code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_frame_is_refused_with_its_code(name, data, code):
    with pytest.raises(ProtocolError) as info:
        decode(data, LIMITS)
    assert info.value.code == code, info.value


def test_a_verify_within_limits_is_accepted():
    assert isinstance(decode(GOOD, LIMITS), Verify)  # the base every Verify case above breaks in one way


def test_text_frames_and_non_bytes_are_refused():
    for data in ("CI", None, 5, [1, 2]):
        with pytest.raises(ProtocolError) as info:
            decode(data, LIMITS)
        assert info.value.code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("build,code", [
    (lambda: Verify(session=1, seq=1, start=0, tokens=[], drafts=[], q=()), ErrorCode.BAD_FRAME),
    (lambda: Verify(session=1, seq=1, start=0, tokens=[70000], drafts=[1], q=(SparseQ([1], [1.0]),)), TOK),
    (lambda: Verify(session=1, seq=1, start=0, tokens=[], drafts=[1], q=(SparseQ([1], [1.0]),),
                    features=np.ones((2, 4))), FEAT),
    (lambda: Verify(session=1, seq=1, start=0, tokens=[], drafts=[1], q=(SparseQ([1], [1.0]),),
                    features=np.full((1, 4), 1e6)), FEAT),
    (lambda: SparseQ([1, 2], [0.5]), DIST),
    (lambda: Open(caption="\ud800", seed=0, num_tokens=1), ErrorCode.BAD_FRAME),
    (lambda: Open(caption="", seed=-1, num_tokens=1), PAR),
    (lambda: Verdict(session=1, seq=1, n_accepted=0, next_token=0xFFFF), TOK),
    (lambda: Close(reason="x" * 70000), TL),
    (lambda: Error(code=999), ErrorCode.BAD_FRAME),
    (lambda: Limits(vocab_size=65536), PAR),
    (lambda: Limits(max_drafts=0), PAR),
])
def test_invalid_messages_cannot_be_built(build, code):
    with pytest.raises(ProtocolError) as info:
        build()
    assert info.value.code == code


def test_validate_applies_the_receivers_limits():
    m = Verify(session=1, seq=1, start=0, tokens=[], drafts=[2000], q=(SparseQ([2000], [1.0]),))
    m.validate(Limits(vocab_size=4096))
    with pytest.raises(ProtocolError) as info:
        m.validate(LIMITS)
    assert info.value.code == TOK


# ------------------------------------------------------------------------------------------------- fuzzing
VALID_FRAMES = [bytes.fromhex(v["hex"]) for v in VECTORS["valid"]] + [GOOD]


def decodes_canonically_or_refuses(data: bytes) -> None:
    """decode either refuses with a ProtocolError or returns a message whose encoding is exactly `data`."""
    try:
        message = decode(data, LIMITS)
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode)
        return
    assert message.encode() == data


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    decodes_canonically_or_refuses(data)


@FUZZ
@given(st.integers(0, 12), st.sampled_from([0, 1, 2 ** 64 - 1]), st.sampled_from([0, 1, 2 ** 32 - 1]),
       st.binary(max_size=200))
def test_fuzz_random_payload_behind_a_valid_header(kind, session, seq, payload):
    decodes_canonically_or_refuses(frame(kind, payload, session=session, seq=seq))


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_frames(data):
    buf = bytearray(data.draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(buf)))
        op = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if op == "set" and at < len(buf):
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[at:at + data.draw(st.integers(1, 8))]
        else:
            del buf[at:]
    if data.draw(st.booleans()) and len(buf) >= HEADER_BYTES:
        buf = bytearray(relength(bytes(buf)))
    decodes_canonically_or_refuses(bytes(buf))


# ---------------------------------------------------------------------------------------- sequence numbers
def test_sequence_tracker_new_retry_and_out_of_order():
    t: SequenceTracker[str] = SequenceTracker()
    assert t.check(1, b"req1") is None
    with pytest.raises(ProtocolError) as busy:
        t.check(1, b"req1")  # a retry while seq 1 is still being processed
    assert busy.value.code == ErrorCode.BUSY and busy.value.code.retryable
    t.answer(1, "verdict1")
    assert t.check(1, b"req1") == "verdict1"  # a retry gets the same reply: no token twice
    for seq, frame_ in [(1, b"other"), (0, b"req0"), (3, b"req3")]:
        with pytest.raises(ProtocolError) as info:
            t.check(seq, frame_)
        assert info.value.code == ErrorCode.BAD_SEQUENCE
    assert t.check(2, b"req2") is None
    t.answer(2, "verdict2")
    with pytest.raises(ProtocolError) as old:
        t.check(1, b"req1")  # only the last reply is kept
    assert old.value.code == ErrorCode.BAD_SEQUENCE
    assert t.next_seq == 3


def test_sequence_tracker_error_does_not_consume_the_seq():
    t: SequenceTracker[str] = SequenceTracker()
    assert t.check(1, b"bad position") is None
    t.release(1)  # answered with an Error: no effect on the session
    assert t.next_seq == 1 and t.check(1, b"fixed") is None  # the same seq again, with other content
    t.answer(1, "verdict1")
    assert t.next_seq == 2 and t.check(1, b"fixed") == "verdict1"


def test_sequence_tracker_answer_and_release_need_check():
    t: SequenceTracker[str] = SequenceTracker()
    for record in (lambda: t.answer(1, "x"), lambda: t.release(1)):
        with pytest.raises(ProtocolError) as info:
            record()
        assert info.value.code == ErrorCode.INTERNAL


def test_sequence_tracker_resume():
    t: SequenceTracker[str] = SequenceTracker()
    assert t.resume(0) is None
    t.check(1, b"a")
    with pytest.raises(ProtocolError):
        t.resume(0)  # seq 1 still in flight
    t.answer(1, "v1")
    assert t.resume(1) is None  # the client got every reply
    assert t.resume(0) == "v1"  # the client missed the reply to seq 1
    with pytest.raises(ProtocolError) as info:
        t.resume(5)
    assert info.value.code == ErrorCode.BAD_SEQUENCE


def test_choose_version():
    assert choose_version((1, 2, 3)) == 1
    with pytest.raises(ProtocolError) as info:
        choose_version((2, 3))
    assert info.value.code == ErrorCode.BAD_VERSION


# ------------------------------------------------------------------------------------------------ byte costs
def verify_bytes(n: int, k: int, s: int, F: int) -> int:
    """The documented cost (docs/PROTOCOL.md): header, fixed fields, ids, per-draft counts, q pairs, features."""
    return HEADER_BYTES + 10 + 2 * n + 4 * k + 4 * k * s + 2 * F * (n + k)


@pytest.mark.parametrize("n,k,s,F", [(0, 1, 1, 0), (3, 1, 5, 4), (12, 4, 8, 4), (0, 2, 3, 0)])
def test_byte_costs(n, k, s, F):
    q = tuple(SparseQ(np.arange(s), np.full(s, 1 / s)) for _ in range(k))
    m = Verify(session=1, seq=1, start=0, tokens=np.zeros(n, int), drafts=np.zeros(k, int), q=q,
               features=np.zeros((n + k, F)))
    assert len(m.encode()) == verify_bytes(n, k, s, F)
    assert len(Verdict(session=1, seq=1, n_accepted=0, next_token=None).encode()) == HEADER_BYTES + 4 == 26


def test_error_from_exception_keeps_code_and_addresses_the_request():
    err = Error.from_exception(ProtocolError(ErrorCode.BAD_POSITION, "start 5, frontier 7"), session=3, seq=9)
    assert decode(err.encode(), LIMITS) == Error(code=ErrorCode.BAD_POSITION, text="start 5, frontier 7",
                                                 session=3, seq=9)
