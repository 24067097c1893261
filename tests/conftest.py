"""Shared fixtures: one real embedded broker (Tansu) per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.codec import Codec
from streams.edge.replay import data_dir
from streams.kafka.broker import EmbeddedBroker
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
DATA = data_dir()
ELB = DATA / "elb_request_count_8c0756.csv"
NYC = DATA / "nyc_taxi.csv"


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Tansu broker on a free loopback port, stopped at the end of the session."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    """Settings on the session broker with a topic prefix of this test's own (isolation)."""
    s = KafkaSettings(
        bootstrap_servers=broker.bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=3,
    )
    ensure_topics(s)
    return s


@pytest.fixture(scope="session")
def codec() -> Codec:
    return Codec.embedded()
