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

#: Test files that each load both CPUs for a minute or more (several processes, real-time
#: pipelines). They are marked ``serial``: ``make test`` runs them one after another after
#: the rest (``-m serial``); beside another heavy file the quick demo's worker fell 15 s
#: behind and its test failed.
HEAVY_FILES = frozenset({"test_demo.py", "test_federated_bench.py", "test_mirror_e2e.py",
                         "test_bench_processor.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`HEAVY_FILES` ``serial``."""
    for item in items:
        if item.path.name in HEAVY_FILES:
            item.add_marker(pytest.mark.serial)


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
