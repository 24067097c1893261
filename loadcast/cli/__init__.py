"""The ``loadcast`` command: one entry point for every role.

Each sub-command loads the settings (env + ``--config`` file), lets its options override
them, wires the parts from ``streams``/``processors``/``sinks`` and runs until done or
until Ctrl-C/SIGTERM, then stops cleanly.

One module per role, each with ``register(app, get_settings)``:

- :mod:`~loadcast.cli.broker`: ``broker``, ``topics ensure|list``
- :mod:`~loadcast.cli.agent`: ``agent`` (edge agent, trace replay)
- :mod:`~loadcast.cli.worker`: ``worker`` (forecasting processor)
- :mod:`~loadcast.cli.sidecar`: ``sidecar`` (routing sidecar)
- :mod:`~loadcast.cli.federated`: ``coordinator``, ``model list|show``
- :mod:`~loadcast.cli.mirror`: ``bundle push|serve``, ``mirror keygen``, ``planner``,
  ``executor``
- :mod:`~loadcast.cli.sink`: ``sink``, ``query``
- :mod:`~loadcast.cli.tasks`: ``tasks`` (task API), ``swarm-worker``
- :mod:`~loadcast.cli.demo`: ``demo``
- :mod:`~loadcast.cli.show_settings`: ``settings`` (every setting, its variable and default)

Shared: :mod:`~loadcast.cli.common` (errors, settings), :mod:`~loadcast.cli.options`
(options spelled the same everywhere). Heavy libraries (Kafka, Faust, ClickHouse) are
imported inside the commands that use them, so ``loadcast --help`` stays fast.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from loadcast.cli import (
    agent,
    api,
    broker,
    demo,
    federated,
    mirror,
    show_settings,
    sidecar,
    sink,
    tasks,
    worker,
)
from loadcast.cli.common import fail, settings, state
from loadcast.cli.options import LEVEL_HELP, parse_log_level

app = typer.Typer(
    help="loadcast: forecast each API endpoint's load online and act before the spike.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default: $LOADCAST_CONFIG)."),
]


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
    state["config"] = config


# In the order of `loadcast --help`.
for _role in (broker, agent, worker, sidecar, federated, mirror, sink, api, tasks, demo,
              show_settings):
    _role.register(app, settings)


def main() -> None:
    """Entry point of the ``loadcast`` script."""
    # A crash in native code (chDB, librdkafka) prints every thread's Python stack to
    # stderr (the service's log) instead of dying silently.
    faulthandler.enable()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
