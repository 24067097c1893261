"""HAProxy as a :class:`DataPlane`: a process of our own (or one attached to by its admin
socket), weights pushed through the runtime API, and three loops: the push of pending
weights, the stale-score fallback (weights from HAProxy's own stats) and telemetry from
HAProxy's per-server counters for the edge agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import ClassVar

from streams.kafka.broker import free_port
from streams.sidecar import metrics as m
from streams.sidecar.config import UpstreamConfigError
from streams.sidecar.dataplane import DataPlaneError, PlaneContext, Telemetry
from streams.sidecar.haproxy import (
    HAProxyProcess,
    RuntimeAPI,
    backend_name,
    haproxy_balance,
    render_config,
    server_counts,
)
from streams.sidecar.weights import WeightChange

log = logging.getLogger(__name__)

HAPROXY_FALLBACK_S = 1.0  # stale scores: peak-EWMA-like weights from HAProxy stats this often
HAPROXY_TELEMETRY_S = 1.0
# HAProxy per-server counters -> a representative status for the edge agent (0 = connect)
STATUS_COLUMNS = {"hrsp_1xx": 100, "hrsp_2xx": 200, "hrsp_3xx": 300, "hrsp_4xx": 400,
                  "hrsp_5xx": 500, "econ": 0}


class HAProxyPlane:
    """HAProxy driven through its runtime API (``sidecar.haproxy_socket``: attach)."""

    mirrors: ClassVar[bool] = False

    def __init__(self, ctx: PlaneContext) -> None:
        self.ctx = ctx
        self.router = ctx.router
        self.process: HAProxyProcess | None = None  # None when attached
        self.runtime: RuntimeAPI | None = None
        self.port = 0
        self.errors = 0  # failed weight pushes
        self._pending: dict[str, dict[str, int]] = {}
        self._push = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, telemetry: Telemetry | None) -> None:
        s = self.ctx.settings
        self._push = asyncio.Event()
        if s.haproxy_socket is not None:  # attach to a running HAProxy
            self.runtime = RuntimeAPI(s.haproxy_socket)
            stats = await self.runtime.stats()
            have = {(r["pxname"], r["svname"]) for r in stats}
            missing = [f"{backend_name(u.api)}/{u.id}" for u in self.ctx.upstreams
                       if (backend_name(u.api), u.id) not in have]
            if missing:
                raise UpstreamConfigError(
                    f"sidecar.haproxy_socket: HAProxy has no server {', '.join(missing)}"
                )
            self.port = s.listen_port
        else:
            self.port = s.listen_port or free_port(s.listen_host)
            proc = HAProxyProcess("", binary=s.haproxy_bin)
            sock = proc.dir / "admin.sock"
            proc.config_path.write_text(render_config(
                self.ctx.upstreams, bind=f"{s.listen_host}:{self.port}", socket_path=sock,
                threads=s.haproxy_threads, connect_timeout_s=s.connect_timeout_s,
                request_timeout_s=s.request_timeout_s,
                eject_after_failures=s.eject_after_failures,
                cache=s.cache, compression=s.compression,
                balance=haproxy_balance(s.policy, s.haproxy_balance),
            ))
            await asyncio.to_thread(proc.start, sock)
            self.process = proc
            self.runtime = RuntimeAPI(sock)
        self._tasks.append(asyncio.create_task(self._push_loop(), name="sidecar-haproxy"))
        self._tasks.append(asyncio.create_task(self._fallback_loop(),
                                               name="sidecar-haproxy-fallback"))
        if telemetry is not None:
            self._tasks.append(asyncio.create_task(self._telemetry_loop(telemetry),
                                                   name="sidecar-haproxy-telemetry"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
            self.process = None

    def apply(self, change: WeightChange) -> None:
        if self.runtime is not None:
            self._pending[change.api] = dict(change.haproxy)
            self._push.set()

    async def counters(self) -> dict[str, dict[str, int]]:
        assert self.runtime is not None
        stats = await self.runtime.stats()
        return {api: server_counts(stats, api) for api in self.router.routes}

    def set_dynamic_routing(self, enabled: bool) -> None:
        """HAProxy goes by the request header only (``be_<api>_first``)."""

    def alive(self) -> bool:
        return self.process is None or self.process.alive()

    def check(self) -> None:
        if self.process is not None:
            self.process.check_alive("haproxy", DataPlaneError)

    # ------------------------------------------------------------------ loops

    async def _push_loop(self) -> None:
        assert self.runtime is not None
        sid = self.ctx.sidecar_id
        while True:
            await self._push.wait()
            self._push.clear()
            pending, self._pending = self._pending, {}
            if not pending:
                continue
            try:
                await self.runtime.set_weights(pending)
                m.HAPROXY_UPDATES.labels(sid, "ok").inc()
            except (OSError, TimeoutError, RuntimeError) as e:
                self.errors += 1
                m.HAPROXY_UPDATES.labels(sid, "error").inc()
                log.error("pushing weights to HAProxy failed: %s", e)
                for api, ws in pending.items():  # keep them for the next push
                    self._pending.setdefault(api, ws)
                await asyncio.sleep(0.5)
                self._push.set()

    async def _fallback_loop(self) -> None:
        """With stale scores HAProxy still balances by weight: set weights from its own
        per-server response time and queue (cost = rtime × (current + 1), as peak-EWMA)."""
        assert self.runtime is not None
        while True:
            await asyncio.sleep(HAPROXY_FALLBACK_S)
            stale = [api for api, r in self.router.routes.items() if r.stale]
            if not stale:
                continue
            try:
                stats = await self.runtime.stats()
            except (OSError, TimeoutError) as e:
                log.warning("reading HAProxy stats failed: %s", e)
                continue
            for api in stale:
                costs = fallback_costs(stats, api)
                if costs:
                    self._pending[api] = cost_weights(costs)
                    self._push.set()

    async def _telemetry_loop(self, agent: Telemetry) -> None:
        """HAProxy routes the requests: feed the edge agent from its per-server counters
        (deltas of responses by status class and connection errors each second, latency
        = HAProxy's mean response time of the server)."""
        assert self.runtime is not None
        last: dict[tuple[str, str], dict[str, int]] = {}
        while True:
            await asyncio.sleep(HAPROXY_TELEMETRY_S)
            try:
                stats = await self.runtime.stats()
            except (OSError, TimeoutError) as e:
                log.warning("reading HAProxy stats failed: %s", e)
                continue
            for row in stats:
                api = row.get("pxname", "")[3:]
                ep = row.get("svname", "")
                if not row.get("pxname", "").startswith("be_") or api not in self.router.routes \
                        or ep not in self.router.endpoints:
                    continue  # the "_first" twins and FRONTEND/BACKEND rows
                now = {k: int(row.get(k) or 0) for k in STATUS_COLUMNS}
                prev = last.get((api, ep))
                last[(api, ep)] = now
                if prev is None:
                    if self.process is None:
                        continue  # attached: counters from before us are not ours
                    prev = dict.fromkeys(STATUS_COLUMNS, 0)  # our own HAProxy: from 0
                rtime = float(row.get("rtime") or 0)
                for col, status in STATUS_COLUMNS.items():
                    n = max(0, now[col] - prev[col])
                    if n:  # one weighted call per status class, not one per request
                        agent.record(ep, rtime, status, api=api, connect_failure=status == 0,
                                     count=n)


def fallback_costs(stats: Sequence[dict[str, str]], api: str) -> dict[str, float]:
    """Per-server cost from ``show stat``: mean response time (ms, last 1024 requests) ×
    (current sessions + 1); servers that are down are left out."""
    out = {}
    for row in stats:
        if row.get("pxname") != backend_name(api) or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        if not str(row.get("status", "")).startswith("UP"):
            continue
        rtime = float(row.get("rtime") or 0) or 1.0
        out[row["svname"]] = rtime * (int(row.get("scur") or 0) + 1)
    return out


def cost_weights(costs: dict[str, float]) -> dict[str, int]:
    """HAProxy weights inversely proportional to cost (cheapest = 256, never 0).

    >>> cost_weights({"a": 1.0, "b": 4.0})
    {'a': 256, 'b': 64}
    """
    best = min(costs.values())
    return {k: max(1, min(256, round(256 * best / v))) for k, v in costs.items()}
