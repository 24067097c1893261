"""``loadcast api``: serve the forecasts (prediction API, placement, scenarios, the KEDA
external scaler and the live control room, as they are added to :mod:`streams.api`).

    loadcast api --port 8090 --keda-port 8091

Settings: the ``[api]`` section or ``LOADCAST_API__*``; options here override them.
aiohttp and Kafka are imported inside the command (start-up speed of ``loadcast --help``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from loadcast.cli.common import SettingsFn, console, ensure_kafka, fail
from loadcast.cli.options import BootstrapOpt
from streams.signals import stop_on_signals

if TYPE_CHECKING:
    import threading

    from streams.api.config import ApiSettings
    from streams.api.service import ApiService


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``api`` to the root ``app``."""
    app.command("api")(_api(get_settings))


def _api(get_settings: SettingsFn) -> Callable[..., None]:
    def api(
        bootstrap: BootstrapOpt = None,
        host: Annotated[str | None, typer.Option(help="Bind address (default api.listen_host).")]
        = None,
        port: Annotated[
            int | None, typer.Option(help="HTTP port (0 = a free one; default api.port).",
                                     min=0, max=65535)
        ] = None,
        keda_port: Annotated[
            int | None, typer.Option(
                help="gRPC port of the KEDA external scaler (0 = a free one; default "
                     "api.keda_port, else the HTTP port + 1).", min=0, max=65535)
        ] = None,
        keda: Annotated[
            bool | None, typer.Option("--keda/--no-keda",
                                      help="Serve the KEDA external scaler (default "
                                           "api.keda_enabled).")
        ] = None,
        duration: Annotated[
            float | None, typer.Option(help="Stop after this many seconds.", min=0)
        ] = None,
    ) -> None:
        """Serve the forecasts from load-scores over HTTP (any number of replicas)."""
        from streams.api.scenarios import set_planner
        from streams.api.service import ApiService

        s = get_settings(bootstrap)
        if host is not None:
            s.api.listen_host = host
        if port is not None:
            s.api.port = port
        if keda_port is not None:
            s.api.keda_port = keda_port
        if keda is not None:
            s.api.keda_enabled = keda
        s.api = _checked(s.api)
        ensure_kafka(s.kafka)
        svc = ApiService(s.api, s.kafka)
        set_planner(svc.app, s.mirror.planner_config())  # scenarios: the deployment's planner
        with stop_on_signals(duration) as stop:
            try:
                asyncio.run(_serve(svc, stop))
            except OSError as e:
                raise fail(str(e), 1) from None

    def _checked(api: ApiSettings) -> ApiSettings:
        """The settings validated again after the options changed them (exit 2 naming
        the problem)."""
        from pydantic import ValidationError

        try:
            return type(api).model_validate(api.model_dump())
        except ValidationError as e:
            raise fail(f"api: {e.errors()[0]['msg']}", 2) from None

    async def _serve(svc: ApiService, stop: threading.Event) -> None:
        await svc.start()
        console.print(f"api on http://{svc.settings.listen_host}:{svc.port} (Ctrl-C stops it)")
        if svc.keda_port:
            console.print(f"keda external scaler (gRPC) on {svc.settings.listen_host}:"
                          f"{svc.keda_port}")
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await svc.stop()

    return api
