"""Settings of the forecasting processor (``processor`` section; ``LOADCAST_PROCESSOR__…``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from processors.endpoint import ProcessorConfig
from processors.forecasting import KINDS
from processors.forecasting.global_trees import SharedTrees


class ProcessorSettings(BaseModel):
    """The Faust worker (``loadcast worker``) and the per-endpoint logic it runs."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = Field("loadcast-processor", min_length=1, description="Faust app / group id")
    forecaster: str = Field("default", description=f"one of {', '.join(KINDS)}")
    step_seconds: int = Field(60, ge=1, le=86_400, description="model step: one learn per step")
    season_seconds: int = Field(86_400, ge=2, description="main seasonality")
    horizon: int = Field(15, ge=1, le=288, description="forecast steps in each LoadScore")
    lateness_seconds: float = Field(10.0, ge=0, description="wait for late windows of a step")
    default_capacity_rps: float = Field(100.0, gt=0, description="until a knee is learned")
    capacity_rps: dict[str, float] = Field(
        default_factory=dict, description="configured capacity per endpoint_id"
    )
    min_change: float = Field(0.02, ge=0, le=1, description="publish a score that moved this much")
    score_validity_seconds: float | None = Field(
        None, gt=0, description="LoadScore lifetime (default: 2 model steps)"
    )
    anomaly_detector: Literal["robust-z", "hst"] = Field(
        "robust-z", description="robust-z (largest robust z-score) or hst (HalfSpaceTrees)"
    )
    anomaly_threshold: float = Field(0.8, gt=0, le=1)
    anomaly_warmup: int = Field(200, ge=0, description="windows learned before flagging")
    # Like Kafka Streams' 30-s commit interval: a crash replays at most ~30 s of
    # telemetry, and snapshot traffic (~200 KB per endpoint) stays a third of 10 s's.
    snapshot_every_seconds: float = Field(
        30.0, gt=0, description="how often dirty endpoint models are snapshotted"
    )
    warm_start: bool = Field(
        False, description="start new endpoints from the latest federated global model"
    )
    global_trees: bool = Field(
        True, description="the default forecaster's global trees: one trainer per worker "
        "pools its endpoints' rows, refits off the event loop, shares the trees")
    global_trees_refit_seconds: float = Field(
        7 * 86400.0, gt=0, description="refit the global trees this often (data time)")
    global_trees_min_rows: int = Field(
        1000, ge=1, description="pooled rows before the first refit")
    global_trees_max_rows: int = Field(
        60_000, ge=1, description="the trees are fitted on the newest rows, at most this many")
    global_trees_rounds: int = Field(200, ge=1, description="boosting rounds of a refit")
    global_trees_keep_every: int = Field(
        0, ge=0, description="pool one learning batch in this many (0: thinned by the "
        "number of endpoints so the pool spans about a week)")
    max_window_seconds: float = Field(
        3600.0, gt=0, description="longer telemetry windows are dead-lettered (bad_window)")
    clock_skew_seconds: float = Field(
        60.0, ge=0, description="windows ending / scores computed further ahead are refused")
    max_steps_per_record: int = Field(
        1440, ge=1, description="model steps one window may touch (bounds work per record)")
    max_endpoints: int = Field(
        5000, ge=1, description="endpoint models per worker; over it: dead-letter endpoint_cap")
    max_endpoints_per_api: int = Field(2000, ge=1, description="endpoint models per api")
    endpoint_idle_seconds: float = Field(
        900.0, gt=0, description="a model idle this long is evicted to make room")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve /metrics here (0 = off)")
    uvloop: bool = Field(True, description="run Faust on uvloop when installed")

    @field_validator("forecaster")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"must be one of {', '.join(KINDS)}")
        return kind

    def shared_trees(self) -> SharedTrees | None:
        """The worker's global trees as set (None: not run; only the default forecaster
        has them)."""
        if not self.global_trees or self.forecaster != "default":
            return None
        return SharedTrees(refit_seconds=self.global_trees_refit_seconds,
                           min_rows=self.global_trees_min_rows,
                           max_rows=self.global_trees_max_rows,
                           rounds=self.global_trees_rounds,
                           keep_every=self.global_trees_keep_every)

    def config(self) -> ProcessorConfig:
        """The per-endpoint logic's part of the settings."""
        return ProcessorConfig(
            forecaster=self.forecaster,
            step_seconds=self.step_seconds,
            season_seconds=self.season_seconds,
            horizon=self.horizon,
            lateness_seconds=self.lateness_seconds,
            default_capacity_rps=self.default_capacity_rps,
            capacity_rps=dict(self.capacity_rps),
            min_change=self.min_change,
            score_validity_seconds=self.score_validity_seconds,
            anomaly_threshold=self.anomaly_threshold,
            anomaly_warmup=self.anomaly_warmup,
            anomaly_detector=self.anomaly_detector,
            max_window_seconds=self.max_window_seconds,
            clock_skew_seconds=self.clock_skew_seconds,
            max_steps_per_record=self.max_steps_per_record,
            max_endpoints=self.max_endpoints,
            max_endpoints_per_api=self.max_endpoints_per_api,
            endpoint_idle_seconds=self.endpoint_idle_seconds,
        )
