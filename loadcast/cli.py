"""The ``loadcast`` command: one entry point for every role.

Each sub-command loads the settings (env + ``--config`` file), lets its options override
them, wires the parts from ``streams``/``processors``/``sinks`` and runs until done or
until Ctrl-C/SIGTERM, then stops cleanly.
"""

from __future__ import annotations

import functools
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from loadcast.settings import Settings, SettingsError, load_settings
from streams.cli_options import (
    LEVEL_HELP,
    BootstrapOpt,
    LogLevelOpt,
    faust_loglevel,
    parse_log_level,
)
from streams.signals import stop_on_signals

app = typer.Typer(
    help="loadcast: forecast each API endpoint's load online and act before the spike.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="The loadcast topics on the configured Kafka.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")

console = Console(stderr=True)
_state: dict[str, Any] = {"config": None}

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default: $LOADCAST_CONFIG)."),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")  # plain text: [[...]] stays
    return typer.Exit(code)


def settings(bootstrap: str | None = None) -> Settings:
    """Settings from env/file; a bad field stops here with its name."""
    try:
        s = load_settings(_state["config"])
    except SettingsError as e:
        raise fail(str(e)) from None
    if bootstrap:
        s.kafka.bootstrap_servers = bootstrap
    return s


@app.callback()
def root(
    config: ConfigOpt = None,
    log_level: Annotated[
        str, typer.Option(help=f"{LEVEL_HELP} Commands also take it after their name.")
    ] = "warning",
) -> None:
    """Global options."""
    try:
        level = parse_log_level(log_level)
    except typer.BadParameter as e:
        raise fail(str(e)) from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _state["config"] = config


# --------------------------------------------------------------------------- broker


@app.command()
def broker(
    port: Annotated[
        int, typer.Option(help="Loopback port (0 = a free one).", min=0, max=65535)
    ] = 0,
    create_topics: Annotated[
        bool, typer.Option("--topics/--no-topics", help="Create the loadcast topics.")
    ] = True,
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu) until Ctrl-C; prints its address."""
    from streams.kafka.broker import BrokerError, EmbeddedBroker
    from streams.kafka.topics import ensure_topics

    s = settings()
    b = EmbeddedBroker(port or None)
    try:
        b.start()
    except BrokerError as e:
        raise fail(str(e), 1) from None
    try:
        if create_topics:
            s.kafka.bootstrap_servers = b.bootstrap
            ensure_topics(s.kafka)
        with stop_on_signals() as stop:  # before announcing: a SIGTERM right after is ours
            print(b.bootstrap, flush=True)
            console.print(f"broker ready at {b.bootstrap} (Ctrl-C stops it)")
            while not stop.wait(0.5):
                if not b.alive():
                    raise fail(f"broker exited: {b.log_tail()}", 1)
    finally:
        b.stop()


# --------------------------------------------------------------------------- topics


@topics_app.command("ensure")
def topics_ensure(bootstrap: BootstrapOpt = None) -> None:
    """Create the topics of the catalog that do not exist (idempotent)."""
    from streams.kafka.topics import ensure_topics

    s = settings(bootstrap)
    try:
        for name, outcome in ensure_topics(s.kafka).items():
            print(f"{name}\t{outcome}")
    except Exception as e:
        raise fail(f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {e}", 1) from None


@topics_app.command("list")
def topics_list(bootstrap: BootstrapOpt = None) -> None:
    """Print the topic catalog: name, value schema, key (names carry kafka.topic_prefix)."""
    from streams.kafka.topics import CATALOG, topic_name

    s = settings(bootstrap)
    for spec in CATALOG:
        extra = ",".join(f"{k}={v}" for k, v in spec.config.items())
        print(f"{topic_name(s.kafka, spec.name)}\t{spec.value_schema}\t{spec.key}\t{extra}")


# --------------------------------------------------------------------------- agent


@app.command()
def agent(
    bootstrap: BootstrapOpt = None,
    region: Annotated[str | None, typer.Option(help="Region of this agent.")] = None,
    agent_id: Annotated[str | None, typer.Option(help="Default: <region>-<hostname>.")] = None,
    interval: Annotated[
        float | None, typer.Option(help="Monitoring interval, seconds.", min=0.001)
    ] = None,
    api: Annotated[str | None, typer.Option(help="API name of the replayed endpoints.")] = None,
    replay: Annotated[
        Path | None,
        typer.Option(help="Replay a timestamp,value CSV as request streams; a bare name is "
                          "looked up in $LOADCAST_DATA_DIR, else streams/traces "
                          "(elb_request_count_8c0756.csv, nyc_taxi.csv)."),
    ] = None,
    endpoints: Annotated[int, typer.Option(help="Endpoints the replay spreads over.", min=1)] = 3,
    speedup: Annotated[
        float, typer.Option(help="Replay speed (60 = an hour a minute; 0 = flat out).", min=0)
    ] = 0.0,
    keep_timestamps: Annotated[
        bool,
        typer.Option("--keep-timestamps",
                     help="Keep the trace's own timestamps. By default the replay is re-timed "
                          "to END NOW: shifted by whole steps so that its last window closes "
                          "when the replay finishes at --speedup (flat out: now), so the "
                          "sink's TTL keeps it and `loadcast query` finds it."),
    ] = False,
    scale: Annotated[float, typer.Option(help="Multiply each row's requests.", min=0)] = 1.0,
    limit: Annotated[int | None, typer.Option(help="Replay only the first N rows.", min=2)] = None,
    batch: Annotated[
        bool | None, typer.Option("--batch/--single", help="TelemetryBatch or single values.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds.", min=0)
    ] = None,
    federated: Annotated[
        bool | None,
        typer.Option("--federated/--no-federated",
                     help="Also train locally and send model updates (settings: agent.federated)."),
    ] = None,
) -> None:
    """Run an edge agent: aggregate per endpoint and interval, publish Avro telemetry.

    With --federated it also trains the forecaster on its own telemetry and takes part in
    the federated rounds (``loadcast coordinator``): only model updates leave the edge.
    """
    from schemas.codec import CodecError
    from streams.edge.agent import build_agent
    from streams.edge.replay import TraceError, read_trace, retime, window_offset
    from streams.edge.replay import replay as run_replay
    from streams.kafka.topics import ensure_topics
    from streams.metrics import serve_metrics
    from streams.sdk import make_codec

    s = settings(bootstrap)
    a = s.agent
    region = region or a.region
    agent_id = agent_id or a.agent_id or f"{region}-{socket.gethostname()}"
    trace = None
    if replay is not None:
        try:
            trace = read_trace(replay, limit)
        except TraceError as e:
            raise fail(str(e)) from None
        if not keep_timestamps:
            trace = retime(trace, speedup)
    try:
        ensure_topics(s.kafka)
    except Exception as e:
        raise fail(f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {e}", 1) from None
    serve_metrics(a.metrics_port)
    key = a.client_hash_key.get_secret_value().encode()
    build = build_agent
    if a.federated if federated is None else federated:
        from streams.edge.federated import EdgeTrainingConfig, build_federated_agent

        p, f = s.processor, s.federated
        training = EdgeTrainingConfig(
            step_seconds=p.step_seconds, season_seconds=p.season_seconds, horizon=p.horizon,
            lateness_seconds=p.lateness_seconds, min_samples=f.min_samples,
            min_rows=f.min_rows, resend_after=f.resend_after_seconds,
        )
        build = functools.partial(build_federated_agent, training=training)
    edge = build(
        s.kafka,
        make_codec(s.kafka),
        agent_id=agent_id,
        region=region,
        batch=a.batch if batch is None else batch,
        max_buffered=a.max_buffered,
        interval_seconds=interval or a.interval_seconds,
        endpoint_intervals=a.endpoint_intervals,
        default_api=api or a.api,
        k_anonymity=a.k_anonymity,
        client_hash_key=key or None,
        window_offset_seconds=window_offset(trace, interval or a.interval_seconds) if trace else 0,
    )
    started = time.monotonic()
    with stop_on_signals(duration) as stop:
        try:
            if trace is not None:
                names = [f"{api or a.api}-{region}-{i + 1}" for i in range(endpoints)]
                with ReplayProgress(console, trace, edge, speedup) as progress:
                    total = run_replay(
                        trace, edge.record, edge.tick, names,
                        api=api or a.api, speedup=speedup, scale=scale, stop=stop,
                        on_row=progress.row,
                    )
                rows = progress.rows
                first, last = trace.rows[0][0], trace.rows[max(rows, 1) - 1][0]
                console.print(
                    f"replayed {total} requests over {rows} of {len(trace.rows)} rows "
                    f"({_utc(first)} .. {_utc(last + trace.step_seconds)}"
                    f"{', original timestamps' if keep_timestamps else ', re-timed to end now'})"
                )
            else:
                console.print(f"agent {agent_id} publishing every {edge.aggregator.interval}s")
                edge.run(stop)
        except CodecError as e:  # a record the schema rejects: a bug worth stopping for
            raise fail(f"telemetry did not encode: {e}", 1) from None
        finally:
            left = edge.close()
            stop.set()
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


# --------------------------------------------------------------------------- worker


@app.command()
def worker(
    bootstrap: BootstrapOpt = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve /metrics on this port.", min=0, max=65535)
    ] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Run a forecasting processor worker (Faust): telemetry in, load scores out.

    Start more workers with the same settings to share the partitions.
    """
    from processors.apps.worker import run_worker
    from streams.kafka.topics import ensure_topics

    s = settings(bootstrap)
    if metrics_port is not None:
        s.processor.metrics_port = metrics_port
    try:
        ensure_topics(s.kafka)
    except Exception as e:
        raise fail(f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {e}", 1) from None
    run_worker(s.kafka, s.processor, loglevel=faust_loglevel(log_level))


# --------------------------------------------------------------------------- sidecar

from streams.sidecar.cli import sidecar as _sidecar  # noqa: E402  (light: typer only)

app.command("sidecar")(_sidecar)

# --------------------------------------------------------------------------- federated

from processors.coordinator_cli import coordinator as _coordinator  # noqa: E402  (typer only)
from processors.coordinator_cli import model_app as _model_app  # noqa: E402

app.command("coordinator")(_coordinator)
app.add_typer(_model_app, name="model")

# --------------------------------------------------------------------------- mirroring

from streams.mirror_cli import bundle_app as _bundle_app  # noqa: E402  (typer only)
from streams.mirror_cli import executor as _executor  # noqa: E402
from streams.mirror_cli import mirror_app as _mirror_app  # noqa: E402
from streams.mirror_cli import planner as _planner  # noqa: E402

app.add_typer(_bundle_app, name="bundle")
app.add_typer(_mirror_app, name="mirror")
app.command("planner")(_planner)
app.command("executor")(_executor)

# --------------------------------------------------------------------------- sink, query

from sinks.cli import register as _register_sinks  # noqa: E402  (light: typer only)

_register_sinks(app, settings)

# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="About a minute of live traffic instead of four.")
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Where report.html, summary.json and the logs go.")
    ] = Path("out/demo"),
    live_seconds: Annotated[
        int | None, typer.Option(help="Seconds of live traffic (default 240, quick 60).", min=10)
    ] = None,
    trace: Annotated[
        Path | None, typer.Option(help="timestamp,value CSV (default: the ELB trace).")
    ] = None,
) -> None:
    """The whole pipeline on embedded defaults under real-shaped traffic, with a live view;
    ends in OUT/report.html and OUT/summary.json."""
    from loadcast.demo import DemoError, run_demo

    try:
        run_demo(settings(), out_dir=out, quick=quick, live_seconds=live_seconds,
                 trace_path=trace)
    except FileNotFoundError as e:
        raise fail(str(e)) from None
    except DemoError as e:
        raise fail(str(e), 1) from None
    except KeyboardInterrupt:
        console.print("demo interrupted: everything stopped, no report written")
        raise typer.Exit(130) from None


def main() -> None:
    """Entry point of the ``loadcast`` script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
