"""The demo's open-loop load generator: the same seeded arrival schedule sent to every
policy lane at the same instants, whatever the responses (open loop: a slow lane does not
slow its own arrivals). Bounded: a fixed request budget (the schedule), a deadline, and a
cap on requests in flight per lane (arrivals past it are counted as ``dropped``).

Each lane's client-side outcome (latency, status) goes to an edge agent as endpoint
``client-<policy>-<region>`` of API ``demo-client``: that telemetry is what the report's
latency numbers are computed from in ClickHouse.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from loadcast.demo.scenario import LATE_ARRIVAL_S
from streams.sidecar.director import REGION_HEADER

Recorder = Callable[[str, str, str, float, int, bool, bool], None]


def client_endpoint(policy: str, region: str) -> str:
    """The telemetry endpoint id of a lane's client-side measurements."""
    return f"client-{policy}-{region}"


@dataclass
class LaneStats:
    """What one lane's requests did so far (for the live view)."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    dropped: int = 0
    in_flight: int = 0
    recent: deque[tuple[float, float, bool]] = field(default_factory=deque)  # (t, ms, ok)
    by_endpoint: dict[str, int] = field(default_factory=dict)

    def window(self, now: float, seconds: float) -> list[tuple[float, float, bool]]:
        while self.recent and self.recent[0][0] < now - 30:
            self.recent.popleft()
        # A copy first: the live view reads from another thread while requests append.
        return [r for r in list(self.recent) if r[0] >= now - seconds]

    def rate(self, now: float, seconds: float = 3.0) -> float:
        return len(self.window(now, seconds)) / seconds

    def p99(self, now: float, seconds: float = 5.0) -> float | None:
        lat = sorted(ms for _, ms, _ in self.window(now, seconds))
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))]

    def error_share(self, now: float, seconds: float = 5.0) -> float:
        w = self.window(now, seconds)
        return sum(1 for _, _, ok in w if not ok) / len(w) if w else 0.0


class LoadGenerator:
    """Send ``arrivals`` (seconds after ``start_epoch``, region) to every lane's sidecar
    of that region (``targets[policy][region]`` = base URL). The schedule is anchored to
    the wall clock (``start_epoch``; None = when :meth:`run` starts), so a late start
    catches up instead of shifting every arrival (and the demand's season) late."""

    def __init__(self, targets: dict[str, dict[str, str]], arrivals: list[tuple[float, str]],
                 record: Recorder, *, timeout_s: float = 3.0, max_in_flight: int = 400,
                 start_epoch: float | None = None) -> None:
        self.targets = targets
        self.arrivals = arrivals
        self.record = record
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.stats = {p: LaneStats() for p in targets}
        self.t_start = 0.0
        self.start_epoch = start_epoch
        # how well the schedule was kept: arrivals sent over LATE_ARRIVAL_S after their
        # time (the demo's own process starved of CPU sends late, and then in bursts)
        self.max_late_s = 0.0
        self.max_late_at = 0.0  # the arrival (seconds into the schedule) sent the latest
        self.late_arrivals = 0

    async def _one(self, cs: aiohttp.ClientSession, policy: str, region: str) -> None:
        st = self.stats[policy]
        st.in_flight += 1
        t = time.monotonic()
        status, connect_failure, timed_out, who = 0, False, False, ""
        try:
            async with cs.get(f"{self.targets[policy][region]}/orders",
                              headers={REGION_HEADER: region}) as r:
                await r.read()
                status, who = r.status, r.headers.get("X-Endpoint", "")
        except TimeoutError:
            timed_out = True
        except aiohttp.ClientError:
            connect_failure = True
        except asyncio.CancelledError:
            # still unanswered when the run ended: an error (a timeout in the telemetry), so
            # sent = ok + errors + dropped
            st.errors += 1
            self.record(policy, region, "", (time.monotonic() - t) * 1000.0, 0, False, True)
            raise
        finally:
            st.in_flight -= 1
        ms = (time.monotonic() - t) * 1000.0
        ok = 200 <= status < 400
        st.ok += ok
        st.errors += not ok
        st.recent.append((time.monotonic(), ms, ok))
        if who:
            st.by_endpoint[who] = st.by_endpoint.get(who, 0) + 1
        self.record(policy, region, "", ms, status, connect_failure, timed_out)

    async def run(self, should_stop: Callable[[], bool]) -> None:
        """Send the whole schedule (or until ``should_stop()``), then wait for the last
        answers (at most the client timeout)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        sessions = {p: aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=self.max_in_flight))
            for p in self.targets}
        tasks: set[asyncio.Task[None]] = set()
        try:
            self.t_start = time.monotonic()
            if self.start_epoch is not None:
                self.t_start += self.start_epoch - time.time()
            for at, region in self.arrivals:
                if should_stop():
                    break
                delay = self.t_start + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                late = time.monotonic() - self.t_start - at
                if late > self.max_late_s:
                    self.max_late_s, self.max_late_at = late, at
                self.late_arrivals += late > LATE_ARRIVAL_S
                for policy, cs in sessions.items():
                    st = self.stats[policy]
                    st.sent += 1
                    if st.in_flight >= self.max_in_flight:
                        st.dropped += 1
                        continue
                    task = asyncio.create_task(self._one(cs, policy, region))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks), timeout=self.timeout_s + 1)
        finally:
            for t in list(tasks):
                t.cancel()
            for cs in sessions.values():
                await cs.close()
