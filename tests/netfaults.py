"""A TCP proxy on localhost that injects real network faults between a device and the bridge: cut every
connection (optionally right after forwarding the device's next message, so the server answers into a dead
socket), or stall (stop forwarding the server's replies)."""
from __future__ import annotations

import asyncio
import threading


class FaultyProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_after_next_upstream = False
        self.stalled = False
        self.connections = 0
        self.cuts = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(10)
        return f"ws://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            try:
                while data := await src.read(65536):
                    while self.stalled and not upstream:
                        await asyncio.sleep(0.01)
                    dst.write(data)
                    await dst.drain()
                    if upstream and self.cut_after_next_upstream:
                        self.cut_after_next_upstream = False
                        await asyncio.sleep(0.05)  # let the server read it; its reply finds a dead socket
                        self._cut_all()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def _cut_all(self) -> None:
        self.cuts += 1
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        """Abort every open connection now (thread-safe)."""
        done = threading.Event()
        self.loop.call_soon_threadsafe(lambda: (self._cut_all(), done.set()))
        done.wait(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
