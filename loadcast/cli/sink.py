"""``loadcast sink`` and ``loadcast query``: the ClickHouse sink and the analytics over
its tables. Kafka and chDB/ClickHouse are imported inside the commands, keeping
``loadcast --help`` fast.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from loadcast.cli.common import SettingsFn, ensure_kafka, fail
from schemas.validation import Limits
from sinks.canned import CANNED
from sinks.errors import QueryError
from sinks.queries import QueryResult, parse_time
from streams.signals import stop_on_signals

if TYPE_CHECKING:
    from loadcast.settings import Settings
    from sinks.settings import SinkSettings
    from streams.kafka.settings import KafkaSettings


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class Via(StrEnum):
    auto = "auto"
    direct = "direct"
    admin = "admin"


def render(result: QueryResult, fmt: Format, title: str = "") -> str:
    """The result as a rich table (text), CSV, or JSON (a list of objects)."""
    if fmt is Format.json:
        rows = [dict(zip(result.columns, r, strict=True)) for r in result.rows]
        return json.dumps(rows, indent=1) + "\n"
    if fmt is Format.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(result.columns)
        for r in result.rows:
            w.writerow(["" if v is None else json.dumps(v) if isinstance(v, dict | list) else v
                        for v in r])
        return buf.getvalue()
    table = Table(title=title or None)
    for c in result.columns:
        table.add_column(c)
    for r in result.rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    out = Console(file=io.StringIO(), width=200, force_terminal=False)
    out.print(table)
    if result.truncated:
        out.print(f"(first {len(result.rows)} rows only)")
    text: str = out.file.getvalue()  # type: ignore[attr-defined]
    return text


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``sink`` and ``query`` to the root ``app``."""
    app.command("sink")(make_sink_command(get_settings))
    app.add_typer(make_query_app(get_settings), name="query")


def make_sink_command(get_settings: SettingsFn) -> Callable[..., None]:
    def sink(
        bootstrap: Annotated[
            str | None, typer.Option("--bootstrap", "-b", help="Kafka bootstrap servers.")
        ] = None,
        dsn: Annotated[
            str | None, typer.Option(help="chdb://PATH or clickhouse:// / http(s):// DSN.")
        ] = None,
        admin_port: Annotated[
            int | None, typer.Option(help="Admin HTTP port (0 = a free one).", min=0, max=65535)
        ] = None,
        duration: Annotated[
            float | None, typer.Option(help="Stop after this many seconds.", min=0)
        ] = None,
        until_idle: Annotated[
            float | None,
            typer.Option(help="Stop once nothing arrived for this many seconds.", min=0.1),
        ] = None,
    ) -> None:
        """Store every loadcast topic in ClickHouse (offsets committed after the insert)."""
        from sinks.service import serve
        from streams.metrics import serve_metrics

        root = get_settings()
        k, s = _sink_settings(root, bootstrap, dsn, admin_port)
        ensure_kafka(k)
        serve_metrics(s.metrics_port)

        def ready(sink: Any, admin: Any) -> None:
            where = f"; admin on {admin.url}" if admin is not None else ""
            print(f"sink consuming {len(s.topics)} topics into {s.dsn}{where}",
                  file=sys.stderr, flush=True)

        proc = root.processor  # the worker's bounds: one validation
        limits = Limits(proc.max_window_seconds, proc.clock_skew_seconds)
        with stop_on_signals(duration) as stop:
            try:
                stats = serve(k, s, stop, on_ready=ready, until_idle=until_idle,
                              limits=limits)
            except OSError as e:
                raise fail(f"admin endpoint: {e}", 1) from None
        print(
            f"sink: {stats.records} records, {stats.rows} rows, {stats.dead_lettered} "
            f"dead-lettered, {stats.already_stored} already stored, {stats.expired} older "
            f"than the TTL (dropped), {stats.batches} batches, "
            f"{stats.insert_failures} failed inserts",
            file=sys.stderr,
        )

    return sink


def _sink_settings(root: Settings, bootstrap: str | None, dsn: str | None,
                   admin_port: int | None) -> tuple[KafkaSettings, SinkSettings]:
    """Kafka and sink settings with the command's options over them (a bad one exits 2)."""
    k, s = root.kafka, root.sink
    if bootstrap:
        k = k.model_copy(update={"bootstrap_servers": bootstrap})
    try:
        update: dict[str, Any] = {}
        if dsn is not None:
            update["dsn"] = dsn
        if admin_port is not None:
            update["admin_port"] = admin_port
        s = type(s).model_validate({**s.model_dump(), **update})
    except ValidationError as e:
        raise fail(f"bad option: {e.errors()[0]['msg']}") from None
    return k, s


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table, csv or json.")]
ViaOpt = Annotated[
    Via, typer.Option(help="auto: ask the running sink when it holds the chDB directory.")
]
SinceOpt = Annotated[
    str, typer.Option(help="Start: now, 15m/2h/7d ago, epoch ms or ISO-8601 (UTC).")
]
UntilOpt = Annotated[str, typer.Option(help="End (exclusive), same forms as --since.")]
EndpointOpt = Annotated[str, typer.Option(help="Only this endpoint.")]
ApiOpt = Annotated[str, typer.Option(help="Only this API.")]


def make_query_app(get_settings: SettingsFn) -> typer.Typer:
    """``query``: ``--sql`` on the group itself, one sub-command per canned query."""
    query_app = typer.Typer(
        help="Canned analytics over the sink's tables, or --sql for anything else. "
        "forecast-accuracy: MASE's denominator is the mean absolute error of the "
        "one-step-back naive forecast of the endpoint's actual series.",
        invoke_without_command=True,
    )
    query_app.callback()(_sql_query(get_settings))
    for q in CANNED.values():
        query_app.command(q.name, help=q.help)(
            _canned_command(get_settings, q.name, q.help, q.extra))
    return query_app


def _run_query(get_settings: SettingsFn, body: dict[str, Any], fmt: Format, via: Via,
               title: str) -> None:
    """Run one query (canned or SQL) and print it; bad input exits 2, an unreachable or
    failing ClickHouse 1."""
    from sinks.admin import AdminError
    from sinks.db import ClickHouseUnavailable
    from sinks.service import query

    s = get_settings().sink
    try:
        result = query(s, body, via.value)
    except QueryError as e:
        raise fail(str(e)) from None
    except (AdminError, ClickHouseUnavailable) as e:
        raise fail(str(e), 1) from None
    except Exception as e:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        if isinstance(e, ClickHouseError):
            raise fail(f"ClickHouse: {e}", 1) from None
        raise
    sys.stdout.write(render(result, fmt, title))
    sys.stdout.flush()
    if not result.rows:  # on stderr: csv/json output stays parseable
        print(result.note or "no rows", file=sys.stderr, flush=True)


def _sql_query(get_settings: SettingsFn) -> Callable[..., None]:
    def sql_query(
        ctx: typer.Context,
        sql: Annotated[
            str | None, typer.Option("--sql", help="Read-only SQL; {name:Type} binds --param.")
        ] = None,
        param: Annotated[
            list[str] | None, typer.Option("--param", "-p", help="name=value for --sql.")
        ] = None,
        fmt: FormatOpt = Format.table,
        via: ViaOpt = Via.auto,
    ) -> None:
        """Run --sql, or one of the canned queries below."""
        if ctx.invoked_subcommand is not None:
            return
        if sql is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        params: dict[str, str] = {}
        for p in param or []:
            name, sep, value = p.partition("=")
            if not sep or not name:
                raise fail(f"--param must be name=value, not {p!r}")
            params[name] = value
        _run_query(get_settings, {"sql": sql, "params": params}, fmt, via, "")

    return sql_query


def _canned_command(get_settings: SettingsFn, name: str, help_text: str,
                    extra: dict[str, Any]) -> Callable[..., None]:
    """The sub-command of the canned query ``name``; its --help lists its own options only."""

    def command(
        since: SinceOpt = "24h",
        until: UntilOpt = "now",
        endpoint: EndpointOpt = "",
        api: ApiOpt = "",
        lookback: Annotated[
            int | None,
            typer.Option(help="mirror-lead-time: seconds before an activation to look "
                         "for the demand crossing.", min=0),
        ] = None,
        limit: Annotated[
            int | None, typer.Option(help="anomalies: at most this many rows.", min=1)
        ] = None,
        fmt: FormatOpt = Format.table,
        via: ViaOpt = Via.auto,
    ) -> None:
        try:
            params: dict[str, Any] = {
                "since_ms": parse_time(since), "until_ms": parse_time(until),
                "endpoint": endpoint, "api": api,
            }
        except QueryError as e:
            raise fail(str(e)) from None
        if until == "now":
            params["until_ms"] += 1  # include records stamped this very millisecond
        if lookback is not None:
            if "lookback_s" not in extra:
                raise fail(f"--lookback applies to mirror-lead-time, not {name}")
            params["lookback_s"] = lookback
        if limit is not None:
            if "limit" not in extra:
                raise fail(f"--limit applies to anomalies, not {name}")
            params["limit"] = limit
        _run_query(get_settings, {"query": name, "params": params}, fmt, via, name)

    command.__doc__ = help_text
    # Each query's --help lists its own options only: drop the others' from the
    # signature typer reads (they keep their None defaults when called).
    sig = inspect.signature(command, eval_str=True)
    own = {"lookback": "lookback_s", "limit": "limit"}
    command.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
        p for p in sig.parameters.values() if p.name not in own or own[p.name] in extra
    ])
    return command
