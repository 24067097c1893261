"""``loadcast broker`` (the embedded Kafka-protocol broker) and ``loadcast topics
ensure|list``. Kafka's client library is imported inside the commands (start-up speed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from loadcast.cli.common import SettingsFn, console, fail
from loadcast.cli.options import BootstrapOpt
from streams.signals import stop_on_signals


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``topics ensure|list`` and ``broker`` to the root ``app``."""
    topics_app = typer.Typer(help="The loadcast topics on the configured Kafka.",
                             no_args_is_help=True)
    app.add_typer(topics_app, name="topics")
    topics_app.command("ensure")(_topics_ensure(get_settings))
    topics_app.command("list")(_topics_list(get_settings))
    app.command("broker")(_broker(get_settings))


def _broker(get_settings: SettingsFn) -> Callable[..., None]:
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

        s = get_settings()
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

    return broker


def _topics_ensure(get_settings: SettingsFn) -> Callable[..., None]:
    def topics_ensure(bootstrap: BootstrapOpt = None) -> None:
        """Create the topics of the catalog that do not exist (idempotent)."""
        from streams.kafka.runtime import KafkaRuntime, KafkaUnreachable

        s = get_settings(bootstrap)
        try:
            for name, outcome in KafkaRuntime(s.kafka).ensure_topics().items():
                print(f"{name}\t{outcome}")
        except KafkaUnreachable as e:
            raise fail(str(e), 1) from None

    return topics_ensure


def _topics_list(get_settings: SettingsFn) -> Callable[..., None]:
    def topics_list(bootstrap: BootstrapOpt = None) -> None:
        """Print the topic catalog: name, value schema, key (names carry kafka.topic_prefix)."""
        from streams.kafka.topics import CATALOG, topic_name

        s = get_settings(bootstrap)
        for spec in CATALOG:
            extra = ",".join(f"{k}={v}" for k, v in spec.config.items())
            print(f"{topic_name(s.kafka, spec.name)}\t{spec.value_schema}\t{spec.key}\t{extra}")

    return topics_list
