"""The processor's engine: telemetry bytes in, scores/anomalies/dead letters/snapshots out.

No Kafka client and no Faust here: the Faust wiring (``processors.apps.worker``) hands each
record's partition, offset, key and value to :meth:`Engine.handle`, and the engine calls
an :class:`Outputs` implementation for what must be produced. That keeps exactly-once
effect testable without a broker.

**Exactly-once effect.** Every endpoint model remembers the newest input position
(offset, index inside a TelemetryBatch) it has applied and skips anything at or below it.
A snapshot is the pickled model (which includes that position). Snapshots are written per
partition to the compacted ``processor-snapshots`` topic, co-partitioned with telemetry,
in rounds: all models changed since the last round, then — once those are delivered — a
*checkpoint* record naming the partition offset the round contains. On assignment the
partition's snapshots are read back, the models restored, and consumption resumes at
checkpoint + 1 (or the partition start when there is none). Every record before that
offset belongs to an endpoint whose snapshot covers it, and every record after it is
applied exactly once thanks to the per-model position, whatever Faust's committed offset
says and whether the worker died by kill -9 or left cleanly. This needs no Kafka
transactions (which Tansu does not support) and no exact ListOffsets (which Tansu
undercounts): the snapshot partition is read to the end by Fetch (partition EOF).

**Global trees.** With a :class:`~processors.forecasting.global_trees.SharedTrees`, every
default forecaster's rows are pooled for the worker's trees, and the trees the models use
are kept in the same snapshot partitions (:mod:`processors.treelog`, ``Engine.treelog``).
"""

from __future__ import annotations

import io
import logging
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from processors.endpoint import EndpointModel, Observation, ProcessorConfig
from processors.forecasting.global_trees import SharedTrees
from processors.forecasting.trees import TreeEnsemble
from processors.treelog import SnapshotRecord, TreesLog
from schemas.codec import Codec, CodecError, Record
from schemas.validation import Limits, reencode, reference_ms, window_problem

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "__checkpoint__/{partition}"


class Outputs(Protocol):
    """Where the engine's results go (Kafka in the worker, lists in tests)."""

    def score(self, endpoint_id: str, value: bytes) -> None: ...

    def anomaly(self, endpoint_id: str, value: bytes) -> None: ...

    def dead_letter(
        self, key: bytes | None, value: bytes, reason: str, detail: str, partition: int,
        offset: int,
    ) -> None: ...


@dataclass
class PartitionState:
    """The models of one telemetry partition, and what the next snapshot must hold."""

    partition: int
    models: dict[str, EndpointModel] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    processed: int = -1  # highest offset fully handled
    resume: int = 0  # first offset to apply after a recovery
    # While recovering, records are dropped until the one at ``resume`` arrives: the
    # consumer may still deliver what it fetched from its old position before the seek.
    recovering: bool = False
    evicted: set[str] = field(default_factory=set)  # to delete from the snapshot topic
    # Global trees in the snapshot log by version, and the version each endpoint's latest
    # snapshot refers to (processors.treelog).
    trees: dict[int, TreeEnsemble] = field(default_factory=dict)
    snapshot_trees: dict[str, int] = field(default_factory=dict)

    def expect(self, offset: int) -> None:
        """The consumer was sought to ``offset`` (everything before it is processed): drop
        records until that one arrives, as after a recovery.

        >>> s = PartitionState(0, processed=9); s.expect(10); (s.resume, s.recovering)
        (10, True)
        """
        self.resume = offset
        self.recovering = True


@dataclass
class EngineStats:
    """Counters the worker exports as metrics."""

    records: int = 0
    windows: int = 0
    skipped_replayed: int = 0
    scores_computed: int = 0
    scores_published: int = 0
    anomalies: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    steps_learned: int = 0
    evicted: int = 0  # idle models dropped to make room (max_endpoints caps)


class _SnapshotUnpickler(pickle.Unpickler):
    """Unpickles endpoint models, including those snapshotted before a class moved."""

    #: (module, name) then -> (module, name) now, for classes a snapshot may hold.
    MOVED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        # The HalfSpaceTrees detector; the old name is now the detector protocol's.
        ("processors.anomaly", "AnomalyDetector"):
            ("processors.anomaly", "HalfSpaceTreesDetector"),
        # A warm-started endpoint's forecaster (processors/federated.py became a package).
        ("processors.federated", "ColdStartForecaster"):
            ("processors.federated.coldstart", "ColdStartForecaster"),
    }

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(*self.MOVED.get((module, name), (module, name)))


def load_snapshot(state: bytes) -> Any:
    """The object pickled in a snapshot's ``state`` (an :class:`EndpointModel`)."""
    return _SnapshotUnpickler(io.BytesIO(state)).load()


Slot = tuple[int, str]  # (partition, endpoint_id)


class ModelCaps:
    """The ``max_endpoints`` / ``max_endpoints_per_api`` caps: models by last use (oldest
    first), all and per api; room for a new one is made by evicting the longest-idle
    model once it has been idle ``idle_seconds`` (``on_evict(slot, idle)`` drops it)."""

    def __init__(self, max_endpoints: int, max_per_api: int, idle_seconds: float,
                 on_evict: Callable[[Slot, float], None]) -> None:
        self.max_endpoints = max_endpoints
        self.max_per_api = max_per_api
        self.idle_seconds = idle_seconds
        self.on_evict = on_evict
        self._lru: OrderedDict[Slot, float] = OrderedDict()
        self._by_api: dict[str, OrderedDict[Slot, float]] = {}
        self._api_of: dict[Slot, str] = {}

    def track(self, slot: Slot, api: str, now: float) -> None:
        self._lru[slot] = now
        self._by_api.setdefault(api, OrderedDict())[slot] = now
        self._api_of[slot] = api

    def touch(self, slot: Slot, now: float) -> None:
        api = self._api_of.get(slot)
        if api is None:
            return
        self._lru[slot] = now
        self._lru.move_to_end(slot)
        per = self._by_api[api]
        per[slot] = now
        per.move_to_end(slot)

    def untrack(self, slot: Slot) -> None:
        self._lru.pop(slot, None)
        api = self._api_of.pop(slot, None)
        if api is not None:
            per = self._by_api.get(api)
            if per is not None:
                per.pop(slot, None)
                if not per:
                    del self._by_api[api]

    def admit(self, api: str, now: float) -> str | None:
        """Room for one more model (evicting the longest-idle one if it has been idle
        ``idle_seconds``), else why not."""
        if len(self._lru) >= self.max_endpoints:
            self._evict_idle(self._lru, now)
        per = self._by_api.get(api)
        if per is not None and len(per) >= self.max_per_api:
            self._evict_idle(per, now)
        if len(self._lru) >= self.max_endpoints:
            return (f"worker holds max_endpoints ({self.max_endpoints}) models, none idle "
                    f"for {self.idle_seconds:g} s")
        if per is not None and len(per) >= self.max_per_api:
            return (f"api {api[:100]!r} has max_endpoints_per_api "
                    f"({self.max_per_api}) models, none idle for "
                    f"{self.idle_seconds:g} s")
        return None

    def _evict_idle(self, lru: OrderedDict[Slot, float], now: float) -> None:
        if not lru:
            return
        slot, seen = next(iter(lru.items()))
        if now - seen < self.idle_seconds:
            return
        self.untrack(slot)
        self.on_evict(slot, now - seen)


class Engine:
    """Per-partition endpoint models; see the module docstring."""

    def __init__(
        self, config: ProcessorConfig, codec: Codec, outputs: Outputs,
        warm_start: Callable[[EndpointModel], None] | None = None,
        trees: SharedTrees | None = None,
    ) -> None:
        self.config = config
        self.codec = codec
        self.outputs = outputs
        self.warm_start = warm_start
        self.trees = trees  # the worker's global trees (None: not run)
        self.partitions: dict[int, PartitionState] = {}
        self.treelog = TreesLog(self.partitions, trees, config.forecaster)
        self.stats = EngineStats()
        self.limits = Limits(config.max_window_seconds, config.clock_skew_seconds)
        self.caps = ModelCaps(config.max_endpoints, config.max_endpoints_per_api,
                              config.endpoint_idle_seconds, self._evicted)
        self._logged_at, self._unlogged = 0.0, 0

    # ----------------------------------------------------------------- records

    def handle(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None,
        now: float | None = None, timestamp_ms: int | None = None,
    ) -> None:
        """Apply one telemetry record (EndpointTelemetry or TelemetryBatch value);
        ``timestamp_ms`` is its Kafka timestamp (the reference time of
        :mod:`schemas.validation`)."""
        state = self.partitions.get(partition)
        if state is None:
            state = self.partitions[partition] = PartitionState(partition)
        if state.recovering:
            if offset != state.resume:
                return  # fetched before the seek landed; it comes again in order
            state.recovering = False
        if offset < state.resume:
            return  # before the checkpoint: every endpoint's snapshot already has it
        now = time.time() if now is None else now
        self.stats.records += 1
        try:
            if value is None:
                raise CodecError("invalid", "record has no value")
            record = self.codec.decode(value, validate=False)
            name = self.codec.name_of(value)
        except CodecError as e:
            self._dead(key, value or b"", e.reason, e.detail, partition, offset)
            state.processed = offset
            return
        if name == "loadcast.TelemetryBatch":
            windows = record["windows"]
        elif name == "loadcast.EndpointTelemetry":
            windows = [record]
        else:
            self._dead(key, value, "wrong_schema", f"{name} on the telemetry topic",
                       partition, offset)
            state.processed = offset
            return
        ref = reference_ms(timestamp_ms)
        for index, window in enumerate(windows):
            problem = window_problem(self.codec, window, ref, self.limits)
            if problem is None:
                problem = self._observe(state, window, (offset, index), now)
            if problem is not None:
                raw = value if len(windows) == 1 else reencode(self.codec, window)
                self._dead(window["endpoint_id"].encode(), raw, problem[0], problem[1],
                           partition, offset)
        state.processed = offset

    def _observe(self, state: PartitionState, window: Record, position: tuple[int, int],
                 now: float) -> tuple[str, str] | None:
        endpoint = window["endpoint_id"]
        slot = (state.partition, endpoint)
        model = state.models.get(endpoint)
        if model is None:
            refused = self.caps.admit(window["api"], now)
            if refused is not None:
                return "endpoint_cap", refused
            model = state.models[endpoint] = self.new_model(endpoint)
            self.caps.track(slot, window["api"], now)
        else:
            self.caps.touch(slot, now)
        obs: Observation = model.observe(window, position, now)
        if not obs.applied:
            self.stats.skipped_replayed += 1
            return None
        state.dirty.add(endpoint)
        self.stats.windows += 1
        self.stats.scores_computed += 1
        self.stats.steps_learned += obs.steps_learned
        if obs.steps_learned and self.trees is not None:
            self.trees.saw(window["window_end"] / 1000.0)  # data time: refits go by it
        if obs.publish and obs.score is not None:
            self.outputs.score(endpoint, self.codec.encode("LoadScore", obs.score))
            self.stats.scores_published += 1
        if obs.anomaly is not None:
            self.outputs.anomaly(endpoint, self.codec.encode("Anomaly", obs.anomaly))
            self.stats.anomalies += 1
        return None

    def _evicted(self, slot: tuple[int, str], idle: float) -> None:
        """The caps dropped the longest-idle model to make room: forget it here too (its
        snapshot record becomes a tombstone)."""
        partition, endpoint = slot
        state = self.partitions.get(partition)
        if state is not None and state.models.pop(endpoint, None) is not None:
            state.dirty.discard(endpoint)
            state.evicted.add(endpoint)
            self.stats.evicted += 1
            log.info("evicted endpoint model %s (idle %.0f s) to make room", endpoint, idle)

    def new_model(self, endpoint_id: str) -> EndpointModel:
        """A model for an endpoint seen for the first time (from the global model when a
        ``warm_start`` hook is set; an endpoint restored from a snapshot never gets here)."""
        model = EndpointModel.create(endpoint_id, self.config)
        if self.warm_start is not None:
            self.warm_start(model)
        self.treelog.attach(model)
        return model

    def _dead(self, key: bytes | None, value: bytes, reason: str, detail: str, partition: int,
              offset: int) -> None:
        self.stats.dead_letters[reason] = self.stats.dead_letters.get(reason, 0) + 1
        # A flood of garbage must not become a flood of log lines: one a second, with a
        # count (every record is in dead-letter with its reason, and counted by reason).
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            log.warning("dead-letter p%d@%d: %s: %s (%d dead letters since the last line)",
                        partition, offset, reason, detail[:300], self._unlogged)
            self._logged_at, self._unlogged = now, 0
        self.outputs.dead_letter(key, value, reason, detail, partition, offset)

    # ----------------------------------------------------------------- snapshots

    def begin_snapshot(self, partition: int) -> tuple[list[str], SnapshotRecord] | None:
        """Start a snapshot round: the endpoints to save and the checkpoint to write once
        they are saved (None while the partition is held for recovery).

        The checkpoint names the offset processed *now*; each listed model may be pickled
        later (:meth:`snapshot_record`, in chunks, so the event loop keeps serving), and
        then holds at least that much. Models changed meanwhile are dirty again and go in
        the next round.
        """
        state = self.partitions.get(partition)
        if state is None or state.resume < 0:
            return None
        endpoints = sorted(state.dirty | state.evicted)
        state.dirty.clear()
        state.evicted.clear()
        checkpoint = SnapshotRecord(partition, CHECKPOINT_KEY.format(partition=partition), {
            "endpoint_id": None, "source_partition": partition, "offset": state.processed,
            "index": -1, "taken_at": round(time.time() * 1000),
            "model": self.config.forecaster, "format": "none", "state": b"",
        })
        return endpoints, checkpoint

    def snapshot_record(self, partition: int, endpoint: str) -> SnapshotRecord | None:
        """The pickled model of ``endpoint`` with the position it contains; a tombstone
        (value None) for an endpoint evicted since."""
        state = self.partitions.get(partition)
        if state is None:
            return None
        model = state.models.get(endpoint)
        self.treelog.snapshotted(state, endpoint, model)
        if model is None:
            return SnapshotRecord(partition, endpoint, None)
        offset, index = model.applied
        return SnapshotRecord(partition, endpoint, {
            "endpoint_id": endpoint, "source_partition": partition, "offset": offset,
            "index": index, "taken_at": round(time.time() * 1000),
            "model": self.config.forecaster, "format": "pickle",
            "state": pickle.dumps(model, protocol=5),
        })

    def hold(self, partition: int) -> None:
        """Drop records of ``partition`` until :meth:`restore` (called as soon as a
        partition is assigned, before its snapshots are read)."""
        self._forget(partition)
        state = self.partitions[partition] = PartitionState(partition, resume=-1)
        state.recovering = True

    def restore(self, partition: int, records: Iterable[Record | None],
                start_offset: int = 0) -> int:
        """Rebuild ``partition`` from its snapshot records (oldest first); returns the
        offset to resume consuming from (never below ``start_offset``, the partition's
        first available offset).  Records are then dropped until that offset arrives."""
        latest: dict[str | None, Record] = {}
        kept, trees = self.treelog.split(records)
        for r in kept:
            latest[r["endpoint_id"]] = r
        self._forget(partition)
        state = self.partitions[partition] = PartitionState(partition)
        now = time.time()
        for endpoint, r in latest.items():
            if endpoint is None or r["format"] != "pickle":
                continue
            # Only the processor writes this topic: restrict its ACLs to the workers.
            model = load_snapshot(r["state"])
            if isinstance(model, EndpointModel):
                state.models[endpoint] = model
                self.caps.track((partition, endpoint), model.api, now)
        self.treelog.restore(state, trees)
        checkpoint = latest.get(None)
        resume = checkpoint["offset"] + 1 if checkpoint is not None else start_offset
        state.resume = max(resume, start_offset)
        state.processed = state.resume - 1
        state.recovering = True
        return state.resume

    def rebase(self, partition: int) -> None:
        """The broker lost the partition's log (it came back empty): keep every model but
        forget positions, so the new log's records, from offset 0, are applied."""
        state = self.partitions.get(partition)
        if state is None:
            return
        state.resume = 0
        state.processed = -1
        state.recovering = False
        for model in state.models.values():
            model.applied = (-1, -1)

    def drop(self, partition: int) -> None:
        """Forget a partition (revoked: another worker owns it now)."""
        self._forget(partition)
        self.partitions.pop(partition, None)

    def _forget(self, partition: int) -> None:
        state = self.partitions.get(partition)
        if state is not None:
            for endpoint in state.models:
                self.caps.untrack((partition, endpoint))

    def endpoints(self) -> int:
        """Endpoint models held. Safe from another thread (metrics): iterates a copy."""
        return sum(len(s.models) for s in list(self.partitions.values()))

    def partitions_ready(self) -> int:
        """Partitions assigned and recovered (same thread note as :meth:`endpoints`)."""
        return sum(1 for s in list(self.partitions.values()) if s.resume >= 0)

    def forecasts(self) -> dict[str, Any]:
        """Current 1..horizon forecast means per endpoint (for tests and inspection)."""
        out: dict[str, Any] = {}
        for s in self.partitions.values():
            for endpoint, m in s.models.items():
                out[endpoint] = [round(p.mean, 9) for p in m.forecaster.forecast(
                    self.config.horizon)]
        return out
