"""``loadcast agent``: an edge agent, live or replaying a trace.

:func:`build_edge` wires the agent from the settings and the command's options (plain or
federated); the command runs it. Kafka's client and the agent itself are imported inside
the functions that need them, so ``loadcast --help`` stays fast.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from loadcast.cli.common import SettingsFn, console, ensure_kafka, fail
from loadcast.cli.options import BootstrapOpt
from loadcast.settings import Settings
from streams.signals import stop_on_signals

if TYPE_CHECKING:
    import threading

    from streams.edge.agent import EdgeAgent
    from streams.edge.replay import Trace


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``agent`` to the root ``app``."""
    app.command("agent")(_agent_command(get_settings))


def _agent_command(get_settings: SettingsFn) -> Callable[..., None]:
    def agent(
        bootstrap: BootstrapOpt = None,
        region: Annotated[str | None, typer.Option(help="Region of this agent.")] = None,
        agent_id: Annotated[str | None, typer.Option(help="Default: <region>-<hostname>.")
                            ] = None,
        interval: Annotated[
            float | None, typer.Option(help="Monitoring interval, seconds.", min=0.001)
        ] = None,
        api: Annotated[str | None, typer.Option(help="API name of the replayed endpoints.")
                       ] = None,
        replay: Annotated[
            Path | None,
            typer.Option(help="Replay a timestamp,value CSV as request streams; a bare name is "
                              "looked up in $LOADCAST_DATA_DIR, else streams/traces "
                              "(elb_request_count_8c0756.csv, nyc_taxi.csv)."),
        ] = None,
        endpoints: Annotated[int, typer.Option(help="Endpoints the replay spreads over.", min=1)
                             ] = 3,
        speedup: Annotated[
            float, typer.Option(help="Replay speed (60 = an hour a minute; 0 = flat out).", min=0)
        ] = 0.0,
        keep_timestamps: Annotated[
            bool,
            typer.Option("--keep-timestamps",
                         help="Keep the trace's own timestamps. By default the replay is "
                              "re-timed to END NOW: shifted by whole steps so that its last "
                              "window closes when the replay finishes at --speedup (flat out: "
                              "now), so the sink's TTL keeps it and `loadcast query` finds it."),
        ] = False,
        scale: Annotated[float, typer.Option(help="Multiply each row's requests.", min=0)] = 1.0,
        limit: Annotated[int | None, typer.Option(help="Replay only the first N rows.", min=2)
                         ] = None,
        batch: Annotated[
            bool | None, typer.Option("--batch/--single", help="TelemetryBatch or single values.")
        ] = None,
        duration: Annotated[
            float | None, typer.Option(help="Stop after this many seconds.", min=0)
        ] = None,
        federated: Annotated[
            bool | None,
            typer.Option("--federated/--no-federated",
                         help="Also train locally and send model updates "
                              "(settings: agent.federated)."),
        ] = None,
    ) -> None:
        """Run an edge agent: aggregate per endpoint and interval, publish Avro telemetry.

        With --federated it also trains the forecaster on its own telemetry and takes part in
        the federated rounds (``loadcast coordinator``): only model updates leave the edge.
        """
        s = get_settings(bootstrap)
        a = s.agent
        region = region or a.region
        agent_id = agent_id or a.agent_id or f"{region}-{socket.gethostname()}"
        api = api or a.api
        trace = _load_trace(replay, limit, keep_timestamps, speedup)
        ensure_kafka(s.kafka)
        edge = build_edge(s, agent_id=agent_id, region=region, api=api, interval=interval,
                          batch=batch, federated=federated, trace=trace)
        started = time.monotonic()
        left = _run(edge, agent_id, trace, duration, lambda stop: _replay(
            trace, edge, stop, api=api, region=region, endpoints=endpoints, speedup=speedup,
            scale=scale, keep_timestamps=keep_timestamps))
        _summary(edge, agent_id, started, left)

    return agent


def _load_trace(replay: Path | None, limit: int | None, keep_timestamps: bool,
                speedup: float) -> Trace | None:
    """The trace to replay (re-timed to end now unless ``keep_timestamps``), or None."""
    from streams.edge.replay import TraceError, read_trace, retime

    if replay is None:
        return None
    try:
        trace = read_trace(replay, limit)
    except TraceError as e:
        raise fail(str(e)) from None
    return trace if keep_timestamps else retime(trace, speedup)


def build_edge(s: Settings, *, agent_id: str, region: str, api: str, interval: float | None,
               batch: bool | None, federated: bool | None, trace: Trace | None) -> EdgeAgent:
    """The edge agent of ``s`` (options given on the command line win): a plain one, or
    with local training when federated. Starts its ``/metrics`` when configured."""
    from streams.edge.agent import build_agent
    from streams.edge.replay import window_offset
    from streams.metrics import serve_metrics
    from streams.sdk import make_codec

    a = s.agent
    serve_metrics(a.metrics_port)
    key = a.client_hash_key.get_secret_value().encode()
    build: Callable[..., EdgeAgent] = build_agent
    if a.federated if federated is None else federated:
        from streams.edge.federated import EdgeTrainingConfig, build_federated_agent

        p, f = s.processor, s.federated
        training = EdgeTrainingConfig(
            step_seconds=p.step_seconds, season_seconds=p.season_seconds, horizon=p.horizon,
            lateness_seconds=p.lateness_seconds, min_samples=f.min_samples,
            min_rows=f.min_rows, resend_after=f.resend_after_seconds,
        )
        build = functools.partial(build_federated_agent, training=training)
    return build(
        s.kafka,
        make_codec(s.kafka),
        agent_id=agent_id,
        region=region,
        batch=a.batch if batch is None else batch,
        max_buffered=a.max_buffered,
        interval_seconds=interval or a.interval_seconds,
        endpoint_intervals=a.endpoint_intervals,
        default_api=api,
        k_anonymity=a.k_anonymity,
        client_hash_key=key or None,
        window_offset_seconds=window_offset(trace, interval or a.interval_seconds) if trace else 0,
    )


def _run(edge: EdgeAgent, agent_id: str, trace: Trace | None, duration: float | None,
         replay: Callable[[threading.Event], None]) -> int:
    """Replay the trace, or publish live until stopped; close the agent either way and
    return the number of records it could not deliver."""
    from schemas.codec import CodecError

    left = 0
    with stop_on_signals(duration) as stop:
        try:
            if trace is not None:
                replay(stop)
            else:
                console.print(f"agent {agent_id} publishing every {edge.aggregator.interval}s")
                edge.run(stop)
        except CodecError as e:  # a record the schema rejects: a bug worth stopping for
            raise fail(f"telemetry did not encode: {e}", 1) from None
        finally:
            left = edge.close()
            stop.set()
    return left


def _replay(trace: Trace | None, edge: EdgeAgent, stop: threading.Event, *, api: str,
            region: str, endpoints: int, speedup: float, scale: float,
            keep_timestamps: bool) -> None:
    from streams.edge.replay import replay as run_replay

    assert trace is not None
    names = [f"{api}-{region}-{i + 1}" for i in range(endpoints)]
    with ReplayProgress(console, trace, edge, speedup) as progress:
        total = run_replay(
            trace, edge.record, edge.tick, names,
            api=api, speedup=speedup, scale=scale, stop=stop,
            on_row=progress.row,
        )
    rows = progress.rows
    first, last = trace.rows[0][0], trace.rows[max(rows, 1) - 1][0]
    console.print(
        f"replayed {total} requests over {rows} of {len(trace.rows)} rows "
        f"({_utc(first)} .. {_utc(last + trace.step_seconds)}"
        f"{', original timestamps' if keep_timestamps else ', re-timed to end now'})"
    )


def _summary(edge: EdgeAgent, agent_id: str, started: float, left: int) -> None:
    """What the agent sent and delivered; exit 1 when anything was lost."""
    stats = edge.publisher.producer.stats
    console.print(
        f"agent {agent_id}: {edge.windows_published} windows, {stats.sent} records sent, "
        f"{stats.delivered} delivered, {stats.failed} failed, {stats.overflow} over the "
        f"buffer bound, {left} undelivered, {time.monotonic() - started:.1f}s"
    )
    if left or stats.failed or stats.overflow:
        raise typer.Exit(1)


def _utc(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch_s))


class ReplayProgress:
    """Rows replayed, windows published and the rate, live on a terminal (rich), and the
    number of rows actually replayed for the summary (a stop can end a replay early)."""

    def __init__(self, console: Console, trace: Any, edge: Any, speedup: float) -> None:
        self.console, self.trace, self.edge, self.speedup = console, trace, edge, speedup
        self.rows = 0
        self.requests = 0
        self._started = time.monotonic()
        self._progress: Any = None
        self._task: Any = None
        self._shown = 0.0

    def __enter__(self) -> ReplayProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("replay"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                TextColumn("{task.fields[windows]} windows published"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "replay", total=len(self.trace.rows), windows=0, rate="")
        return self

    def row(self, i: int, ts: float, n: int) -> None:
        self.rows = i + 1
        self.requests += n
        now = time.monotonic()
        if self._progress is None or (now - self._shown < 0.2 and self.rows < len(self.trace.rows)):
            return
        self._shown = now
        elapsed = max(now - self._started, 1e-9)
        self._progress.update(
            self._task, completed=self.rows, windows=self.edge.windows_published,
            rate=f"{self.rows / elapsed:,.0f} rows/s, {self.requests / elapsed:,.0f} req/s",
        )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
