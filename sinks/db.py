"""Opening ClickHouse: embedded chDB on disk or a server, the same client API both ways.

``connect(settings)`` returns a clickhouse-connect client whose current database is
``settings.database`` (created if missing). An embedded chDB directory can be open in one
process only; :func:`chdb_locked` tells whether another process holds it (cheaply, without
loading chDB), so ``loadcast query`` knows to ask the running sink instead.

>>> chdb_path("chdb://.loadcast/clickhouse").name
'clickhouse'
>>> chdb_path("http://127.0.0.1:8123") is None
True
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sinks.settings import SinkSettings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


class ClickHouseUnavailable(RuntimeError):
    """ClickHouse cannot be reached (server down, chDB directory locked, ...)."""


def chdb_path(dsn: str) -> Path | None:
    """The directory of a ``chdb://PATH`` DSN (relative paths from the working directory)."""
    if not dsn.startswith("chdb://"):
        return None
    return Path(dsn[len("chdb://"):]).expanduser().absolute()


def chdb_locked(path: Path) -> bool:
    """True when another process has the chDB directory at ``path`` open.

    chDB (like clickhouse-server) holds an exclusive ``flock`` on ``PATH/status`` while
    its engine is open; probing that lock is far cheaper than failing to open the engine.
    """
    status = path / "status"
    if not status.exists():
        return False
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def connect(settings: SinkSettings, *, create_database: bool = True) -> Client:
    """A client on ``settings.dsn`` with ``settings.database`` as current database.

    Raises :class:`ClickHouseUnavailable` when the target cannot be reached.
    """
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import ClickHouseError

    path = chdb_path(settings.dsn)
    try:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            client = clickhouse_connect.get_client(interface="chdb", path=str(path))
        else:
            # clickhouse-connect infers TLS from the port (8443/443), not from the scheme:
            # an https:// or clickhouses:// DSN on any port must mean TLS.
            secure = settings.dsn.split("://", 1)[0].lower() in ("https", "clickhouses")
            client = clickhouse_connect.get_client(
                dsn=settings.dsn,
                secure=secure,
                username=settings.user,
                password=settings.password.get_secret_value() if settings.password else "",
                connect_timeout=settings.connect_timeout_seconds,
                send_receive_timeout=max(30.0, settings.connect_timeout_seconds),
                autogenerate_session_id=False,
            )
        if create_database:
            client.command(f"CREATE DATABASE IF NOT EXISTS `{settings.database}`")
        client.database = settings.database
    except (ClickHouseError, OSError) as e:
        raise ClickHouseUnavailable(f"cannot open ClickHouse at {settings.dsn}: {e}") from e
    return client


def close_quietly(client: Client | None) -> None:
    """Close a client, ignoring errors (the target may already be gone)."""
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()
