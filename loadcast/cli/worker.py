"""``loadcast worker``: a forecasting processor worker (Faust, imported inside the command
for start-up speed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from loadcast.cli.common import SettingsFn, ensure_kafka
from loadcast.cli.options import BootstrapOpt, LogLevelOpt, faust_loglevel


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``worker`` to the root ``app``."""
    app.command("worker")(_worker(get_settings))


def _worker(get_settings: SettingsFn) -> Callable[..., None]:
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

        s = get_settings(bootstrap)
        if metrics_port is not None:
            s.processor.metrics_port = metrics_port
        ensure_kafka(s.kafka)
        run_worker(s.kafka, s.processor, loglevel=faust_loglevel(log_level))

    return worker
