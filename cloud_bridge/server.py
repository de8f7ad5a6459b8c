"""`ciar serve`: the asyncio websocket server hosting the PyTorch cloud verifier for many devices.

Frames are read by one task per connection; Open and Verify become session steps (cloud.py) whose forwards go
to one `Batcher`, which runs, in a worker thread, every step waiting at that moment as ONE padded forward
(continuous batching: no added wait when the server is idle). Also: bearer tokens, a per-connection frame-rate
limit, a session idle timeout, a bounded session pool, /healthz and Prometheus /metrics on the same port,
optional TLS, JSON-lines logs, graceful shutdown on SIGINT/SIGTERM.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import protocol as pr
from .cloud import CloudService, Step, Work

log = logging.getLogger("ciar.cloud_bridge.server")


class ConfigError(ValueError):
    """A server setting that cannot work (the command line prints it without a traceback)."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    tokens: frozenset[str] | None = None  # None: any token (allowed only on loopback)
    max_sessions: int = 64
    idle_timeout_s: float = 60.0
    max_frames_per_s: float = 2000.0  # per connection, with a burst of the same size
    flood_close_after: int = 100  # rate-limited frames in a row before the connection is closed
    certfile: str | None = None
    keyfile: str | None = None
    threads: int = 1  # torch intra-op threads of the cloud forward
    max_batch: int = 64  # session steps per forward (1: no batching, for comparison)

    def __post_init__(self) -> None:
        if self.tokens is None and not is_loopback(self.host):
            raise ConfigError(f"binding to {self.host} needs --token-file: without tokens the server is open to "
                             "anyone who can reach it (only loopback addresses may go without)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_tokens(path: Path) -> frozenset[str]:
    """One bearer token per line; blank lines and # comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the token file {path}: {e.strerror}") from None
    tokens = frozenset(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#"))
    if not tokens:
        raise ConfigError(f"the token file {path} holds no token")
    return tokens


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry)


def _event(level: int, event: str, **fields) -> None:
    log.log(level, event, extra={"fields": fields})


@dataclass
class StepTiming:
    """Where one session step's time went, in seconds: queued (until the batcher handed its forward to the worker
    thread) and in forwards (from that hand-off until the logits were back on the event loop); the rest of the
    step (features, acceptance policy, bookkeeping) is its total minus both."""

    queued: float = 0.0
    forward: float = 0.0


@dataclass
class Metrics:
    connections: int = 0
    sessions_opened: int = 0
    verify_requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # per Verify, the latest 10,000 each: whole step (task start to Verdict), queued, in the forward
    verify_ms: list[float] = field(default_factory=list)
    queued_ms: list[float] = field(default_factory=list)
    forward_ms: list[float] = field(default_factory=list)
    batch_items: list[int] = field(default_factory=list)

    def error(self, code: pr.ErrorCode) -> None:
        self.errors[code.name] = self.errors.get(code.name, 0) + 1

    def latency(self, ms: float, timing: StepTiming | None = None) -> None:
        timing = timing or StepTiming()
        for series, value in ((self.verify_ms, ms), (self.queued_ms, 1000 * timing.queued),
                              (self.forward_ms, 1000 * timing.forward)):
            series.append(value)
            del series[:-10_000]

    def summary(self, service: CloudService) -> dict:
        out = {"connections": self.connections, "sessions_active": len(service.sessions),
               "sessions_opened": self.sessions_opened, "verify_requests": self.verify_requests,
               "cloud_forwards": service.forwards, "work_items": service.work_items,
               "items_per_forward": service.work_items / max(service.forwards, 1)}
        for name, series in (("verify", self.verify_ms), ("queued", self.queued_ms), ("forward", self.forward_ms)):
            ms = np.asarray(series) if series else np.zeros(1)
            out[f"{name}_ms_p50"], out[f"{name}_ms_p95"] = float(np.percentile(ms, 50)), float(np.percentile(ms, 95))
        return {**out, "errors": dict(self.errors)}

    def prometheus(self, service: CloudService) -> str:
        s = self.summary(service)
        lines = []
        for name, kind, value in (("connections_total", "counter", s["connections"]),
                                  ("sessions_active", "gauge", s["sessions_active"]),
                                  ("sessions_opened_total", "counter", s["sessions_opened"]),
                                  ("verify_requests_total", "counter", s["verify_requests"]),
                                  ("cloud_forwards_total", "counter", s["cloud_forwards"]),
                                  ("work_items_total", "counter", s["work_items"])):
            lines += [f"# TYPE ciar_{name} {kind}", f"ciar_{name} {value}"]
        for name, what in (("verify_latency_ms", "verify"), ("verify_queued_ms", "queued"),
                           ("verify_forward_ms", "forward")):
            lines.append(f"# TYPE ciar_{name} summary")
            for q, label in (("p50", "0.5"), ("p95", "0.95")):
                lines.append(f'ciar_{name}{{quantile="{label}"}} {s[f"{what}_ms_{q}"]:.3f}')
        lines.append("# TYPE ciar_errors_total counter")
        for code, n in sorted(s["errors"].items()):
            lines.append(f'ciar_errors_total{{code="{code}"}} {n}')
        return "\n".join(lines) + "\n"


class Batcher:
    """Runs session steps; every forward waiting when the worker is free goes into one batched forward."""

    def __init__(self, service: CloudService, threads: int, max_batch: int = 64) -> None:
        self.service, self.max_batch = service, max_batch
        self.queue: asyncio.Queue[tuple[Work, asyncio.Future]] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ciar-cloud", initializer=torch.set_num_threads,
                                       initargs=(threads,))
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def run(self, step: Step, timing: StepTiming | None = None) -> object:
        """Drive a session step to its end, its forwards batched with everyone else's; `timing` adds up its time
        queued and in forwards."""
        loop = asyncio.get_running_loop()
        timing = timing or StepTiming()
        try:
            work = next(step)
            while True:
                fut = loop.create_future()
                queued = time.perf_counter()
                await self.queue.put((work, fut))
                logits, started, ended = await fut
                timing.queued += started - queued
                timing.forward += ended - started
                work = step.send(logits)
        except StopIteration as done:
            return done.value

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            for group in self.groups(items, self.max_batch):
                started = time.perf_counter()
                try:
                    outs = await loop.run_in_executor(self.pool, self.service.forward, [w for w, _ in group])
                except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
                    _event(logging.ERROR, "forward failed", error=repr(e), items=len(group))
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                ended = time.perf_counter()
                for (_, fut), out in zip(group, outs):
                    if not fut.done():
                        fut.set_result((out, started, ended))

    @staticmethod
    def groups(items: list, max_batch: int, slack: float = 1.5) -> list[list]:
        """Split waiting steps into forwards: shortest first, a new forward whenever padding every step of the
        current one to the next step's length would cost more than `slack` times its real positions (on a
        compute-bound CPU, padding is paid in full), or at max_batch steps."""
        out: list[list] = []
        group: list = []
        real = 0
        for item in sorted(items, key=lambda it: it[0].h.shape[1]):
            length = item[0].h.shape[1]
            if group and (len(group) >= max_batch or (len(group) + 1) * length > slack * (real + length)):
                out.append(group)
                group, real = [], 0
            group.append(item)
            real += length
        return out + [group] if group else out


class BridgeServer:
    def __init__(self, service: CloudService, config: ServerConfig) -> None:
        self.service, self.config = service, config
        self.limits = service.limits
        self.metrics = Metrics()
        self.stopping: asyncio.Event | None = None
        self.port: int | None = None

    # ---- HTTP: health and metrics on the websocket port -----------------------------------------------------
    def _http(self, connection: ServerConnection, request):
        path = request.path.split("?")[0]
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/metrics":
            response = connection.respond(HTTPStatus.OK, self.metrics.prometheus(self.service))
            response.headers["Content-Type"] = "text/plain; version=0.0.4"
            return response
        if path == "/stats":
            return connection.respond(HTTPStatus.OK, json.dumps(self.metrics.summary(self.service)) + "\n")
        return None  # a websocket handshake

    # ---- one connection --------------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self.metrics.connections += 1
        conn = _Connection(ws, self)
        peer = ws.remote_address[0] if ws.remote_address else "?"
        _event(logging.INFO, "connected", peer=peer)
        try:
            async for frame in ws:
                if not await conn.receive(frame):
                    break
        except ConnectionClosed:
            pass
        finally:
            for task in conn.tasks:
                await asyncio.gather(task, return_exceptions=True)
            _event(logging.INFO, "disconnected", peer=peer, frames=conn.frames)

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.idle_timeout_s / 4))
            for sid in self.service.expire(self.config.idle_timeout_s):
                _event(logging.INFO, "session expired", session=sid)

    async def serve(self, ready: threading.Event | None = None, announce: bool = False) -> None:
        """Serve until `stop()` (or SIGINT/SIGTERM when `announce`, the command line)."""
        self.stopping = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        context = None
        if self.config.certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.config.certfile, self.config.keyfile)
        self.batcher = Batcher(self.service, self.config.threads, self.config.max_batch)
        self.batcher.start()
        reaper = asyncio.create_task(self._reaper())
        if announce:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.add_signal_handler(sig, self.stopping.set)
        # frames up to twice the limit are read and answered TOO_LARGE; larger ones close the connection (1009)
        async with serve(self._handle, self.config.host, self.config.port, ssl=context,
                         process_request=self._http, max_size=2 * self.limits.max_frame_bytes,
                         compression=None, ping_interval=20, ping_timeout=20) as server:
            self.port = server.sockets[0].getsockname()[1]
            scheme = "wss" if context else "ws"
            self.url = f"{scheme}://{self.config.host}:{self.port}"
            _event(logging.INFO, "listening", url=self.url, max_sessions=self.service.max_sessions)
            if announce:
                print(f"listening on {self.url}", flush=True)
            if ready is not None:
                ready.set()
            await self.stopping.wait()
            _event(logging.INFO, "shutting down", sessions=len(self.service.sessions))
            server.close()
            await server.wait_closed()
        reaper.cancel()
        await self.batcher.stop()

    def stop(self) -> None:
        """Thread-safe: ask the server to shut down gracefully."""
        if self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)


class _Connection:
    """Per-connection state: who it is (after Hello), its frame-rate bucket, its in-flight request tasks."""

    def __init__(self, ws: ServerConnection, server: BridgeServer) -> None:
        self.ws, self.server = ws, server
        self.service, self.limits = server.service, server.limits
        self.owner: str | None = None
        self.frames = 0
        self.tasks: set[asyncio.Task] = set()
        rate = server.config.max_frames_per_s
        self.bucket, self.refilled, self.limited = rate, time.monotonic(), 0

    async def send(self, msg: pr.Message) -> None:
        try:
            await self.ws.send(msg.encode())
        except ConnectionClosed:
            pass  # the device resumes and is answered again from the sequence tracker

    async def error(self, e: pr.ProtocolError, session: int = 0, seq: int = 0) -> None:
        self.server.metrics.error(e.code)
        await self.send(pr.Error.from_exception(e, session, seq))

    def _admit(self) -> bool:
        rate = self.server.config.max_frames_per_s
        now = time.monotonic()
        self.bucket = min(rate, self.bucket + (now - self.refilled) * rate)
        self.refilled = now
        if self.bucket < 1:
            return False
        self.bucket -= 1
        return True

    async def receive(self, frame) -> bool:
        """Handle one frame; False closes the connection."""
        self.frames += 1
        if not self._admit():
            self.limited += 1
            if self.limited >= self.server.config.flood_close_after:
                _event(logging.WARNING, "flood: closing", frames=self.frames)
                await self.ws.close(1008, "too many frames")
                return False
            await self.error(pr.ProtocolError(pr.ErrorCode.RATE_LIMITED, "too many frames; back off"))
            return True
        self.limited = 0
        session = seq = 0
        try:
            header = pr.read_header(frame, self.limits)
            session, seq = header.session, header.seq
            msg = pr.decode(frame, self.limits)
            return await self._dispatch(msg, bytes(frame))
        except pr.ProtocolError as e:
            await self.error(e, session, seq)
            if self.owner is None or e.code in (pr.ErrorCode.BAD_VERSION, pr.ErrorCode.UNAUTHORIZED):
                await self.ws.close(1008, e.code.name)
                return False
            return True

    async def _dispatch(self, msg: pr.Message, frame: bytes) -> bool:
        if isinstance(msg, pr.Hello):
            return await self._hello(msg)
        if self.owner is None:
            raise pr.ProtocolError(pr.ErrorCode.UNAUTHORIZED, "say Hello with a bearer token first")
        if isinstance(msg, pr.Open):
            self._spawn(self._open(msg))
        elif isinstance(msg, pr.Verify):
            s = self.service.get(msg.session, self.owner)
            cached = s.tracker.check(msg.seq, frame)
            if cached is not None:
                await self.send(cached)
            else:
                self._spawn(self._verify(s, msg))
        elif isinstance(msg, pr.Resume):
            s = self.service.get(msg.session, self.owner)
            missed = s.tracker.resume(msg.last_seq)
            position, tokens = (s.frontier, np.zeros(0, np.int64)) if missed is None else \
                self.service.missed(s, missed)
            await self.send(pr.Resumed(session=s.id, next_seq=s.tracker.next_seq, position=position, tokens=tokens))
        elif isinstance(msg, pr.Close):
            if msg.session == 0:
                return False
            self.service.get(msg.session, self.owner)
            self.service.close(msg.session)
        else:
            raise pr.ProtocolError(pr.ErrorCode.UNEXPECTED, f"a device does not send {type(msg).__name__}")
        return True

    async def _hello(self, msg: pr.Hello) -> bool:
        if self.owner is not None:
            raise pr.ProtocolError(pr.ErrorCode.UNEXPECTED, "Hello was already said on this connection")
        tokens = self.server.config.tokens
        if tokens is not None and msg.auth_token not in tokens:
            raise pr.ProtocolError(pr.ErrorCode.UNAUTHORIZED, "unknown bearer token")
        pr.choose_version(msg.versions)
        self.owner = msg.auth_token
        await self.send(pr.Welcome(limits=self.limits, idle_timeout_ms=int(1000 * self.server.config.idle_timeout_s),
                                   model="ciar-builtin-cloud"))
        return True

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, msg: pr.Open) -> None:
        try:
            s, prefix = await self.server.batcher.run(self.service.open(msg, self.owner))
        except pr.ProtocolError as e:
            await self.error(e)
            return
        except Exception as e:  # noqa: BLE001
            _event(logging.ERROR, "open failed", error=repr(e))
            await self.error(pr.ProtocolError(pr.ErrorCode.INTERNAL, "open failed"))
            return
        self.server.metrics.sessions_opened += 1
        _event(logging.INFO, "session opened", session=s.id, prefix=len(prefix))
        await self.send(pr.Opened(session=s.id, tokens=prefix))

    async def _verify(self, s, msg: pr.Verify) -> None:
        t0, timing = time.perf_counter(), StepTiming()
        try:
            verdict = await self.server.batcher.run(self.service.verify(s, msg), timing)
        except pr.ProtocolError as e:
            s.tracker.release(msg.seq)
            await self.error(e, msg.session, msg.seq)
            return
        except Exception as e:  # noqa: BLE001
            s.tracker.release(msg.seq)
            _event(logging.ERROR, "verify failed", session=s.id, error=repr(e))
            await self.error(pr.ProtocolError(pr.ErrorCode.INTERNAL, "verify failed"), msg.session, msg.seq)
            return
        s.tracker.answer(msg.seq, verdict)
        self.server.metrics.verify_requests += 1
        self.server.metrics.latency(1000 * (time.perf_counter() - t0), timing)
        await self.send(verdict)


class ServerThread:
    """A server on its own event loop in a background thread (for `ciar demo`, benches and tests)."""

    def __init__(self, service: CloudService, config: ServerConfig) -> None:
        self.server = BridgeServer(service, config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ciar-serve", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(self._ready))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the bridge server did not start: {self._error!r}")
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
        self._thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
