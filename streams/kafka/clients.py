"""The bare confluent-kafka constructors: the only calls of ``Producer(``, ``Consumer(``
and ``AdminClient(`` in loadcast (outside tests and benchmarks).

Services do not call these: they ask :class:`streams.kafka.runtime.KafkaRuntime`, which
adds the shared client settings. The modules underneath the runtime (the record producer,
topic administration, the broker watch, the embedded broker's readiness probe) build their
own configuration and call these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient


def new_producer(conf: Mapping[str, Any]) -> Producer:
    return Producer(dict(conf))


def new_consumer(conf: Mapping[str, Any]) -> Consumer:
    return Consumer(dict(conf))


def new_admin(conf: Mapping[str, Any]) -> AdminClient:
    return AdminClient(dict(conf))
