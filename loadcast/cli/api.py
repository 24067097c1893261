"""``loadcast api``: serve the forecasts (prediction API, placement, scenarios, the KEDA
external scaler and the live control room, as they are added to :mod:`streams.api`).

    loadcast api --port 8090

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
        ensure_kafka(s.kafka)
        svc = ApiService(s.api, s.kafka)
        set_planner(svc.app, s.mirror.planner_config())  # scenarios: the deployment's planner
        with stop_on_signals(duration) as stop:
            try:
                asyncio.run(_serve(svc, stop))
            except OSError as e:
                raise fail(str(e), 1) from None

    async def _serve(svc: ApiService, stop: threading.Event) -> None:
        await svc.start()
        console.print(f"api on http://{svc.settings.listen_host}:{svc.port} (Ctrl-C stops it)")
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await svc.stop()

    return api
