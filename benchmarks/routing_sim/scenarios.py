"""The two scenarios: Linkerd's "Beyond Round Robin" calibration, and the main one.

**Calibration** (linkerd.io, 2016-03-16, and the Finagle ``Simulation.scala`` it links to):
11 backends whose latency has a median of 167 ms and a standard deviation of 5 ms and no
queueing (each request just takes its time, as Finagle's ``Future.sleep`` backends do); one
client at 1,000 requests per second, one per millisecond; a one-minute run; 15 s in, one
backend's latency is fixed to 2 s for 30 s. Success is judged the way the post does: from
the latency distribution, a request is a success when it took at most 1 s (the caller's
timeout); nothing is cancelled. Published: about 95 % (round robin), 99 % (least loaded),
99.9 % (peak EWMA).

**Main**: 8 heterogeneous backends (worker slots 12, 12, 10, 8, 8, 6, 6, 4; log-normal
service time, median 100 ms, sigma 0.4; a queue of 4 x slots; a 1 s client deadline),
a seasonal load over one compressed day of 600 s (25 % -> 45 % -> 25 % of total capacity,
after three earlier days of history), a sudden x2 spike for 60 s at 200 s (to ~80 % of
capacity), and the 10-slot backend degrading x4 for two minutes from 360 s. ``--trace``
replaces the seasonal shape with a replayed series (same mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.routing_sim.backends import BackendSpec, ServiceTime, Slowdown
from benchmarks.routing_sim.control import (
    OracleControl,
    PredictiveConfig,
    PredictiveControl,
    SmoothWeighted,
    StaticWeightsControl,
)
from benchmarks.routing_sim.engine import Control, SimConfig, Simulation
from benchmarks.routing_sim.loadshape import LoadShape, Spike
from benchmarks.routing_sim.metrics import Phase

LINKERD_PUBLISHED = {"round-robin": 95.0, "least-request": 99.0, "peak-ewma": 99.9}
CALIBRATION_POLICIES = ("round-robin", "least-request", "peak-ewma")
MAIN_POLICIES = ("round-robin", "static-weighted", "least-request", "peak-ewma", "prequal",
                 "predictive", "predictive-persistence", "predictive-capw", "oracle")
#: rows that are not the project's behaviour but an experiment (see the report)
VARIANTS = ("predictive-capw",)
#: the ablation: the whole predictive pipeline with the forecaster replaced by persistence
ABLATION = "predictive-persistence"


def calibration_config(seed: int, slow_factor: float | None = None) -> SimConfig:
    """Linkerd's setup. ``slow_factor``: slow the backend by that factor instead of fixing
    it to 2 s (what the linked Finagle code's ``slowmiddle`` does, x10)."""
    svc = ServiceTime("normal", 0.167, 0.005)
    backends = [BackendSpec(f"s{i}", None, svc) for i in range(11)]
    slow = (Slowdown(10, 15.0, 45.0, fixed_s=2.0) if slow_factor is None
            else Slowdown(10, 15.0, 45.0, factor=slow_factor))
    return SimConfig(backends, LoadShape.constant(1000.0, 60.0, bin_s=1.0), [slow],
                     arrivals="uniform", deadline_s=1.0, seed=seed)


@dataclass
class ScaledScenario:
    """What the simulated scenarios share; ``scale`` < 1 shrinks every time in one
    (``--quick``)."""

    scale: float = 1.0
    trace: Path | None = None
    median_s: float = 0.1
    sigma: float = 0.4
    queue_per_slot: int = 4
    deadline_s: float = 1.0
    history_seasons: int = 3
    slo_ms: float = 500.0
    interval_s: float = 5.0
    step_s: int = 10
    horizon: int = 6
    extra: dict[str, Any] = field(default_factory=dict)

    def t(self, seconds: float) -> float:
        return seconds * self.scale


@dataclass
class MainScenario(ScaledScenario):
    """The main scenario."""

    slots: tuple[int, ...] = (12, 12, 10, 8, 8, 6, 6, 4)
    mean_util: float = 0.35
    amplitude: float = 0.10 / 0.35
    spike_factor: float = 2.0
    degrade_backend: int = 2
    degrade_factor: float = 4.0
    telemetry_lag_s: float = 0.5
    score_lag_s: float = 0.5
    actuation_s: float = 0.05

    @property
    def duration_s(self) -> float:
        return self.t(600.0)

    @property
    def spike(self) -> tuple[float, float]:
        return self.t(200.0), self.t(260.0)

    @property
    def degradation(self) -> tuple[float, float]:
        return self.t(360.0), self.t(480.0)

    def backends(self) -> list[BackendSpec]:
        svc = ServiceTime("lognormal", self.median_s, self.sigma)
        return [BackendSpec(f"b{i}", s, svc, self.queue_per_slot * s)
                for i, s in enumerate(self.slots)]

    def capacities(self) -> dict[str, float]:
        return {b.id: b.capacity_rps for b in self.backends()}

    def load(self) -> LoadShape:
        total = sum(self.capacities().values())
        mean = self.mean_util * total
        if self.trace is not None:
            base = LoadShape.from_trace(self.trace, mean, self.duration_s, self.history_seasons)
        else:
            base = LoadShape.seasonal(mean, self.amplitude, self.duration_s, self.history_seasons)
        return base.with_spikes([Spike(*self.spike, self.spike_factor)])

    def phases(self) -> list[Phase]:
        s0, s1 = self.spike
        d0, d1 = self.degradation
        tail = self.t(20.0)
        warm = self.t(10.0)
        return [
            Phase("steady", ((warm, s0), (s1 + tail, d0), (d1 + tail, self.duration_s))),
            Phase("spike", ((s0, s1 + tail),), onset=s0, event_end=s1),
            Phase("degraded", ((d0, d1 + tail),), onset=d0, event_end=d1,
                  affected=self.degrade_backend),
        ]

    def predictive_config(self, capacity_weighted: bool = False,
                          forecaster: str = "default") -> PredictiveConfig:
        z = (0.0, 1.645, 2.326)  # nominal p50/p95/p99 of the log-normal, for the history
        return PredictiveConfig(
            interval_s=self.interval_s, step_s=self.step_s, horizon=self.horizon,
            lateness_s=self.interval_s, season_s=max(1, round(self.duration_s)),
            telemetry_lag_s=self.telemetry_lag_s, score_lag_s=self.score_lag_s,
            actuation_s=self.actuation_s, capacities=self.capacities(),
            service_p=tuple(self.median_s * math.exp(self.sigma * q) for q in z),  # type: ignore[arg-type]
            capacity_weighted=capacity_weighted, forecaster=forecaster,
        )

    def config(self, seed: int, load: LoadShape | None = None) -> SimConfig:
        d0, d1 = self.degradation
        return SimConfig(
            self.backends(), load or self.load(),
            [Slowdown(self.degrade_backend, d0, d1, factor=self.degrade_factor)],
            arrivals="poisson", deadline_s=self.deadline_s, seed=seed,
            interval_s=self.interval_s,
        )

    def describe(self) -> dict[str, Any]:
        caps = self.capacities()
        return {
            "duration_s": self.duration_s, "backends": len(self.slots), "slots": list(self.slots),
            "capacity_rps": {k: round(v, 2) for k, v in caps.items()},
            "total_capacity_rps": round(sum(caps.values()), 1),
            "service": {"kind": "lognormal", "median_ms": self.median_s * 1000,
                        "sigma": self.sigma},
            "queue_limit_per_slot": self.queue_per_slot, "deadline_s": self.deadline_s,
            "load": {"source": "trace:" + self.trace.name if self.trace else "seasonal",
                     "mean_utilization": self.mean_util,
                     "range_utilization": [self.mean_util * (1 - self.amplitude),
                                           self.mean_util * (1 + self.amplitude)],
                     "history_seasons": self.history_seasons},
            "spike": {"start_s": self.spike[0], "end_s": self.spike[1],
                      "factor": self.spike_factor},
            "degradation": {"backend": f"b{self.degrade_backend}",
                            "start_s": self.degradation[0], "end_s": self.degradation[1],
                            "factor": self.degrade_factor},
            "telemetry_interval_s": self.interval_s, "telemetry_lag_s": self.telemetry_lag_s,
            "score_lag_s": self.score_lag_s, "actuation_delay_s": self.actuation_s,
            "model_step_s": self.step_s, "horizon_steps": self.horizon,
            "recover_slo_ms": self.slo_ms,
        }


def build(policy: str, cfg: SimConfig, scenario: MainScenario | None,
          load: LoadShape | None = None) -> tuple[Simulation, Control | None]:
    """A simulation of ``policy`` (one of MAIN_POLICIES) on ``cfg``."""
    control: Control | None = None
    obj: Any = None
    router_policy = policy
    if policy == "static-weighted":
        assert scenario is not None
        obj, control, router_policy = SmoothWeighted(), StaticWeightsControl(
            scenario.capacities()), "round-robin"
    elif policy == "oracle":
        control, router_policy = OracleControl(), "predictive"
    elif policy in ("predictive", "predictive-capw", ABLATION):
        assert scenario is not None and load is not None
        control = PredictiveControl(
            scenario.predictive_config(policy == "predictive-capw",
                                       "persistence" if policy == ABLATION else "default"),
            load.history)
        router_policy = "predictive"
    elif policy not in ("round-robin", "least-request", "peak-ewma", "prequal"):
        raise ValueError(f"unknown policy {policy!r}")
    return Simulation(cfg, router_policy, control, obj), control
