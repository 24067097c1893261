"""``--sql`` is read-only for real: through the sink's admin endpoint (the right token, a
real embedded chDB) no statement writes a file, reads a file or URL, reaches another
server or changes a setting; each refusal is a 4xx with clean JSON naming what was used.
A "forbidden" server on 127.0.0.1 counts any connection; it must get none."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sinks.admin import AdminServer, make_app
from sinks.db import connect
from sinks.ddl import migrate
from sinks.errors import QueryError
from sinks.queries import QueryResult, run_sql
from sinks.service import run_body
from sinks.settings import SinkSettings
from sinks.sqlguard import SqlRefused, check_sql

TOKEN = "s3cret"


class Forbidden:
    """A loopback TCP listener that must never be contacted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.sock.close()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[str]:
    settings = SinkSettings(dsn=f"chdb://{tmp_path}/ch")
    client = connect(settings)
    migrate(client, settings.ttl_days)
    lock = threading.Lock()

    def run(body: dict[str, Any]) -> QueryResult:
        with lock:
            return run_body(client, body)

    server = AdminServer(make_app(TOKEN, run, lambda: {"clickhouse_up": True})).start()
    try:
        yield server.url
    finally:
        server.stop()
        client.close()


def post(url: str, sql: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"{url}/query", data=json.dumps({"sql": sql}).encode(), method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())  # every answer must be JSON


def test_sql_that_reaches_files_urls_or_servers_is_refused_naming_it(
    admin: str, tmp_path: Path
) -> None:
    forbidden = Forbidden()
    fp = forbidden.port
    out = tmp_path / "written.csv"
    attacks = {
        f"INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1": "INSERT",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')": "file",
        "SELECT * FROM FiLe /* x */ ('/etc/passwd', 'LineAsString')": "FiLe",
        "SELECT * FROM `file`('/etc/passwd', 'LineAsString')": "file",
        "SELECT * FROM \"file\"('/etc/passwd', 'LineAsString')": "file",
        "SELECT file('/etc/passwd')": "file",
        f"SELECT * FROM url('http://127.0.0.1:{fp}/x', 'LineAsString')": "url",
        f"SELECT * FROM urlCluster('default', 'http://127.0.0.1:{fp}/', 'LineAsString')":
            "urlCluster",
        f"SELECT * FROM s3('http://127.0.0.1:{fp}/b/k', 'CSV')": "s3",
        f"SELECT * FROM remote('127.0.0.1:{fp}', system.one)": "remote",
        f"SELECT * FROM remoteSecure('127.0.0.1:{fp}', system.one)": "remoteSecure",
        f"SELECT * FROM mysql('127.0.0.1:{fp}', 'd', 't', 'u', 'p')": "mysql",
        f"SELECT * FROM postgresql('127.0.0.1:{fp}', 'd', 't', 'u', 'p')": "postgresql",
        f"SELECT * FROM hdfs('hdfs://127.0.0.1:{fp}/x', 'CSV')": "hdfs",
        "SELECT * FROM input('x String')": "input",
        "SELECT * FROM executable('id', 'CSV', 'x String')": "executable",
        "WITH p AS (SELECT * FROM file('/etc/passwd', 'LineAsString')) SELECT * FROM p": "file",
        "(SELECT * FROM file('/etc/passwd', 'LineAsString'))": "file",
        "DESCRIBE TABLE file('/etc/passwd', 'LineAsString')": "file",
        "EXPLAIN SELECT * FROM file('/etc/passwd', 'LineAsString')": "file",
        "SET readonly = 0": "SET",
        "SELECT 1 SETTINGS readonly = 0": "SETTINGS",
        f"SELECT 1 INTO OUTFILE '{out}'": "OUTFILE",
        "SELECT 1; SELECT * FROM file('/etc/passwd')": ";",
        "SELECT 1; DROP TABLE telemetry": ";",
        "DROP TABLE telemetry": "DROP",
        "CREATE TABLE x ENGINE = URL('http://127.0.0.1:1/') AS SELECT 1": "CREATE",
        "SYSTEM SHUTDOWN": "SYSTEM",
        "SELECT 'unterminated": "unterminated",
    }
    try:
        for sql, name in attacks.items():
            status, body = post(admin, sql)
            assert 400 <= status < 500, (sql, status, body)
            assert set(body) == {"error"} and name in body["error"], (sql, body)
        assert not out.exists()
        assert forbidden.connections == 0
        # what --sql is for still works, quoted names of functions included
        ok = {
            "SELECT count() FROM telemetry": [[0]],
            "SELECT 'file(/etc/passwd)' AS s -- url('x')": [["file(/etc/passwd)"]],
            "SELECT number FROM numbers(2)": [[0], [1]],
            "EXISTS TABLE telemetry": [[1]],
        }
        for sql, rows in ok.items():
            status, body = post(admin, sql)
            assert status == 200 and body["rows"] == rows, (sql, status, body)
        status, body = post(admin, "SHOW TABLES")
        assert status == 200 and ["telemetry"] in body["rows"]
    finally:
        forbidden.close()


def test_direct_run_sql_refuses_the_same(tmp_path: Path) -> None:
    client = connect(SinkSettings(dsn=f"chdb://{tmp_path}/ch"))
    try:
        with pytest.raises(QueryError, match="file"):
            run_sql(client, "SELECT * FROM file('/etc/passwd', 'LineAsString')")
        with pytest.raises(QueryError, match="SET"):
            run_sql(client, "SET readonly = 0")
        assert run_sql(client, "SELECT 1 AS x").rows == [[1]]
    finally:
        client.close()


def test_guard_reads_sql_like_clickhouse_does() -> None:
    check_sql("SELECT url, file FROM t WHERE s = 'remote(x)' -- file('/etc/passwd')")
    check_sql("SELECT `url` FROM t;")
    check_sql("/* file('x') */ SELECT 1")
    for bad in ("SELECT 1 /* unterminated", "SELECT \"x", "", "   ;"):
        with pytest.raises(SqlRefused):
            check_sql(bad)
