"""``loadcast bundle push|serve``, ``loadcast mirror keygen``, ``loadcast planner`` and
``loadcast executor`` (registered in ``loadcast.cli``).

    loadcast mirror keygen                      # LOADCAST_MIRROR__SIGNING_KEY / TRUSTED_KEYS
    loadcast bundle push ./orders-api           # prints sha256:<hex>
    loadcast bundle serve --port 8470           # edges fetch bundles from here
    loadcast planner                            # load-scores -> mirror-commands
    loadcast executor --region eu-west          # mirror-commands -> API processes

The executor is its own command rather than a flag of ``loadcast agent``: it runs API
processes, which should not share a process (or a crash) with telemetry, and an edge may
run one without the other; it is still the edge agent's part (``streams``), on the same
settings.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from streams.cli_options import BootstrapOpt, LogLevelOpt, faust_loglevel

bundle_app = typer.Typer(help="API bundles in the content-addressed store.",
                         no_args_is_help=True)
mirror_app = typer.Typer(help="Predictive mirroring helpers.", no_args_is_help=True)

StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Store directory (default: mirror.store_dir).")
]


@bundle_app.command("push")
def bundle_push(
    directory: Annotated[Path, typer.Argument(help="Bundle directory (with its manifest).")],
    store: StoreOpt = None,
) -> None:
    """Pack DIRECTORY reproducibly into the store; print its digest."""
    from loadcast.cli import console, fail, settings
    from streams.bundles import BundleError, DirectoryStore, push

    s = settings()
    try:
        digest, manifest = push(directory, DirectoryStore(store or s.mirror.store_dir))
    except (BundleError, OSError) as e:
        raise fail(str(e)) from None
    print(digest, flush=True)
    console.print(f"{manifest.name} {manifest.version} stored as {digest}")


@bundle_app.command("serve")
def bundle_serve(
    store: StoreOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (0 = a free one).", min=0, max=65535)
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds.", min=0)
    ] = None,
) -> None:
    """Serve the store over HTTP (GET /bundles/sha256:<hex>) until Ctrl-C; prints its URL."""
    import asyncio
    import threading

    from loadcast.cli import console, fail, settings
    from streams.bundles import DirectoryStore
    from streams.bundles import bundle_app as make_app
    from streams.sidecar.proxy import serve
    from streams.signals import stop_on_signals

    s = settings()
    root = store or s.mirror.store_dir
    if not Path(root).is_dir():
        raise fail(f"store directory {root} does not exist: `loadcast bundle push` first")

    async def run(stop: threading.Event) -> None:
        runner, bound = await serve(make_app(DirectoryStore(root)), host or s.mirror.serve_host,
                                    s.mirror.serve_port if port is None else port)
        print(f"http://{host or s.mirror.serve_host}:{bound}", flush=True)
        console.print(f"serving {root} (Ctrl-C stops it)")
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await runner.cleanup()

    with stop_on_signals(duration) as stop:
        try:
            asyncio.run(run(stop))
        except OSError as e:
            raise fail(f"cannot serve: {e}", 1) from None


@mirror_app.command("keygen")
def keygen() -> None:
    """A new Ed25519 key pair: the private key for the planner, the public for executors."""
    from processors.signing import generate_keypair

    private, public = generate_keypair()
    print(f"LOADCAST_MIRROR__SIGNING_KEY={private}")
    print(f'LOADCAST_MIRROR__TRUSTED_KEYS={{"default": "{public}"}}')


def planner(
    bootstrap: BootstrapOpt = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Run the mirror planner: regional forecasts in, signed mirror commands out."""
    from loadcast.cli import console, fail, settings
    from processors.planner import run_planner
    from streams.topics import ensure_topics

    s = settings(bootstrap)
    try:
        s.mirror.signer()
    except ValueError as e:
        raise fail(str(e)) from None
    if not s.mirror.bundles:
        console.print("[yellow]warning:[/yellow] mirror.bundles is empty: nothing to mirror")
    try:
        ensure_topics(s.kafka)
    except Exception as e:
        raise fail(f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {e}", 1) from None
    run_planner(s.kafka, s.mirror, loglevel=faust_loglevel(log_level))


def executor(
    bootstrap: BootstrapOpt = None,
    region: Annotated[str | None, typer.Option(help="Region (default: mirror.region, "
                                               "else agent.region).")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Bundles, state and logs.")] = None,
    store_url: Annotated[str | None, typer.Option(help="Bundle store URL.")] = None,
    stop_instances_on_exit: Annotated[
        bool | None, typer.Option("--stop-instances-on-exit/--keep-instances-on-exit",
                                  help="Stop the API processes when the executor exits.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds.", min=0)
    ] = None,
) -> None:
    """Run a mirror executor: verified mirror commands of one region -> API processes."""

    from loadcast.cli import console, fail, settings
    from streams.executor.service import Executor
    from streams.metrics import serve_metrics
    from streams.sdk import make_codec
    from streams.signals import stop_on_signals
    from streams.topics import ensure_topics

    s = settings(bootstrap)
    m = s.mirror
    reg = region or m.region or s.agent.region
    try:
        verifier = m.verifier()
    except ValueError as e:
        raise fail(str(e)) from None
    try:
        ensure_topics(s.kafka)
    except Exception as e:
        raise fail(f"cannot reach Kafka at {s.kafka.bootstrap_servers}: {e}", 1) from None
    serve_metrics(m.executor_metrics_port)
    ex = Executor(
        s.kafka, make_codec(s.kafka), region=reg,
        executor_id=m.executor_id or f"executor-{reg}-{socket.gethostname()}",
        verifier=verifier, store_url=store_url or m.store_url,
        work_dir=work_dir or m.work_dir, drain_seconds=m.drain_seconds,
        max_bundle_bytes=m.max_bundle_bytes, command_lookback_s=m.command_lookback_seconds,
        stop_instances_on_exit=(m.stop_instances_on_exit if stop_instances_on_exit is None
                                else stop_instances_on_exit),
    )
    with stop_on_signals(duration) as stop:
        try:
            ex.start()
        except Exception as e:
            ex.close()
            raise fail(f"executor did not start: {e}", 1) from None
        console.print(f"executor {ex.id} in {reg}: {sum(map(len, ex.state.instances.values()))}"
                      f" instance(s) running, reading {ex.commands_topic}")
        print("ready", flush=True)
        ex.run(stop)
