"""The sink as a service (sink + admin endpoint + metrics) and queries that find their way.

``serve(kafka, settings, stop)`` runs :class:`sinks.sink.Sink` with the admin endpoint;
for an embedded chDB DSN it writes ``<chdb dir>.admin.json`` (mode 0600: url, pid, and the
token when the sink made one) so that ``query()`` in another process can reach it.

``query(settings, body)`` runs a canned query or SQL: directly on ClickHouse when it can
(a server DSN, or a chDB directory nobody holds), else through the running sink's admin
endpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.validation import DEFAULT_LIMITS, Limits
from sinks.admin import AdminError, AdminServer, fetch_query, make_app
from sinks.db import ClickHouseUnavailable, chdb_locked, chdb_path, close_quietly, connect
from sinks.errors import QueryError
from sinks.queries import QueryResult, run_canned, run_sql
from sinks.settings import SinkSettings
from sinks.sink import Sink, SinkStats, describe

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


def admin_file(settings: SinkSettings) -> Path | None:
    """Where a sink on embedded chDB advertises its admin endpoint (None for servers)."""
    path = chdb_path(settings.dsn)
    return None if path is None else path.parent / f"{path.name}.admin.json"


def run_body(client: Client, body: dict[str, Any]) -> QueryResult:
    """Run a request body ``{"query": NAME | "sql": SQL, "params": {...}}`` on ``client``."""
    params = body.get("params") or {}
    if "sql" in body:
        if not isinstance(body["sql"], str):
            raise QueryError("\"sql\" must be a string")
        return run_sql(client, body["sql"], params)
    if not isinstance(body.get("query"), str):
        raise QueryError("\"query\" must be a query name")
    return run_canned(client, body["query"], params)


class _QueryClients:
    """One client per admin worker thread (clients are not shared across threads)."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._all: list[Client] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> QueryResult:
        client = getattr(self._local, "client", None)
        if client is None:
            try:
                client = connect(self.settings)
            except ClickHouseUnavailable as e:
                from clickhouse_connect.driver.exceptions import OperationalError

                raise OperationalError(str(e)) from e
            self._local.client = client
            with self._lock:
                self._all.append(client)
        return run_body(client, body)

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                close_quietly(c)
            self._all.clear()


def serve(
    kafka: KafkaSettings,
    settings: SinkSettings,
    stop: threading.Event,
    *,
    on_ready: Any = None,
    until_idle: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> SinkStats:
    """Run the sink (and its admin endpoint) until ``stop`` is set; ``limits``: the
    processor's validation bounds (the sink stores exactly what the worker accepts)."""
    sink = Sink(kafka, settings, limits=limits)
    admin: AdminServer | None = None
    clients = _QueryClients(settings)
    file = admin_file(settings)
    try:
        if settings.admin_enabled:
            token = settings.admin_token.get_secret_value()
            generated = not token
            token = token or secrets.token_urlsafe(24)

            def status() -> dict[str, Any]:
                return {
                    "clickhouse_up": sink.last_error is None and sink.ready.is_set(),
                    "last_error": sink.last_error,
                    "lag": sink.last_lag(),
                    "stats": describe(sink.stats),
                }

            admin = AdminServer(make_app(token, clients, status), settings.admin_host,
                                settings.admin_port).start()
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                info = {"url": admin.url, "pid": os.getpid()}
                if generated:
                    info["token"] = token
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(info, f)
            log.info("admin endpoint on %s", admin.url)
        if on_ready is not None:
            on_ready(sink, admin)
        return sink.run(stop, until_idle=until_idle)
    finally:
        if admin is not None:
            admin.stop()
        clients.close()
        if file is not None:
            with contextlib.suppress(OSError):
                info = json.loads(file.read_text())
                if info.get("pid") == os.getpid():
                    file.unlink()


def query(settings: SinkSettings, body: dict[str, Any], via: str = "auto") -> QueryResult:
    """Run ``body`` directly on ClickHouse, or through the running sink (``via`` = auto,
    direct or admin). Raises :class:`QueryError` for bad requests and
    :class:`ClickHouseUnavailable` / :class:`sinks.admin.AdminError` when neither works."""
    path = chdb_path(settings.dsn)
    use_admin = via == "admin" or (via == "auto" and path is not None and chdb_locked(path))
    if not use_admin:
        if path is not None and not (path / "status").exists() and not path.is_dir():
            raise ClickHouseUnavailable(
                f"no data at {path}: run `loadcast sink` first (or set sink.dsn)"
            )
        try:
            client = connect(settings, create_database=False)
        except ClickHouseUnavailable:
            if via == "auto" and path is not None and chdb_locked(path):
                return _via_admin(settings, body)  # the sink started meanwhile
            raise
        try:
            return run_body(client, body)
        finally:
            close_quietly(client)
    return _via_admin(settings, body)


def _via_admin(settings: SinkSettings, body: dict[str, Any]) -> QueryResult:
    url = f"http://{settings.admin_host}:{settings.admin_port}"
    token = settings.admin_token.get_secret_value()
    file = admin_file(settings)
    if file is not None and file.exists():
        try:
            info = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise AdminError(f"cannot read {file}: {e}") from e
        url = info.get("url", url)
        token = token or info.get("token", "")
    if not token:
        raise AdminError(
            "the sink holds the chDB directory; set sink.admin_token "
            "(LOADCAST_SINK__ADMIN_TOKEN) to the sink's token to query through it"
        )
    return fetch_query(url, token, body)
