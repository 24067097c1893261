"""Loopback upstreams for tests, benchmarks and demos: small aiohttp servers in a process
of their own (so they can be killed for real), each answering with its endpoint id.

    python -m streams.sidecar.testing --listen a=9001 --listen b=9002

Every response carries ``X-Endpoint: <id>``. Paths: ``/big?kb=N`` (N KiB of text),
``/gzip`` (a gzip-encoded body with ``Content-Encoding: gzip``), ``/slow?ms=N``,
``/cached`` (``Cache-Control: public, max-age=3600`` and an ETag: what a cache may keep),
``/echo`` (echoes the request body); anything else answers ``<id>``.

>>> with BackendProcess({"a": 0}) as b:            # doctest: +SKIP
...     print(b.urls["a"])
http://127.0.0.1:40123
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import Any

from aiohttp import web


def backend_app(endpoint_id: str) -> web.Application:
    """The aiohttp app of one loopback upstream."""
    hdr = {"X-Endpoint": endpoint_id}
    plain = endpoint_id.encode()
    zipped = gzip.compress((endpoint_id + " ") .encode() * 200)

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/big":
            kb = int(request.query.get("kb", "64"))
            return web.Response(body=b"x" * (kb * 1024), headers=hdr, content_type="text/plain")
        if path == "/gzip":
            return web.Response(body=zipped, headers={**hdr, "Content-Encoding": "gzip"},
                                content_type="text/plain")
        if path == "/cached":
            return web.Response(body=plain, content_type="text/plain", headers={
                **hdr, "Cache-Control": "public, max-age=3600", "ETag": f'"{endpoint_id}"'})
        if path == "/slow":
            await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
        if path == "/echo":
            return web.Response(body=await request.read(), headers=hdr)
        return web.Response(body=plain, headers=hdr, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_site(app: web.Application, port: int = 0, *,
                     backlog: int = 1024) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1:``port`` (0 = a free one); the runner and the port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=backlog, reuse_address=True).start()
    return runner, int(runner.addresses[0][1])


async def serve_until_signal(runners: list[web.AppRunner]) -> None:
    """Wait for SIGTERM or SIGINT, then clean ``runners`` up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in runners:
        await r.cleanup()


async def _serve(listen: dict[str, int]) -> None:
    runners = [(await start_site(backend_app(eid), port))[0] for eid, port in listen.items()]
    print("ready", flush=True)
    await serve_until_signal(runners)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--listen", action="append", default=[], help="ID=PORT (repeatable)")
    args = p.parse_args(argv)
    listen = {}
    for item in args.listen:
        eid, _, port = item.partition("=")
        listen[eid] = int(port)
    try:
        import uvloop

        uvloop.run(_serve(listen))
    except ImportError:
        asyncio.run(_serve(listen))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackendProcess:
    """Loopback upstreams ``{endpoint_id: port (0 = free)}`` in one child process."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = {eid: p or _free_port() for eid, p in ports.items()}
        self.urls = {eid: f"http://127.0.0.1:{p}" for eid, p in self.ports.items()}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> BackendProcess:
        args = [sys.executable, "-m", "streams.sidecar.testing"]
        for eid, port in self.ports.items():
            args += ["--listen", f"{eid}={port}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once every port listens
        if line.strip() != b"ready" or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"backend process did not start: {line!r}")
        return self

    def kill(self) -> None:
        """SIGKILL: connections drop, ports refuse (a crashed upstream)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def score_record(
    endpoint_id: str,
    score: float,
    *,
    api: str = "default",
    region: str = "central",
    valid_for_s: float = 10.0,
    step_seconds: int = 1,
    predicted_utilization: float = 0.3,
    capacity_rps: float = 1000.0,
    at_ms: int | None = None,
) -> dict[str, Any]:
    """A LoadScore dict as the scoring processor would publish it (for tests/benchmarks)."""
    now = at_ms if at_ms is not None else int(time.time() * 1000)
    return {
        "endpoint_id": endpoint_id, "api": api, "region": region,
        "computed_at": now, "valid_until": now + int(valid_for_s * 1000),
        "score": score, "capacity_rps": capacity_rps, "capacity_source": "CONFIGURED",
        "current_rps": 0.0, "predicted_utilization": predicted_utilization,
        "latency_p99_ms": 5.0, "error_rate": 0.0, "anomaly_score": 0.0,
        "step_seconds": step_seconds, "forecast": [], "model": "test", "reasons": [],
    }


if __name__ == "__main__":
    main()
