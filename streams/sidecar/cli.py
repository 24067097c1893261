"""``loadcast sidecar``: run a routing sidecar (registered in ``loadcast.cli``).

    loadcast sidecar --upstreams upstreams.toml --data-plane haproxy --port 8080

Upstreams, policy and everything else can also come from the ``[sidecar]`` section of the
settings file or ``LOADCAST_SIDECAR__*`` variables; options here override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


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
        int | None, typer.Option(help="Port of /health /metrics /weights.", min=0, max=65535)
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
    """Run a routing sidecar: consume load scores, re-weight traffic, proxy or drive HAProxy."""
    import asyncio
    import gc
    import threading

    from pydantic import ValidationError

    from loadcast.cli import console, fail, settings
    from streams.kafka.topics import ensure_topics
    from streams.sidecar.app import Sidecar
    from streams.sidecar.config import SidecarSettings, UpstreamConfigError
    from streams.sidecar.dataplane import DataPlaneError
    from streams.signals import stop_on_signals

    s = settings(bootstrap)
    overrides = {
        k: v
        for k, v in {
            "upstreams_file": upstreams, "data_plane": data_plane, "policy": policy,
            "listen_port": port, "admin_port": admin_port, "dynamic_routing": dynamic_routing,
        }.items()
        if v is not None
    }
    try:
        sc_settings = SidecarSettings.model_validate({**s.sidecar.model_dump(), **overrides})
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
        try:
            ensure_topics(kafka)
        except Exception as e:
            raise fail(f"cannot reach Kafka at {kafka.bootstrap_servers}: {e}", 1) from None

    async def run(stop: threading.Event) -> None:
        await sc.start()
        # Everything allocated at start-up lives as long as the process: keep the cyclic
        # GC from rescanning it, and run it less often (fewer pauses on the request path).
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        console.print(f"data plane on {sc_settings.listen_host}:{sc.port}, "
                      f"admin on {sc_settings.listen_host}:{sc.admin_port}")
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
                sc.plane.check()
        finally:
            await sc.stop()

    with stop_on_signals(duration) as stop:
        console.print(
            f"sidecar {sc.id}: {sc_settings.data_plane}, {len(sc.upstreams)} upstreams, "
            f"policy {sc_settings.policy} (Ctrl-C stops it)"
        )
        try:
            _run(run(stop))
        except (DataPlaneError, UpstreamConfigError, OSError) as e:
            raise fail(str(e), 1) from None


def _run(coro: object) -> None:
    import asyncio

    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
