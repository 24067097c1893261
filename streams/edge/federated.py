"""Edge-local training for federated rounds: telemetry stays here, model updates leave.

- :class:`LocalTrainer` (pure): the agent's own closed telemetry windows -> model steps
  (:class:`~processors.stepping.Stepper`) -> one local copy of the global model per endpoint
  (the default forecaster, warm-started from the global model when the endpoint is new).
  Every learning row (scale-free features and target) is added to the edge's
  least-squares statistics (:class:`~processors.federated.statistics.RowStats`).  It also runs one
  *shadow* cold start per endpoint: a forecaster warm-started from the global model as a
  new endpoint would be, that lives for one season; its first-season rows feed the
  cold-start statistics and its selector errors the federation's ``cold_errors``, so the
  federation learns how to forecast an endpoint it has no history for.
  :meth:`LocalTrainer.make_update` returns a :class:`~schemas.federated.ModelDelta`:
  the row sums since the base version (``gram``, ``cold_gram``), sample counts, scale-free
  statistics and a scale-free validation error; nothing in it is a telemetry value, an
  endpoint id or a rate (see :mod:`processors.federated`, Privacy).
- :class:`FederatedEdge`: the trainer on Kafka: loads new versions from ``global-model``
  (via :class:`~streams.model_repo.ModelRepository`) and publishes one ModelUpdate per
  round to ``model-updates``, keyed by model family.
- :class:`FederatedEdgeAgent`: an :class:`~streams.edge.agent.EdgeAgent` whose published
  windows are also handed to the trainer; :func:`build_federated_agent` wires it.

Rounds are synchronous: after loading version ``v`` the edge trains until it has
``min_samples`` new model steps, publishes its update for round ``v + 1`` built on ``v``,
and keeps training until version ``v + 1`` (or later) appears.  If none appears within
``resend_after`` seconds it sends the update again, with what it learned since (the
coordinator keeps an edge's latest update per round).  Rows learned after an update was
sent count toward the next round once a version that includes the update arrives; if the
version was made without this edge, they all count toward the next round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from processors.federated.aggregation import merge_stats
from processors.federated.coldstart import ColdStartForecaster, adopt_global, warm_start
from processors.federated.params import family_of, shared_view
from processors.federated.statistics import RowStats
from processors.forecasting.direct import DirectForecaster
from processors.stepping import Stepper
from schemas.codec import Codec, Record
from schemas.federated import GlobalState, ModelDelta, update_to_record
from streams.edge.agent import EdgeAgent, HostStats, TelemetryPublisher, build_agent
from streams.kafka.producer import RecordProducer
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.model_repo import ModelRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeTrainingConfig:
    """Local training at an edge; the forecaster shape must match the processor's."""

    step_seconds: int = 60
    season_seconds: int = 86_400
    horizon: int = 15
    learner: str = "rls"
    lateness_seconds: float = 10.0
    min_samples: int = 200  # model steps (over all endpoints) before an update is sent
    # A statistic is sent only once it sums at least this many rows (else its rows wait
    # for a later round): one row has ~16 unknowns once the constant and the time-of-day
    # terms are known, the sums of a horizon give 351 numbers, so fewer than ~22 rows could
    # in principle be solved for; 50 leaves a margin.
    min_rows: int = 50
    resend_after: float = 60.0  # seconds without a new version before re-sending
    cold_shadows: bool = True
    # Strength of the global model as the RLS prior of local models (new endpoints,
    # shadows, and every endpoint when a new version arrives), in rows of the global
    # statistics; None = one season.  Local models only forecast and validate at the edge:
    # what the edge sends are row statistics, which do not depend on the local weights.
    prior_samples: float | None = None
    round_prior: float = 0.1  # prior variance x I for global versions without statistics

    def forecaster(self) -> DirectForecaster:
        return DirectForecaster(self.step_seconds, self.season_seconds, self.horizon,
                                learner=self.learner)


@dataclass
class _Shadow:
    f: Any  # a warm-started DirectForecaster (or its ColdStartForecaster)


@dataclass
class _Endpoint:
    forecaster: Any
    shadow: _Shadow | None = None
    samples: int = 0  # mature steps learned since the current base version
    pred1: float = math.nan  # last 1-step forecast, scored when the next step arrives


@dataclass
class _ColdAcc:
    n: int = 0
    err_num: np.ndarray | None = None
    err_w: np.ndarray | None = None


@dataclass
class _Validation:
    abs_err: float = 0.0
    actual: float = 0.0


class LocalTrainer:
    """Per-endpoint local copies of the global model, trained on closed windows (pure).

    >>> t = LocalTrainer("edge-1", EdgeTrainingConfig(step_seconds=60, min_samples=5))
    >>> for i in range(8):
    ...     _ = t.observe([{"endpoint_id": "e", "window_start": 60_000 * i,
    ...                     "window_end": 60_000 * (i + 1), "request_count": 600}])
    >>> u = t.make_update(now=0.0)
    >>> (u.round, u.base_version, u.num_samples, sorted(u.delta))
    (1, 0, 7, ['cold_gram', 'gram'])
    """

    def __init__(self, edge_id: str, config: EdgeTrainingConfig | None = None) -> None:
        self.edge_id = edge_id
        self.config = config or EdgeTrainingConfig()
        self.family = family_of(self.config.forecaster())
        self.stepper = Stepper(self.config.step_seconds,
                               lateness_seconds=self.config.lateness_seconds)
        self.global_state: GlobalState | None = None
        self._eps: dict[str, _Endpoint] = {}
        self._cold = _ColdAcc()
        self._val = _Validation()
        H = self.config.horizon
        # Mature rows from the endpoints' models; first-season rows from the shadows.
        shadows = self.config.cold_shadows
        self._stats = RowStats(H, ("gram",) if shadows else ("gram", "cold_gram"))
        self._cold_stats = RowStats(H, ("cold_gram",) if shadows else ())
        self._sent: dict[str, np.ndarray] = {}
        self._sent_round: int | None = None
        self._sent_at = 0.0
        self.updates_made = 0
        self.cold_starts = 0  # endpoints that began from a global model

    @property
    def base_version(self) -> int:
        return self.global_state.version if self.global_state else 0

    # ------------------------------------------------------------------ learning

    def _new_forecaster(self) -> Any:
        f = self.config.forecaster()
        f.observe_rows(self._stats)
        if self.global_state is not None:
            self.cold_starts += 1
            return warm_start(f, self.global_state, prior_samples=self.config.prior_samples)
        return f

    def _new_shadow(self) -> _Shadow | None:
        if not self.config.cold_shadows:
            return None
        f = self.config.forecaster()
        f.observe_rows(self._cold_stats)
        if self.global_state is None:
            return _Shadow(f)
        return _Shadow(warm_start(f, self.global_state, prior_samples=self.config.prior_samples))

    def observe(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Learn from closed EndpointTelemetry windows; returns model steps learned."""
        learned = 0
        for r in records:
            eid = r["endpoint_id"]
            steps = self.stepper.add(eid, r["window_start"], r["window_end"],
                                     r["request_count"])
            if not steps:
                continue
            ep = self._eps.get(eid)
            if ep is None:
                ep = self._eps[eid] = _Endpoint(self._new_forecaster(), self._new_shadow())
            for st in steps:
                self._learn(ep, st.start, st.rate)
                learned += 1
        return learned

    def _learn(self, ep: _Endpoint, ts: float, rate: float) -> None:
        if math.isfinite(ep.pred1):
            self._val.abs_err += abs(rate - ep.pred1)
            self._val.actual += abs(rate)
        f = ep.forecaster
        f.learn(ts, rate)
        ep.samples += 1
        pts = f.forecast(1)
        ep.pred1 = pts[0].mean if pts else math.nan
        sh = ep.shadow
        if sh is not None:
            sh.f.learn(ts, rate)
            if sh.f.observations >= sh.f.season:
                self._harvest(sh)
                ep.shadow = self._new_shadow()

    def _harvest(self, sh: _Shadow) -> None:
        """A shadow cold start completed its season: keep its selector's errors (its rows
        are already in the cold-start statistics)."""
        n = sh.f.observations
        err, _ = sh.f.selector_errors()
        acc = self._cold
        acc.n += n
        e = np.where(np.isfinite(err), err, 0.0) * n
        ok = np.isfinite(err) * float(n)
        acc.err_num = e if acc.err_num is None else acc.err_num + e
        acc.err_w = ok if acc.err_w is None else acc.err_w + ok

    # ------------------------------------------------------------------ rounds

    def load_global(self, state: GlobalState) -> bool:
        """Adopt a newer global version (older or other families are ignored)."""
        if state.family != self.family or state.version <= self.base_version:
            return False
        self.global_state = state
        k = self.config.prior_samples
        for ep in self._eps.values():
            f = ep.forecaster
            if isinstance(f, ColdStartForecaster):
                f.update_global(state, k)
            else:
                adopt_global(f, state, k, self.config.round_prior)
            ep.samples = 0
        if self._sent and self.edge_id in state.participants and (
                self._sent_round is not None and state.version >= self._sent_round):
            # Those rows are in the global statistics now; the ones since stay.
            self._stats.subtract(self._sent)
            self._cold_stats.subtract(self._sent)
        self._sent = {}
        self._cold = _ColdAcc()
        self._val = _Validation()
        if self._sent_round is not None and state.version >= self._sent_round:
            self._sent_round = None
        return True

    @property
    def samples(self) -> int:
        return sum(ep.samples for ep in self._eps.values())

    def due(self, now: float) -> bool:
        """Whether an update should be sent now (``now``: monotonic seconds)."""
        if self.samples < self.config.min_samples:
            return False
        if self._sent_round is None:
            return True
        return now - self._sent_at >= self.config.resend_after

    def make_update(self, now: float) -> ModelDelta | None:
        """This round's update (None before any sample); marks the round as sent."""
        rows = [(ep.samples, shared_view(ep.forecaster)) for ep in self._eps.values()
                if ep.samples > 0]
        if not rows:
            return None
        n = sum(k for k, _ in rows)
        # Row sums since the base version; fewer than min_rows rows are held back (sent
        # as zeros with 0 samples, their rows stay for a later round).
        delta = {k: v if v[0, 0, 0] >= self.config.min_rows else np.zeros_like(v)
                 for k, v in {**self._stats.take(), **self._cold_stats.take()}.items()}
        samples = {k: round(float(v[0, 0, 0])) for k, v in delta.items()}
        stats = merge_stats([(k, s) for k, (_, s) in rows if s])
        acc = self._cold
        if acc.n and acc.err_num is not None and acc.err_w is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                stats["cold_errors"] = np.where(acc.err_w > 0, acc.err_num / acc.err_w, np.nan)
        self._sent = {k: v.copy() for k, v in delta.items()}
        v = self._val
        verr = v.abs_err / v.actual if v.actual > 0 else None
        version = self.base_version
        self._sent_round = version + 1
        self._sent_at = now
        self.updates_made += 1
        return ModelDelta(self.edge_id, self.family, version + 1, version, n, delta,
                          samples, stats, verr)

    @property
    def endpoints(self) -> list[str]:
        return sorted(self._eps)

    def forecaster(self, endpoint_id: str) -> Any:
        return self._eps[endpoint_id].forecaster


class FederatedEdge:
    """A :class:`LocalTrainer` on Kafka: reads ``global-model``, writes ``model-updates``."""

    def __init__(self, settings: KafkaSettings, codec: Codec, trainer: LocalTrainer, *,
                 producer: RecordProducer | None = None,
                 repo: ModelRepository | None = None) -> None:
        self.codec = codec
        self.trainer = trainer
        runtime = KafkaRuntime(settings)
        self.topic = runtime.topic("model-updates")
        self.producer = producer or runtime.record_producer(f"fl-{trainer.edge_id}")
        self.repo = repo or ModelRepository(settings, codec, client_id=f"fl-{trainer.edge_id}")
        self.published = 0
        self.loaded: list[int] = []  # global versions adopted, in order

    def observe(self, records: Iterable[Mapping[str, Any]]) -> int:
        return self.trainer.observe(records)

    def poll_global(self, timeout: float = 0.0) -> GlobalState | None:
        """Adopt the latest global version if it is newer; returns it when adopted."""
        self.repo.refresh(timeout)
        latest = self.repo.latest(self.trainer.family)
        if latest is not None and self.trainer.load_global(latest):
            self.loaded.append(latest.version)
            log.info("edge %s loaded global version %d", self.trainer.edge_id, latest.version)
            return latest
        return None

    def tick(self, now: float | None = None, timeout: float = 0.0) -> bool:
        """Load a new global version if there is one, publish an update if one is due;
        returns True when an update was published."""
        self.poll_global(timeout)
        now = time.monotonic() if now is None else now
        if not self.trainer.due(now):
            self.producer.poll(0)
            return False
        return self.publish_update(now)

    def publish_update(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        update = self.trainer.make_update(now)
        if update is None:
            return False
        value = self.codec.encode("ModelUpdate",
                                  update_to_record(update, round(time.time() * 1000)))
        ok = self.producer.produce(self.topic, value, update.family.encode())
        self.producer.poll(0)
        self.published += ok
        return ok

    def close(self, timeout: float = 10.0) -> int:
        left = self.producer.flush(timeout)
        self.repo.close()
        return left


class TrainingPublisher:
    """A telemetry publisher that also hands every published window to the trainer."""

    def __init__(self, inner: TelemetryPublisher, edge: FederatedEdge) -> None:
        self.inner = inner
        self.edge = edge
        self.producer = inner.producer

    def publish(self, records: Iterable[Record]) -> int:
        records = list(records)
        n = self.inner.publish(records)
        self.edge.observe(records)
        return n


class FederatedEdgeAgent(EdgeAgent):
    """An edge agent that trains locally and takes part in federated rounds."""

    def __init__(self, agent: EdgeAgent, edge: FederatedEdge) -> None:
        assert isinstance(agent.publisher, TelemetryPublisher)
        super().__init__(agent.aggregator, TrainingPublisher(agent.publisher, edge))  # type: ignore[arg-type]
        self.federated = edge

    def tick(self, now: float | None = None) -> int:
        n = super().tick(now)
        self.federated.tick()
        return n

    def close(self, timeout: float = 30.0) -> int:
        left = super().close(timeout)
        self.federated.tick()
        return left + self.federated.close(timeout)


def build_federated_agent(
    settings: KafkaSettings,
    codec: Codec,
    *,
    agent_id: str,
    region: str,
    training: EdgeTrainingConfig | None = None,
    batch: bool = False,
    host_stats: HostStats | None = None,
    **aggregator_options: Any,
) -> FederatedEdgeAgent:
    """An edge agent wired to Kafka that also trains locally (the topics must exist)."""
    agent = build_agent(settings, codec, agent_id=agent_id, region=region, batch=batch,
                        host_stats=host_stats, **aggregator_options)
    edge = FederatedEdge(settings, codec, LocalTrainer(agent_id, training))
    return FederatedEdgeAgent(agent, edge)


__all__ = [
    "EdgeTrainingConfig",
    "FederatedEdge",
    "FederatedEdgeAgent",
    "LocalTrainer",
    "TrainingPublisher",
    "build_federated_agent",
]
