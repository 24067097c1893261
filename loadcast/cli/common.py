"""What every ``loadcast`` command shares: the error console, :func:`fail`, and the
settings of this invocation (env + ``--config`` file, set by the root callback).

The role modules get the settings through the ``get_settings`` callable that
the root (:mod:`loadcast.cli`) hands to their ``register(app, get_settings)``; they
import nothing from the package's ``__init__``, so there is no cycle to dodge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import typer
from rich.console import Console
from rich.markup import escape

from loadcast.settings import Settings, SettingsError, load_settings
from streams.kafka.settings import KafkaSettings

console = Console(stderr=True)
#: The root's ``--config``, set by its callback before any command runs.
state: dict[str, Any] = {"config": None}


class SettingsFn(Protocol):
    """``get_settings(bootstrap=None)``: this invocation's settings; ``bootstrap``
    (``-b``) overrides ``kafka.bootstrap_servers``."""

    def __call__(self, bootstrap: str | None = None) -> Settings: ...


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit to raise (2: bad input, 1: failure)."""
    console.print(f"[red]error:[/red] {escape(message)}")  # plain text: [[...]] stays
    return typer.Exit(code)


def settings(bootstrap: str | None = None) -> Settings:
    """Settings from env/file; a bad field stops here with its name."""
    config: Path | None = state["config"]
    try:
        s = load_settings(config)
    except SettingsError as e:
        raise fail(str(e)) from None
    if bootstrap:
        s.kafka.bootstrap_servers = bootstrap
    return s


def ensure_kafka(kafka: KafkaSettings) -> None:
    """Create the missing topics; exit 1 with the runtime's ``cannot reach Kafka at ...``
    when it fails."""
    # confluent_kafka: not imported for `loadcast --help`
    from streams.kafka.runtime import KafkaRuntime, KafkaUnreachable

    try:
        KafkaRuntime(kafka).ensure_topics()
    except KafkaUnreachable as e:
        raise fail(str(e), 1) from None
