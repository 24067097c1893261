"""Round bookkeeping per family: which updates join which round, when it closes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from processors.federated.aggregation import AggregationConfig, aggregate, staleness_weight
from schemas.federated import GlobalState, ModelDelta

__all__ = ["RoundCoordinator"]


@dataclass
class _Round:
    opened_at: float
    updates: dict[str, ModelDelta] = field(default_factory=dict)


class RoundCoordinator:
    """Round bookkeeping per family (pure): every accepted update joins the family's open
    round (a late one built on an older version is down-weighted, see
    :func:`staleness_weight`; one for a future round is rejected, and so is a re-send for
a closed round that already includes the edge); a round closes
    (``min_updates`` distinct edges, or ``round_timeout`` seconds after its
    first update), and the aggregate it closes with.

    >>> import numpy as np
    >>> c = RoundCoordinator(AggregationConfig(), min_updates=2, round_timeout=60)
    >>> d = {"weights": np.ones((1, 2))}
    >>> c.offer(ModelDelta("a", "f", 1, 0, 10, d), now=0.0)
    []
    >>> [s.version for s in c.offer(ModelDelta("b", "f", 1, 0, 10, d), now=1.0)]
    [1]
    """

    def __init__(self, config: AggregationConfig, *, min_updates: int = 2,
                 round_timeout: float = 300.0) -> None:
        if min_updates < 1 or round_timeout <= 0:
            raise ValueError("min_updates must be >= 1 and round_timeout > 0")
        self.config = config
        self.min_updates = min_updates
        self.round_timeout = round_timeout
        self.models: dict[str, GlobalState] = {}
        self._rounds: dict[str, _Round] = {}
        self._rng = np.random.default_rng(config.seed)
        self.rejected: list[tuple[str, str]] = []  # (edge_id, reason), most recent last

    def restore(self, state: GlobalState) -> None:
        """Continue from a published version (at start-up, from the repository)."""
        cur = self.models.get(state.family)
        if cur is None or state.version > cur.version:
            self.models[state.family] = state

    def _reject(self, edge: str, reason: str) -> None:
        self.rejected.append((edge, reason))
        del self.rejected[:-1000]

    def offer(self, update: ModelDelta, now: float) -> list[GlobalState]:
        """Take one update; returns the versions it completed (zero or one)."""
        state = self.models.get(update.family)
        if state is None:  # version 0: zeros shaped like the first update
            state = GlobalState(update.family, 0,
                                {k: np.zeros_like(v) for k, v in update.delta.items()})
            self.models[update.family] = state
        want = state.version + 1
        if update.round > want:
            self._reject(update.edge_id, f"round {update.round}: the open round is {want}")
            return []
        if update.round == state.version and update.edge_id in state.participants:
            # A re-send that arrived after its round closed: its rows are in already
            # (statistics must not be counted twice).
            self._reject(update.edge_id, f"round {update.round} already includes this edge")
            return []
        if staleness_weight(update.base_version, state.version, self.config.max_staleness,
                            self.config.staleness_decay) is None:
            self._reject(update.edge_id, f"stale base version {update.base_version}")
            return []
        rnd = self._rounds.setdefault(update.family, _Round(opened_at=now))
        rnd.updates[update.edge_id] = update  # a re-sent update replaces the earlier one
        if len(rnd.updates) >= self.min_updates:
            return [self._close(update.family, now)]
        return []

    def due(self, now: float) -> list[GlobalState]:
        """Close the rounds whose deadline passed (call every second or so)."""
        return [self._close(fam, now) for fam, r in list(self._rounds.items())
                if r.updates and now - r.opened_at >= self.round_timeout]

    def pending(self, family: str) -> int:
        r = self._rounds.get(family)
        return len(r.updates) if r else 0

    def _close(self, family: str, now: float) -> GlobalState:
        rnd = self._rounds.pop(family)
        result = aggregate(self.models[family], list(rnd.updates.values()), self.config,
                           now_ms=round(now * 1000), rng=self._rng)
        for edge, reason in result.rejected.items():
            self._reject(edge, reason)
        self.models[family] = result.state
        return result.state
