"""Key placement compatible with the Java client and librdkafka's ``murmur2_random``.

Telemetry of one endpoint must land on one partition whichever client produced it, and
whether it travels alone or inside a TelemetryBatch; so batches are grouped with the same
hash the producers use for single keyed records.

>>> partition_for(b"ep-1", 6) == partition_for(b"ep-1", 6)
True
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(key: bytes, partitions: int) -> int:
    """Partition of ``key`` among ``partitions`` (Java ``Utils.toPositive(murmur2) % n``)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
