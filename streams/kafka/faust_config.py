"""Faust settings shared by every loadcast Faust app (worker, coordinator, planner).

Why each value (also in the README):

- ``broker_session_timeout=6``, ``broker_heartbeat_interval=1``,
  ``broker_rebalance_timeout=6``: Tansu answers JoinGroup after about half the session
  timeout, so Faust's default 60 s would mean 30 s per rebalance; 6 s also notices a dead
  worker quickly.
- ``table_standby_replicas=0``, no Faust tables: state is recovered from loadcast's own
  snapshots, not Faust changelogs (their recovery relies on ListOffsets, which Tansu
  undercounts).
- ``processing_guarantee="at_least_once"``: exactly-once *effect* comes from snapshot
  positions; Kafka transactions are not available on Tansu.
- ``topic_allow_declare=False``: topics come from ``streams.kafka.topics.ensure_topics``.
- ``web_enabled=False``: metrics are served by prometheus-client.
- aiokafka's ``fetch_max_wait_ms`` is cut from Faust's hard-coded 1,500 ms to 20 ms.
- SASL/TLS come from the same ``kafka`` settings as the confluent-kafka clients.
"""

from __future__ import annotations

from typing import Any

import faust

from streams.kafka.settings import KafkaSettings

FETCH_MAX_WAIT_MS = 20


def _short_fetch_wait() -> None:
    """Faust hard-codes aiokafka's ``fetch_max_wait_ms=1500``. A broker with nothing new
    holds a fetch that long (Tansu does), so a window arriving just after a fetch waited up
    to 1.5 s before it was scored. Scores are about acting early: wait at most 20 ms."""
    import aiokafka

    if getattr(aiokafka.AIOKafkaConsumer.__init__, "_loadcast", False):
        return
    original = aiokafka.AIOKafkaConsumer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("fetch_max_wait_ms") == 1500:
            kwargs["fetch_max_wait_ms"] = FETCH_MAX_WAIT_MS
        original(self, *args, **kwargs)

    init._loadcast = True  # type: ignore[attr-defined]
    aiokafka.AIOKafkaConsumer.__init__ = init


def faust_broker_urls(kafka: KafkaSettings) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(",") if hp.strip()]


CONSUMER_MAX_FETCH_BYTES = 16 * 1024 * 1024


def faust_settings(kafka: KafkaSettings) -> dict[str, Any]:
    """The Faust app settings loadcast uses (module docstring says why)."""
    _short_fetch_wait()
    return {
        "broker": faust_broker_urls(kafka),
        "broker_credentials": credentials(kafka),
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "broker_rebalance_timeout": 6.0,
        "table_standby_replicas": 0,
        "topic_allow_declare": False,
        "topic_disable_leader": True,
        "consumer_auto_offset_reset": "earliest",
        # aiokafka's max_partition_fetch_bytes (Faust: 1 MiB). A producer batch larger
        # than this (one ~1 MB record with others) was never consumed by the worker:
        # it re-fetched the same partial batch forever and scored nothing more.
        "consumer_max_fetch_size": CONSUMER_MAX_FETCH_BYTES,
        "web_enabled": False,
        "value_serializer": "raw",
        "key_serializer": "raw",
        "processing_guarantee": "at_least_once",
        "store": "memory://",
    }


def credentials(kafka: KafkaSettings) -> Any:
    """Faust (aiokafka) credentials from the shared SASL/TLS settings."""
    proto = (kafka.security_protocol or "PLAINTEXT").upper()
    if proto == "PLAINTEXT":
        return None
    ssl_context = None
    if "SSL" in proto:
        import ssl

        ssl_context = ssl.create_default_context(cafile=kafka.ssl_ca_location)
        if kafka.ssl_certificate_location:
            ssl_context.load_cert_chain(kafka.ssl_certificate_location, kafka.ssl_key_location)
    if proto.startswith("SASL"):
        password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        return faust.SASLCredentials(
            username=kafka.sasl_username, password=password,
            mechanism=kafka.sasl_mechanism or "PLAIN", ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)
