"""The global trees in the snapshot log: what a worker writes, deletes and restores.

A snapshot of an endpoint model holds only the version of the global trees it uses
(:mod:`processors.forecasting.global_trees`), so the trees themselves are written to the
same snapshot partition, keyed ``__trees__/{partition}/{version}``, before the first
model snapshot that refers to them, and deleted (a tombstone) once no model's latest
snapshot does.  New trees make every model dirty, so the next round records the new
version.  Workers number their refits alike: trees about to be written under a version
the partition's log holds for other trees are renumbered first, in every model that has
them.  A restored model gets the trees of the version it recorded (bit for bit); trees
that cannot be found leave its candidate empty until the next refit (logged).

Plain bookkeeping over the engine's partitions; no Kafka here.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from processors.forecasting.global_trees import SharedTrees, direct_of
from processors.forecasting.trees import TreeEnsemble
from schemas.codec import Record

if TYPE_CHECKING:
    from processors.endpoint import EndpointModel
    from processors.engine import PartitionState

log = logging.getLogger(__name__)

TREES_KEY = "__trees__/{partition}/{version}"
TREES_FORMAT = "global-trees"  # ModelSnapshot.format of a trees record


@dataclass(frozen=True)
class SnapshotRecord:
    """One record of the snapshot topic (ModelSnapshot value, keyed, partitioned)."""

    partition: int
    key: str
    value: Record | None  # None: a tombstone (the model was evicted)


class TreesLog:
    """The trees of every partition's snapshot log (``PartitionState.trees``, and the
    version each endpoint's latest snapshot refers to, ``snapshot_trees``) and the
    worker's :class:`SharedTrees` (None: the worker runs no trees)."""

    def __init__(self, partitions: dict[int, PartitionState], shared: SharedTrees | None,
                 kind: str) -> None:
        self.partitions = partitions
        self.shared = shared
        self.kind = kind

    def share(self, model: TreeEnsemble | None, partitions: Iterable[int] | None = None
              ) -> int:
        """Have every model (of ``partitions``; default all) use ``model``; each one whose
        trees change is dirty.  Returns how many changed."""
        changed = 0
        for p in list(self.partitions) if partitions is None else partitions:
            state = self.partitions.get(p)
            for endpoint, m in state.models.items() if state is not None else ():
                f = direct_of(m.forecaster)
                if f is not None and f.global_model is not model:
                    f.set_global_model(model)
                    state.dirty.add(endpoint)  # type: ignore[union-attr]  # not None here
                    changed += 1
        return changed

    def share_current(self, partitions: Iterable[int]) -> int:
        """Give the worker's current trees to the models of ``partitions`` (kept aside
        while the worker's trees moved on); 0 without trees."""
        return 0 if self.shared is None else self.share(self.shared.current, partitions)

    def record(self, partition: int, endpoint: str) -> SnapshotRecord | None:
        """The trees ``endpoint``'s snapshot will refer to, when the partition's log does
        not hold them yet: produce it before the model's snapshot (once per partition and
        version)."""
        state = self.partitions.get(partition)
        model = state.models.get(endpoint) if state is not None else None
        f = direct_of(model.forecaster) if model is not None else None
        g = f.global_model if f is not None else None
        if state is None or g is None:
            return None
        held = state.trees.get(g.version)
        if held is not None:
            if held is g or held.same_trees(g):
                return None
            g = self._renumber(g)  # another worker's trees have this number here
        state.trees[g.version] = g
        shared = self.shared
        return SnapshotRecord(partition, TREES_KEY.format(partition=partition,
                                                          version=g.version), {
            "endpoint_id": None, "source_partition": partition, "offset": -1, "index": -1,
            "taken_at": round(time.time() * 1000), "model": self.kind,
            "format": TREES_FORMAT, "state": pickle.dumps({
                "version": g.version, "trees": g,
                "next_fit": shared.next_fit if shared is not None else None,
            }, protocol=5),
        })

    def _renumber(self, model: TreeEnsemble) -> TreeEnsemble:
        """``model`` under a version above every one seen, given to every model that had
        it (the same trees: the forecasts do not change; the snapshots will say)."""
        if self.shared is not None:
            fresh = self.shared.renumber(model)
        else:
            fresh = model.with_version(1 + max(
                (v for s in self.partitions.values() for v in s.trees), default=0))
        n = 0
        for state in self.partitions.values():
            for endpoint, m in state.models.items():
                f = direct_of(m.forecaster)
                if f is not None and f.global_model is model:
                    f.set_global_model(fresh)
                    state.dirty.add(endpoint)
                    n += 1
        log.info("global trees v%d renumbered v%d (%d models): a partition's snapshot log "
                 "holds other trees under v%d", model.version, fresh.version, n,
                 model.version)
        return fresh

    def snapshotted(self, state: PartitionState, endpoint: str,
                    model: EndpointModel | None) -> None:
        """``endpoint``'s snapshot (None: its tombstone) is being written."""
        if model is None:
            state.snapshot_trees.pop(endpoint, None)
            return
        f = direct_of(model.forecaster)
        state.snapshot_trees[endpoint] = f.global_version if f is not None else 0

    def unused(self, partition: int) -> list[SnapshotRecord]:
        """Tombstones for trees no endpoint's latest snapshot in ``partition`` refers to
        (produce them once those snapshots are acknowledged)."""
        state = self.partitions.get(partition)
        if state is None:
            return []
        used = set(state.snapshot_trees.values())
        gone = [v for v in state.trees if v not in used]
        for v in gone:
            del state.trees[v]
        return [SnapshotRecord(partition, TREES_KEY.format(partition=partition, version=v),
                               None) for v in gone]

    @staticmethod
    def split(records: Iterable[Record | None]
              ) -> tuple[list[Record], dict[int, tuple[TreeEnsemble, float | None]]]:
        """A partition's snapshot records (oldest first) -> the others, and the trees its
        log holds by version (with the refit time they were written with)."""
        others: list[Record] = []
        trees: dict[int, tuple[TreeEnsemble, float | None]] = {}
        for r in records:
            if r is None:
                continue
            if r["format"] == TREES_FORMAT:
                t = pickle.loads(r["state"])  # only workers write this topic
                trees[int(t["version"])] = (t["trees"], t.get("next_fit"))
            elif r["format"] == "evicted" and str(r["endpoint_id"]).startswith("__trees__/"):
                trees.pop(int(str(r["endpoint_id"]).rsplit("/", 1)[1]), None)
            else:
                others.append(r)
        return others, trees

    def restore(self, state: PartitionState,
                trees: dict[int, tuple[TreeEnsemble, float | None]]) -> None:
        """Give every restored model of ``state`` the trees of the version its snapshot
        recorded (none, logged, if the log lacks them); the worker's trees learn what was
        restored (numbering, schedule, trees for new endpoints)."""
        state.trees = {v: t for v, (t, _) in trees.items()}
        for endpoint, model in state.models.items():
            f = direct_of(model.forecaster)
            if f is None:
                continue
            recorded = f.global_version
            found = state.trees.get(recorded) if recorded else None
            if recorded and found is None:
                log.warning("partition %d: the global trees v%d of %s's snapshot are not in "
                            "the snapshot log: its trees candidate stays empty until the "
                            "next refit", state.partition, recorded, endpoint)
            if self.shared is None or not self.shared.attach(model.forecaster, found):
                f.set_global_model(None)  # turned off, or not the trainer's shape
            state.snapshot_trees[endpoint] = recorded
        for t, next_fit in trees.values():
            if self.shared is not None:
                self.shared.restored(t, next_fit)

    def attach(self, model: EndpointModel) -> None:
        """A new endpoint's model: its rows are pooled, it gets the current trees."""
        if self.shared is not None:
            self.shared.attach(model.forecaster, self.shared.current)
