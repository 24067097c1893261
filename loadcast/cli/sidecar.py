"""``loadcast sidecar``: run a routing sidecar.

    loadcast sidecar --upstreams upstreams.toml --data-plane haproxy --port 8080

Upstreams, policy and everything else can also come from the ``[sidecar]`` section of the
settings file or ``LOADCAST_SIDECAR__*`` variables; options here override them.
:func:`build_sidecar` wires it; the sidecar (aiohttp, Kafka) is imported inside the
functions that need it, so ``loadcast --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from loadcast.cli.common import SettingsFn, console, ensure_kafka, fail
from loadcast.settings import Settings
from streams.sidecar.config import SidecarSettings, UpstreamConfigError
from streams.signals import stop_on_signals

if TYPE_CHECKING:
    import threading

    from streams.sidecar.app import Sidecar


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``sidecar`` to the root ``app``."""
    app.command("sidecar")(_sidecar_command(get_settings))


def _sidecar_command(get_settings: SettingsFn) -> Callable[..., None]:
    def sidecar(
        bootstrap: Annotated[
            str | None, typer.Option("--bootstrap", "-b", help="Kafka bootstrap servers.")
        ] = None,
        upstreams: Annotated[
            Path | None, typer.Option(help="TOML/JSON file of upstream endpoints.")
        ] = None,
        data_plane: Annotated[
            str | None, typer.Option(help="proxy (built-in), haproxy or envoy.")
        ] = None,
        policy: Annotated[
            str | None,
            typer.Option(help="predictive, first-available, round-robin, least-request, "
                              "peak-ewma, prequal."),
        ] = None,
        port: Annotated[
            int | None, typer.Option(help="Listen port of the data plane.", min=0, max=65535)
        ] = None,
        admin_port: Annotated[
            int | None, typer.Option(help="Port of /health /metrics /weights.", min=0,
                                     max=65535)
        ] = None,
        dynamic_routing: Annotated[
            bool | None, typer.Option("--dynamic-routing/--no-dynamic-routing",
                                      help="Score-driven routing (default on).")
        ] = None,
        no_kafka: Annotated[
            bool, typer.Option("--no-kafka", help="Run without scores, telemetry or decisions.")
        ] = False,
        duration: Annotated[
            float | None, typer.Option(help="Stop after this many seconds.", min=0)
        ] = None,
    ) -> None:
        """Run a routing sidecar: consume load scores, re-weight traffic, proxy or drive HAProxy.

        Built-in proxy: response cache (sidecar.cache; RFC 9111, only what the
        origin marks cacheable), compression (sidecar.compression; gzip, br, zstd),
        per-client rate limits (sidecar.rate_limit) and forecast-gated cache
        warming (sidecar.warming): all off by default. Rate limits act only with a
        configured base_rps, or per_client_share of a CONFIGURED or LEARNED
        capacity; never on a guessed one.
        """
        from streams.sidecar.dataplane import DataPlaneError

        sc = build_sidecar(get_settings(bootstrap), no_kafka=no_kafka, overrides={
            "upstreams_file": upstreams, "data_plane": data_plane, "policy": policy,
            "listen_port": port, "admin_port": admin_port, "dynamic_routing": dynamic_routing,
        })
        with stop_on_signals(duration) as stop:
            console.print(
                f"sidecar {sc.id}: {sc.settings.data_plane}, {len(sc.upstreams)} upstreams, "
                f"policy {sc.settings.policy} (Ctrl-C stops it)"
            )
            try:
                _run(_serve(sc, stop))
            except (DataPlaneError, UpstreamConfigError, OSError) as e:
                raise fail(str(e), 1) from None

    return sidecar


def build_sidecar(s: Settings, *, no_kafka: bool, overrides: dict[str, Any]) -> Sidecar:
    """The sidecar of ``s.sidecar`` with the options that were given (not None) over it;
    without Kafka when ``no_kafka``, else with the topics ensured. Bad settings or
    upstreams exit 2, an unreachable Kafka 1."""
    from streams.sidecar.app import Sidecar

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        sc_settings = SidecarSettings.model_validate({**s.sidecar.model_dump(), **given})
        kafka = None if no_kafka else s.kafka
        sc = Sidecar(sc_settings, kafka)
    except ValidationError as e:
        bad = "; ".join(
            f"sidecar.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise fail(f"bad settings: {bad}") from None
    except UpstreamConfigError as e:
        raise fail(f"bad upstreams: {e}") from None
    if kafka is not None:
        ensure_kafka(kafka)
    return sc


async def _serve(sc: Sidecar, stop: threading.Event) -> None:
    """Start the sidecar, run until ``stop`` (or its data plane dies), stop it."""
    await sc.start()
    # Everything allocated at start-up lives as long as the process: keep the cyclic
    # GC from rescanning it, and run it less often (fewer pauses on the request path).
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    listen = sc.settings.listen_host
    console.print(f"data plane on {listen}:{sc.port}, admin on {listen}:{sc.admin_port}")
    try:
        while not stop.is_set():
            await asyncio.sleep(0.2)
            sc.plane.check()  # raises DataPlaneError if HAProxy or Envoy exited
    finally:
        await sc.stop()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
