"""``loadcast bundle push|serve``, ``loadcast mirror keygen``, ``loadcast planner`` and
``loadcast executor``: predictive mirroring.

    loadcast mirror keygen                      # LOADCAST_MIRROR__SIGNING_KEY / TRUSTED_KEYS
    loadcast bundle push ./orders-api           # prints sha256:<hex>
    loadcast bundle serve --port 8470           # edges fetch bundles from here
    loadcast planner                            # load-scores -> mirror-commands
    loadcast executor --region eu-west          # mirror-commands -> API processes

The executor is its own command rather than a flag of ``loadcast agent``: it runs API
processes, which should not share a process (or a crash) with telemetry, and an edge may
run one without the other; it is still the edge agent's part (``streams``), on the same
settings. Faust, Kafka, aiohttp and the crypto library are imported inside the commands
(start-up speed of ``loadcast --help``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from loadcast.cli.common import SettingsFn, console, ensure_kafka, fail
from loadcast.cli.options import BootstrapOpt, LogLevelOpt, faust_loglevel
from processors.signing import generate_keypair
from streams.signals import stop_on_signals

StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Store directory (default: mirror.store_dir).")
]


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``bundle push|serve``, ``mirror keygen``, ``planner`` and ``executor``."""
    bundle_app = typer.Typer(help="API bundles in the content-addressed store.",
                             no_args_is_help=True)
    bundle_app.command("push")(_bundle_push(get_settings))
    bundle_app.command("serve")(_bundle_serve(get_settings))
    mirror_app = typer.Typer(help="Predictive mirroring helpers.", no_args_is_help=True)
    mirror_app.command("keygen")(keygen)
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(mirror_app, name="mirror")
    app.command("planner")(_planner(get_settings))
    app.command("executor")(_executor(get_settings))


def _bundle_push(get_settings: SettingsFn) -> Callable[..., None]:
    def bundle_push(
        directory: Annotated[Path, typer.Argument(help="Bundle directory (with its manifest).")],
        store: StoreOpt = None,
    ) -> None:
        """Pack DIRECTORY reproducibly into the store; print its digest."""
        from streams.bundles import BundleError, DirectoryStore, push

        s = get_settings()
        try:
            digest, manifest = push(directory, DirectoryStore(store or s.mirror.store_dir))
        except (BundleError, OSError) as e:
            raise fail(str(e)) from None
        print(digest, flush=True)
        console.print(f"{manifest.name} {manifest.version} stored as {digest}")

    return bundle_push


def _bundle_serve(get_settings: SettingsFn) -> Callable[..., None]:
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
        from streams.bundles import DirectoryStore
        from streams.bundles import bundle_app as make_app
        from streams.sidecar.proxy import serve

        s = get_settings()
        root = store or s.mirror.store_dir
        if not Path(root).is_dir():
            raise fail(f"store directory {root} does not exist: `loadcast bundle push` first")
        bind = host or s.mirror.serve_host

        async def run(stop: threading.Event) -> None:
            runner, bound = await serve(make_app(DirectoryStore(root)), bind,
                                        s.mirror.serve_port if port is None else port)
            print(f"http://{bind}:{bound}", flush=True)
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

    return bundle_serve


def keygen() -> None:
    """A new Ed25519 key pair: the private key for the planner, the public for executors."""
    private, public = generate_keypair()
    print(f"LOADCAST_MIRROR__SIGNING_KEY={private}")
    print(f'LOADCAST_MIRROR__TRUSTED_KEYS={{"default": "{public}"}}')


def _planner(get_settings: SettingsFn) -> Callable[..., None]:
    def planner(
        bootstrap: BootstrapOpt = None,
        log_level: LogLevelOpt = None,
    ) -> None:
        """Run the mirror planner: regional forecasts in, signed mirror commands out."""
        from processors.apps.planner import run_planner

        s = get_settings(bootstrap)
        try:
            s.mirror.signer()
        except ValueError as e:
            raise fail(str(e)) from None
        if not s.mirror.bundles:
            console.print("[yellow]warning:[/yellow] mirror.bundles is empty: nothing to mirror")
        ensure_kafka(s.kafka)
        run_planner(s.kafka, s.mirror, loglevel=faust_loglevel(log_level))

    return planner


def _executor(get_settings: SettingsFn) -> Callable[..., None]:
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
        from streams.executor.service import Executor
        from streams.metrics import serve_metrics
        from streams.sdk import make_codec

        s = get_settings(bootstrap)
        m = s.mirror
        reg = region or m.region or s.agent.region
        try:
            verifier = m.verifier()
        except ValueError as e:
            raise fail(str(e)) from None
        ensure_kafka(s.kafka)
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
            console.print(f"executor {ex.id} in {reg}: "
                          f"{sum(map(len, ex.state.instances.values()))}"
                          f" instance(s) running, reading {ex.commands_topic}")
            print("ready", flush=True)
            ex.run(stop)

    return executor
