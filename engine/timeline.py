"""The simulated wall clock of one session.

Device and cloud run in one process here, one after the other, but on two machines in deployment. The timeline
records what the session did, in the device's order: device compute (measured), requests sent (their cloud
compute measured, their bytes counted) and the points where the device waited for a reply. Its wall time is then
computed for any link: a request sent at time s reaches the cloud half a round trip plus its upload later, is
served in order (after the requests before it), and its reply is back half a round trip plus its download after
the cloud is done; a wait moves the device's clock to that moment if it is not there yet. With one wait straight
after every send this is the plain sum device + cloud + link; when the device drafts while verifications are in
flight, the overlap is what it saves. The decode itself never depends on the clock (same seed, same image on
every link).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .link import LinkProfile


@dataclass(frozen=True)
class Request:
    cloud_s: float
    up_bytes: int
    down_bytes: int


@dataclass
class Timeline:
    events: list[tuple[str, float | int]] = field(default_factory=list)  # ("device", s) | ("send", id) | ("wait", id)
    requests: list[Request] = field(default_factory=list)
    device_seconds: float = 0.0

    @contextmanager
    def device(self):
        """Time device compute."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_device(time.perf_counter() - t0)

    def add_device(self, seconds: float) -> None:
        self.device_seconds += seconds
        self.events.append(("device", seconds))

    def send(self, request: Request) -> int:
        self.requests.append(request)
        self.events.append(("send", len(self.requests) - 1))
        return len(self.requests) - 1

    def wait(self, request_id: int) -> None:
        self.events.append(("wait", request_id))

    def link_seconds(self, link: LinkProfile) -> float:
        """Time the requests spend on `link` (round trips and transfers), overlapped or not."""
        return sum(link.request_s(r.up_bytes, r.down_bytes) for r in self.requests)

    def seconds(self, link: LinkProfile) -> float:
        """Wall time of the session on `link`."""
        now, cloud_free, answered = 0.0, 0.0, {}
        half = link.rtt_s / 2
        for kind, value in self.events:
            if kind == "device":
                now += value
            elif kind == "send":
                r = self.requests[value]
                cloud_free = max(now + half + link.transfer_s(r.up_bytes), cloud_free) + r.cloud_s
                answered[value] = cloud_free + half + link.transfer_s(r.down_bytes)
            else:
                now = max(now, answered[value])
        return now
