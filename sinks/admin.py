"""The sink's admin HTTP endpoint: queries while the sink holds the embedded chDB directory.

An embedded chDB directory opens in one process only, so while ``loadcast sink`` runs,
``loadcast query`` asks it over HTTP instead (aiohttp, loopback by default, bearer token):

- ``GET /health`` (no token): ``{"status": "ok" | "degraded"}``.
- ``GET /status``: lag per topic, counters, last ClickHouse error.
- ``POST /query``: ``{"query": "latency", "params": {...}}`` or
  ``{"sql": "SELECT ...", "params": {...}}`` (read-only, bound parameters) →
  ``{"columns": [...], "rows": [[...]], "truncated": false}``.

Bad requests get 4xx with ``{"error": "..."}``; a missing or wrong token gets 401.
From Python, with a sink running (so not a doctest)::

    fetch_query("http://127.0.0.1:8125", "s3cret", {"query": "latency"})
    # -> QueryResult(columns=[...], rows=[...], truncated=False)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sinks.errors import QueryError
from sinks.queries import QueryResult

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
QueryFn = Callable[[dict[str, Any]], QueryResult]


class AdminError(RuntimeError):
    """The admin endpoint could not be reached or refused the request."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_app(
    token: str, run_query: QueryFn, status: Callable[[], dict[str, Any]]
) -> web.Application:
    """The aiohttp application; ``run_query`` runs in a worker thread (blocking client)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/health":
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer …)")
        resp: web.StreamResponse = await handler(request)
        return resp

    async def health(request: web.Request) -> web.Response:
        s = status()
        return web.json_response({"status": "ok" if s.get("clickhouse_up") else "degraded"})

    async def status_view(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def query(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body must be JSON: {\"query\": NAME, \"params\": {...}}")
        if not isinstance(body, dict) or ("query" in body) == ("sql" in body):
            return _error(400, "body must have exactly one of \"query\" (a name) or \"sql\"")
        if not isinstance(body.get("params", {}), dict):
            return _error(400, "\"params\" must be an object")
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, run_query, body)
        except QueryError as e:
            return _error(400, str(e))
        except Exception as e:  # ClickHouse said no: bad SQL, or it is unavailable
            from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

            if isinstance(e, OperationalError):
                return _error(503, f"ClickHouse unavailable: {e}")
            if isinstance(e, DatabaseError):
                return _error(400, f"ClickHouse refused the query: {e}")
            log.exception("admin query failed")
            return _error(500, f"{type(e).__name__}: {e}")
        return web.json_response(result.to_json())

    app = web.Application(middlewares=[auth], client_max_size=MAX_BODY)
    app.router.add_get("/health", health)
    app.router.add_get("/status", status_view)
    app.router.add_post("/query", query)
    return app


class AdminServer:
    """Runs :func:`make_app` on ``host:port`` in a daemon thread with its own event loop."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> AdminServer:
        """Start serving; raises OSError when the port cannot be bound."""
        self._thread = threading.Thread(target=self._run, name="sink-admin", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise OSError(f"admin endpoint did not start on {self.host}:{self.port}")
        if self._error is not None:
            raise OSError(f"admin endpoint on {self.host}:{self.port}: {self._error}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._runner = web.AppRunner(self.app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            loop.run_until_complete(site.start())
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self.port = int(server.sockets[0].getsockname()[1])
        except BaseException as e:
            self._error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        """Stop serving and join the thread; idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


def fetch_query(url: str, token: str, body: dict[str, Any], timeout: float = 60.0) -> QueryResult:
    """POST ``body`` to ``url``/query and return the result (blocking).

    Raises :class:`QueryError` for 400 answers and :class:`AdminError` otherwise.
    """
    import aiohttp

    async def go() -> QueryResult:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.post(
                f"{url.rstrip('/')}/query", json=body,
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            try:
                data = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                data = {"error": (await resp.text())[:500]}
            if resp.status == 400:
                raise QueryError(str(data.get("error")))
            if resp.status != 200:
                raise AdminError(f"{url} answered {resp.status}: {data.get('error')}")
            return QueryResult.from_json(data)

    try:
        return asyncio.run(go())
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise AdminError(f"cannot reach the sink's admin endpoint at {url}: {e}") from e
