"""The cloud bridge end to end: a real `ciar serve` server (in a thread or a process) on localhost, real sockets,
the torch-free device runtime on the shipped int8 bundle, the built-in cloud model.

Covers: same seed -> the image through the bridge equals the in-process one; 32 concurrent sessions; batching;
dropped connection -> resume -> the same image; killed server -> the device finishes locally; stalled server ->
timeout; hostile frames each answered by an Error or a clean close while other sessions go on."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ciar.cloud_bridge import protocol as pr
from ciar.cloud_bridge.client import BridgeClient, ClientConfig, open_message, verify_message
from ciar.cloud_bridge.session import Chain
from ciar.cloud_bridge.cloud import CloudService
from ciar.cloud_bridge.direct import DirectVerifier
from ciar.cloud_bridge.server import Batcher, ConfigError, ServerConfig, ServerThread, StepTiming, read_tokens
from ciar.engine.gates import calibrate_tau
from ciar.models.builtin import load_builtin
from ciar.runtime.backend import OnnxBackend
from ciar.runtime.bundle import load_bundle
from ciar.runtime.cli import default_bundle
from ciar.runtime.generator import DeviceGenerator
from ciar.runtime.verifier import SessionParams
from netfaults import FaultyProxy

PROMPT = "a small green triangle at the bottom right and a large yellow circle in the centre, on a black background"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return load_builtin(None)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_bundle())


@pytest.fixture(scope="module")
def device(bundle):
    return DeviceGenerator(bundle, OnnxBackend(bundle))


@pytest.fixture(scope="module")
def tau(device):
    """A tau that sends about 30% of this caption's drafts (the device alone once)."""
    probe = device.generate(PROMPT, 1, np.inf, prefix_fraction=0.0, decode_image=False)
    return calibrate_tau(probe.u[np.isfinite(probe.u)], 0.3)


@pytest.fixture(scope="module")
def server(models):
    service = CloudService(models, max_sessions=40)
    st = ServerThread(service, ServerConfig(port=0, tokens=frozenset({"alice", "bob"}), idle_timeout_s=30))
    url = st.start()
    yield url, service, st.server
    st.stop()


@pytest.fixture(scope="module")
def reference(models, device, tau):
    """The in-process image (no socket) for seed 5."""
    return device.generate(PROMPT, 5, tau, verifier=DirectVerifier(CloudService(models, max_sessions=1)))


@pytest.fixture(scope="module")
def reference_ahead(models, device, tau):
    """The in-process image for seed 5 drafting up to 4 positions past each verification in flight (on this int8
    bundle a cache entry depends slightly on which tokens share its graph call, so it is not the waiting image)."""
    return device.generate(PROMPT, 5, tau, verifier=DirectVerifier(CloudService(models, max_sessions=1)),
                           lookahead=4)


def client(url: str, token: str = "alice", **kw) -> BridgeClient:
    return BridgeClient(ClientConfig(url, token=token, **kw))


# ------------------------------------------------------------------------------------------------ equality
def test_bridge_image_equals_in_process_image(server, device, tau, reference, models):
    url, _, _ = server
    c = client(url)
    through = device.generate(PROMPT, 5, tau, verifier=c)
    assert reference.stats["sent"] >= 10 and reference.stats["prefix"] > 0  # the cloud really took part
    assert reference.stats["unverified"] == through.stats["unverified"] == 0
    np.testing.assert_array_equal(through.tokens, reference.tokens)
    np.testing.assert_array_equal(through.source, reference.source)
    np.testing.assert_array_equal(through.image, reference.image)
    assert c.stats.verified == through.stats["sent"] and c.stats.bytes_up > 0 and c.stats.offline_reason is None
    other = device.generate(PROMPT, 6, tau, verifier=DirectVerifier(CloudService(models, max_sessions=1)))
    assert (other.tokens != reference.tokens).any()  # the seed matters: the equality is not vacuous


def test_the_device_feeds_its_sent_draft_while_the_cloud_verifies(server, bundle, tau):
    """Through the bridge the device writes its sent draft into its cache before it reads the verdict, so after
    every verdict it feeds one token (the fixed-length decode session), kept or not."""
    class Recording(OnnxBackend):
        def step(self, embeds, start, neighbours):
            fed.append((start, embeds.shape[1]))
            return super().step(embeds, start, neighbours)

    fed: list[tuple[int, int]] = []
    gen = DeviceGenerator(bundle, Recording(bundle))
    out = gen.generate(PROMPT, 5, tau, verifier=client(server[0]), decode_image=False)
    P = gen.P
    assert out.stats["sent"] >= 10 and out.stats["unverified"] == 0
    assert fed[0] == (0, P) and fed[1] == (P, out.stats["prefix"])  # the caption, then the cloud's prefix
    assert all(n == 1 for _, n in fed[2:])


def test_chains_of_uncertain_drafts_through_the_bridge_equal_the_in_process_image(server, device, tau, models,
                                                                                  reference):
    """`chain=4`: each Verify carries the run of uncertain drafts; the websocket image is the in-process one."""
    url, _, _ = server
    c = client(url)
    through = device.generate(PROMPT, 5, tau, verifier=c, chain=4)
    direct = device.generate(PROMPT, 5, tau, verifier=DirectVerifier(CloudService(models, max_sessions=1)),
                             chain=4)
    np.testing.assert_array_equal(through.tokens, direct.tokens)
    np.testing.assert_array_equal(through.image, direct.image)
    assert through.stats["unverified"] == 0 and c.stats.offline_reason is None
    assert c.stats.verified < through.stats["sent"]  # some Verifies carried several drafts
    assert (through.tokens != reference.tokens).any()  # not the one-draft image


def test_drafting_past_verifications_in_flight_through_the_bridge(server, device, tau, reference_ahead):
    """`lookahead=4`: the device sends a Verify, drafts on while the server verifies, then reads the Verdict (one
    request out at a time, protocol version 1 unchanged); the websocket image is the in-process one, and drafts
    made ahead stood and were voided."""
    url, _, _ = server
    c = client(url)
    through = device.generate(PROMPT, 5, tau, verifier=c, lookahead=4)
    np.testing.assert_array_equal(through.tokens, reference_ahead.tokens)
    np.testing.assert_array_equal(through.source, reference_ahead.source)
    np.testing.assert_array_equal(through.image, reference_ahead.image)
    assert through.stats["unverified"] == 0 and c.stats.offline_reason is None
    assert c.stats.verified == through.stats["sent"] > 10
    assert through.stats["kept_ahead"] > 0 and through.stats["voided"] > 0


def test_a_cloud_call_budget_moves_each_image_toward_its_rate(models, device):
    """`budget`: tau is nudged after every draft to hold the image's cloud calls per token (prefix included) at the
    target. A high target spends more than the calibration table's tau alone, a low one less, each nearer its
    target; the calls are counted by the cloud (Verifies answered), not by the device."""
    from ciar.runtime.budget import BudgetController
    from ciar.runtime.cli import tau_for
    bundle = device.bundle
    rates = {}
    for rate in (0.1, 0.5):
        tau = tau_for(bundle, None, rate)
        fixed, held = DirectVerifier(CloudService(models, max_sessions=1)), \
            DirectVerifier(CloudService(models, max_sessions=1))
        a = device.generate(PROMPT, 5, tau, verifier=fixed, decode_image=False)
        b = device.generate(PROMPT, 5, tau, verifier=held, budget=BudgetController(tau, rate), decode_image=False)
        calls = [(r.stats["prefix"] + v.seq) / device.T for r, v in ((a, fixed), (b, held))]
        assert abs(calls[1] - rate) < abs(calls[0] - rate), (rate, calls)
        assert b.stats["tau_end"] != tau and b.stats["budget"] == rate and b.stats["sent"] == held.seq
        rates[rate] = calls[1]
    assert rates[0.1] < 0.15 < rates[0.5]


def test_cloud_only_session_writes_every_token(server, device):
    url, _, _ = server
    c = client(url, timeout_s=60)
    params = SessionParams(PROMPT, 3, device.T, device.T, 3.0, 1.0, 0, 1.0)
    tokens = c.open(params)
    c.close()
    again = client(url, timeout_s=60)
    assert len(tokens) == device.T and np.array_equal(tokens, again.open(params))
    again.close()


# -------------------------------------------------------------------------------------------------- batching
def test_batcher_runs_waiting_steps_as_one_forward(models):
    service = CloudService(models, max_sessions=4)
    params = SessionParams(PROMPT, 0, 256, 3, 3.0, 1.0, 0, 1.0)
    direct = [service.run_now(service.open(open_message(params, service.limits), "x")) for _ in range(2)]
    for s, _ in direct:
        service.close(s.id)
    forwards0 = service.forwards

    timings = [StepTiming() for _ in range(3)]

    async def both():
        b = Batcher(service, 1)
        b.start()
        out = await asyncio.gather(*(b.run(service.open(open_message(params, service.limits), "x"), timing)
                                     for timing in timings))
        await b.stop()
        return out

    batched = asyncio.run(both())
    # 3 sessions, each a prefill and 3 prefix tokens: 4 forwards in all instead of 12
    assert service.forwards - forwards0 == 4 and service.work_items >= 12
    # the three steps shared the same 4 forwards, so each was in forwards for the same time
    assert timings[0].forward > 0 and all(t.forward == timings[0].forward and t.queued >= 0 for t in timings)
    for s, prefix in batched:
        np.testing.assert_array_equal(prefix, direct[0][1])  # same seed, same prefix, batched or not


def test_32_concurrent_sessions_complete_with_nothing_lost(server, bundle, tau):
    url, service, srv = server
    forwards0, items0 = service.forwards, service.work_items
    results, errors = {}, []

    def one(i: int) -> None:
        try:
            gen = DeviceGenerator(bundle, OnnxBackend(bundle))
            c = client(url, token="bob" if i % 2 else "alice", timeout_s=60)
            r = gen.generate(PROMPT, 100 + i, tau, verifier=c, decode_image=False)
            results[i] = (r, c.stats)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 32
    for r, stats in results.values():
        assert r.stats["unverified"] == 0 and stats.offline_reason is None
        assert stats.verified == r.stats["sent"] > 0
        assert (r.tokens >= 0).all() and (r.tokens < 1024).all()
    forwards, items = service.forwards - forwards0, service.work_items - items0
    assert items == sum(1 + r.stats["prefix"] + st.verified for r, st in results.values())  # every step ran once
    assert forwards < items  # steps of different sessions shared forwards
    assert not service.sessions or all(s.busy == 0 for s in service.sessions.values())
    m = srv.metrics
    assert len(m.verify_ms) == len(m.queued_ms) == len(m.forward_ms) >= sum(st.verified for _, st in results.values())
    assert all(0 < f and 0 <= q and q + f <= v for v, q, f in zip(m.verify_ms, m.queued_ms, m.forward_ms))
    summary = m.summary(service)
    assert 0 < summary["forward_ms_p50"] <= summary["forward_ms_p95"] and summary["queued_ms_p95"] >= 0


# ---------------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("lookahead", [0, 4])
def test_dropped_connection_resumes_and_the_image_is_unchanged(server, device, tau, reference, reference_ahead,
                                                               lookahead):
    url, _, _ = server
    proxy = FaultyProxy(int(url.rsplit(":", 1)[1]))
    purl = proxy.start()
    c = client(purl, backoff_s=0.02)
    calls = {"n": 0}
    submit = c.submit

    def faulty_submit(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            proxy.cut_after_next_upstream = True  # the server gets Verify 3, its Verdict is lost
        if calls["n"] == 6:
            proxy.cut()  # the connection is dead before Verify 6 is sent
        return submit(*a)

    c.submit = faulty_submit
    r = device.generate(PROMPT, 5, tau, verifier=c, lookahead=lookahead)
    proxy.stop()
    assert proxy.cuts == 2 and c.stats.reconnects >= 2 and c.stats.offline_reason is None
    np.testing.assert_array_equal(r.tokens, (reference_ahead if lookahead else reference).tokens)
    assert r.stats["unverified"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(*extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "ciar"), "serve", "--port", str(port), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line == f"listening on ws://127.0.0.1:{port}", (line, proc.stderr.read() if proc.poll() else "")
    return proc, f"ws://127.0.0.1:{port}"


def test_killed_server_lets_the_device_finish_locally(device, tau):
    proc, url = _start_serve()
    c = client(url, retries=1, backoff_s=0.01)
    submit, calls = c.submit, {"n": 0}

    def killing_submit(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        return submit(*a)

    c.submit = killing_submit
    r = device.generate(PROMPT, 5, tau, verifier=c)
    assert proc.returncode == -signal.SIGKILL
    assert c.stats.verified == 3 and r.stats["unverified"] == r.stats["sent"] - 3 > 0
    assert c.stats.offline_reason and len(r.tokens) == device.T and r.image is not None


def test_device_cli_exits_0_when_the_cloud_is_gone(tmp_path):
    stats = tmp_path / "s.json"
    out = subprocess.run([str(BIN / "ciar-device"), "run", "--cloud", f"ws://127.0.0.1:{_free_port()}",
                          "--cloud-rate", "0.3", "--out", str(tmp_path / "i.png"), "--stats", str(stats)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads(stats.read_text())
    assert s["mode"] == "cloud" and s["unverified"] == s["sent"] > 0 and s["bridge"]["offline_reason"]
    assert "left behind" in out.stderr


def test_device_cli_prefix_fraction_moves_the_prefix_to_verifications(tmp_path):
    proc, url = _start_serve()
    try:
        stats = {}
        for frac in (None, "0"):
            path = tmp_path / f"s{frac}.json"
            extra = [] if frac is None else ["--prefix-fraction", frac]
            out = subprocess.run([str(BIN / "ciar-device"), "run", "--cloud", url, "--cloud-rate", "0.15", "--budget",
                                  *extra,
                                  "--out", str(tmp_path / "i.png"), "--stats", str(path)],
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            stats[frac] = json.loads(path.read_text())
    finally:
        proc.terminate()
        proc.wait(10)
    shipped, bare = stats[None], stats["0"]
    assert shipped["prefix"] == int(0.06 * shipped["tokens"]) > 0 and bare["prefix"] == 0
    for s in (shipped, bare):  # the budget holds either way: the prefix's forwards come out of it
        assert s["unverified"] == 0 and s["cloud_calls"] <= 0.15 + 2 / s["tokens"]
    assert bare["bridge"]["verified"] > shipped["bridge"]["verified"]  # spent on verifications instead
    # the shipped bundle measured its taus with the cloud at its own prefix (`ciar export calibrate`), not at 0
    assert shipped["tau_from"] == "cloud_calls" and bare["tau_from"] == "u_quantiles"
    bad = subprocess.run([str(BIN / "ciar-device"), "run", "--prefix-fraction", "2"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--prefix-fraction" in bad.stderr and "Traceback" not in bad.stderr


def test_stalled_server_triggers_the_timeout_path(server, device, tau):
    url, _, _ = server
    proxy = FaultyProxy(int(url.rsplit(":", 1)[1]))
    purl = proxy.start()
    c = client(purl, timeout_s=0.3, backoff_s=5.0)
    submit, calls = c.submit, {"n": 0}

    def stalling_submit(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            proxy.stalled = True
        return submit(*a)

    c.submit = stalling_submit
    t0 = time.monotonic()
    r = device.generate(PROMPT, 5, tau, verifier=c)
    proxy.stop()
    assert c.stats.timeouts == 1 and c.stats.verified == 1 and "no Verdict" in c.stats.offline_reason
    assert r.stats["unverified"] == r.stats["sent"] - 1 > 0 and len(r.tokens) == device.T
    assert time.monotonic() - t0 < 60


def test_graceful_shutdown_and_http_endpoints(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# devices\nsecret-1\n\n")
    proc, url = _start_serve("--token-file", str(tokens))
    http = url.replace("ws://", "http://")
    assert urllib.request.urlopen(f"{http}/healthz", timeout=10).read() == b"ok\n"
    metrics = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    assert "ciar_cloud_forwards_total" in metrics and 'quantile="0.95"' in metrics
    assert 'ciar_verify_forward_ms{quantile="0.5"}' in metrics and "# TYPE ciar_verify_queued_ms summary" in metrics
    with connect(url) as ws:
        ws.send(pr.Hello(auth_token="wrong", client="t").encode())
        assert pr.decode(ws.recv(5), pr.Limits()).code == pr.ErrorCode.UNAUTHORIZED
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(e["event"] == "shutting down" for e in logs)


def test_server_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="token-file"):
        ServerConfig(host="0.0.0.0")
    empty = tmp_path / "t"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no token"):
        read_tokens(empty)
    out = subprocess.run([str(BIN / "ciar"), "serve", "--host", "0.0.0.0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "needs --token-file" in out.stderr and "Traceback" not in out.stderr


def test_tls(models, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    st = ServerThread(CloudService(models, max_sessions=2),
                      ServerConfig(host="localhost", port=0, certfile=str(cert), keyfile=str(key)))
    url = st.start()
    try:
        assert url.startswith("wss://")
        c = client(url, cafile=str(cert))
        assert len(c.open(SessionParams(PROMPT, 0, 256, 4, 3.0, 1.0, 0, 1.0))) == 4
        c.close()
    finally:
        st.stop()


# ------------------------------------------------------------------------------------------------ bad input
class Raw:
    """A hand-driven connection for hostile frames."""

    def __init__(self, url: str, token: str | None = "alice") -> None:
        self.ws = connect(url, max_size=None, max_queue=None).__enter__()  # long-lived; the test ends it
        self.limits = pr.Limits()
        if token is not None:
            self.ws.send(pr.Hello(auth_token=token, client="raw").encode())
            self.limits = pr.decode(self.ws.recv(5), pr.Limits()).limits

    def ask(self, frame) -> pr.Message | None:
        """Send a frame; the reply, or None when the server closed the connection."""
        try:
            self.ws.send(frame)
            return pr.decode(self.ws.recv(5), self.limits)
        except ConnectionClosed:
            return None

    def open(self, prefix: int = 0) -> int:
        reply = self.ask(open_message(SessionParams(PROMPT, 0, 256, prefix, 3.0, 1.0, 0, 1.0, 267), self.limits)
                         .encode())
        assert isinstance(reply, pr.Opened), reply
        return reply.session


def _chain(draft: int, width: int) -> Chain:
    """One draft, its q a point mass on itself."""
    return Chain(np.array([draft]), (np.array([draft]),), (np.array([1.0]),), np.ones((1, width), np.float32))


def _verify(session: int, seq: int = 1, start: int = 0, tokens=(), draft: int = 7, features: bool = True,
            width: int = 267) -> bytes:
    n = len(tokens)
    f = np.ones((n, width), np.float32) if features else None
    return verify_message(session, seq, start, np.array(tokens, np.int64), f, _chain(draft, width)).encode()


def _patch(frame: bytes, offset: int, data: bytes) -> bytes:
    return frame[:offset] + data + frame[offset + len(data):]


def _expect(reply, code: pr.ErrorCode | None) -> None:
    """An Error with `code`, or (code None) a closed connection."""
    if code is None:
        assert reply is None
    else:
        assert isinstance(reply, pr.Error) and reply.code == code, reply


def test_hostile_frames_get_errors_and_other_sessions_go_on(server, device, tau, reference):
    url, service, _ = server
    E = pr.ErrorCode
    good = client(url)
    # a well-behaved device keeps verifying on its own connection between the hostile frames
    good_params = SessionParams(PROMPT, 5, 256, 15, 3.0, 1.0, 0, 1.0, 267)
    assert len(good.open(good_params)) == 15

    raw = Raw(url)
    sid = raw.open()
    v = _verify(sid)
    cases: list[tuple[str, object, E | None]] = [
        ("text frame", "hello", E.BAD_FRAME),
        ("short frame", b"CI\x01", E.BAD_FRAME),
        ("bad magic", _patch(v, 0, b"XX"), E.BAD_FRAME),
        ("unknown type", _patch(v, 3, b"\x63"), E.BAD_FRAME),
        ("flags set", _patch(v, 4, b"\x01\x00"), E.BAD_FRAME),
        ("length mismatch", v + b"\x00", E.BAD_FRAME),
        ("truncated payload", _patch(v[:-3], 18, (len(v) - 25).to_bytes(4, "little")), E.BAD_FRAME),
        ("oversized frame", pr.HEADER.pack(b"CI", 1, 5, 0, sid, 1, raw.limits.max_frame_bytes + 1 - 22)
         + bytes(raw.limits.max_frame_bytes + 1 - 22), E.TOO_LARGE),
        ("token out of vocabulary", _verify(sid, draft=4000), E.BAD_TOKEN),
        ("q not a distribution", _patch(v, len(v) - 2 * 267 - 2, b"\x00\x38"), E.BAD_DISTRIBUTION),
        ("features of the wrong width", _verify(sid, width=5), E.BAD_FEATURES),
        ("NaN features", _patch(v, len(v) - 2, b"\x00\x7e"), E.BAD_FEATURES),
        ("start is not the frontier", _verify(sid, start=3, tokens=()), E.BAD_POSITION),
        ("positions past the image", _verify(sid, start=0, tokens=list(range(256))), E.BAD_POSITION),
        ("seq out of order", _verify(sid, seq=5), E.BAD_SEQUENCE),
        ("unknown session", _verify(12345), E.UNKNOWN_SESSION),
        ("a server message from a device", pr.Verdict(session=sid, seq=1, n_accepted=0, next_token=1).encode(),
         E.UNEXPECTED),
        ("second Hello", pr.Hello(auth_token="alice", client="again").encode(), E.UNEXPECTED),
        ("Open with the wrong token count", pr.Open(caption="x", seed=0, num_tokens=64).encode(), E.BAD_PARAMS),
        ("Open with a bad top_k", _patch(pr.Open(caption="x", seed=0, num_tokens=256).encode(), 22 + 40,
                                          (5000).to_bytes(2, "little")), E.BAD_PARAMS),
        ("caption too long", pr.Open(caption="a " * 600, seed=0, num_tokens=256).encode(), E.TOO_LARGE),
        ("Resume with a bad last_seq", pr.Resume(session=sid, last_seq=9).encode(), E.BAD_SEQUENCE),
    ]
    for i, (name, frame, code) in enumerate(cases):
        reply = raw.ask(frame)
        try:
            _expect(reply, code)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
        # the good device is served between any two hostile frames
        verdict = good.verify(good.known.shape[0], np.zeros(0, np.int64), np.zeros((0, 267), np.float32),
                              _chain(7, 267))
        assert verdict.verified, f"the good session stalled after {name!r}"
    assert isinstance(raw.ask(v), pr.Verdict)  # the hostile connection's own session still works too

    bob = Raw(url, token="bob")
    _expect(bob.ask(_verify(sid, seq=2, start=service.sessions[sid].frontier)), E.FOREIGN_SESSION)
    _expect(bob.ask(pr.Resume(session=sid, last_seq=1).encode()), E.FOREIGN_SESSION)
    _expect(bob.ask(pr.Close(session=sid).encode()), E.FOREIGN_SESSION)
    assert sid in service.sessions  # bob could not close alice's session
    for name, make in (("no token", lambda: Raw(url, token=None).ask(pr.Hello(auth_token="", client="x").encode())),
                       ("wrong token", lambda: Raw(url, token=None).ask(pr.Hello(auth_token="eve",
                                                                                  client="x").encode())),
                       ("before Hello", lambda: Raw(url, token=None).ask(_verify(sid))),
                       ("wrong version", lambda: Raw(url, token=None).ask(_patch(
                           pr.Hello(auth_token="alice", client="x").encode(), 2, b"\x02")))):
        reply = make()
        assert reply is None or (isinstance(reply, pr.Error) and reply.code in (E.UNAUTHORIZED, E.BAD_VERSION)), \
            name
    huge = Raw(url)
    assert huge.ask(bytes(2 * huge.limits.max_frame_bytes + 100)) is None  # beyond what is read: closed (1009)
    verdict = good.verify(good.known.shape[0], np.zeros(0, np.int64), np.zeros((0, 267), np.float32),
                          _chain(7, 267))
    assert verdict.verified and good.stats.offline_reason is None
    good.close()


def test_idle_sessions_expire(models):
    st = ServerThread(CloudService(models, max_sessions=2), ServerConfig(port=0, idle_timeout_s=0.3))
    url = st.start()
    try:
        raw = Raw(url)
        sid = raw.open()
        time.sleep(1.2)
        _expect(raw.ask(_verify(sid)), pr.ErrorCode.UNKNOWN_SESSION)
        # a full pool answers BUSY, and a closed session frees its slot
        a, b = raw.open(), raw.open()
        _expect(raw.ask(open_message(SessionParams(PROMPT, 0, 256, 0, 3.0, 1.0, 0, 1.0), raw.limits).encode()),
                pr.ErrorCode.BUSY)
        raw.ws.send(pr.Close(session=a).encode())
        assert raw.open() and b
    finally:
        st.stop()


def test_a_flood_is_rate_limited_then_closed(models):
    st = ServerThread(CloudService(models, max_sessions=2),
                      ServerConfig(port=0, max_frames_per_s=50, flood_close_after=20))
    url = st.start()
    try:
        neighbour = Raw(url)
        sid = neighbour.open()
        flood = Raw(url)
        frame = _verify(999)
        for _ in range(2000):
            try:
                flood.ws.send(frame)
            except ConnectionClosed:
                break
        codes, closed = [], None
        try:
            while True:
                codes.append(pr.decode(flood.ws.recv(10), flood.limits).code)
        except ConnectionClosed as e:
            closed = e
        assert pr.ErrorCode.UNKNOWN_SESSION in codes and pr.ErrorCode.RATE_LIMITED in codes
        # the code comes from the Close frame itself: ws.close_code stays None until the TCP
        # connection is gone too, which races with recv() raising
        assert closed.rcvd is not None and closed.rcvd.code == 1008
        assert isinstance(neighbour.ask(_verify(sid)), pr.Verdict)  # the other connection is still served
    finally:
        st.stop()
