"""Settings of federated learning (``federated`` section; ``LOADCAST_FEDERATED__…``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.federated.aggregation import AGGREGATIONS, AggregationConfig
from processors.federated.statistics import DEFAULT_RIDGE


class FederatedSettings(BaseModel):
    """The coordinator (``loadcast coordinator``) and the edges' part in the rounds."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = Field("loadcast-coordinator", min_length=1, description="Faust app / group id")
    aggregation: str = Field("fedavg", description=f"one of {', '.join(AGGREGATIONS)}")
    min_updates: int = Field(3, ge=1, description="edges that close a round")
    round_timeout_seconds: float = Field(
        300.0, gt=0, description="close a round this long after its first update"
    )
    clip_norm: float | None = Field(None, gt=0, description="absolute L2 bound per delta")
    clip_median_multiple: float | None = Field(
        3.0, gt=0, description="adaptive bound: this many times the round's median norm"
    )
    noise_multiplier: float = Field(0.0, ge=0, description="Gaussian noise (needs clip_norm)")
    trim_fraction: float = Field(0.25, ge=0, lt=0.5, description="for trimmed-mean")
    max_staleness: int = Field(2, ge=0, description="older bases are rejected")
    staleness_decay: float = Field(0.5, gt=0, le=1, description="weight x decay**staleness")
    seed: int | None = Field(None, description="noise seed (tests)")
    ridge: float = Field(DEFAULT_RIDGE, ge=0, description="least-squares ridge, in rows")
    stats_decay: float = Field(
        1.0, gt=0, le=1,
        description="statistics kept per round (1 = every row: the central solution; "
        "below 1 the global model forgets older rounds and follows drift)",
    )
    # Edge side.
    min_samples: int = Field(200, ge=1, description="model steps an edge learns per round")
    min_rows: int = Field(
        50, ge=1, description="an edge sends a statistic only once it sums this many rows"
    )
    resend_after_seconds: float = Field(60.0, gt=0, description="re-send without a new version")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve /metrics here (0 = off)")

    @model_validator(mode="after")
    def _valid(self) -> FederatedSettings:
        self.aggregation_config()  # raises ValueError naming the problem
        return self

    def aggregation_config(self) -> AggregationConfig:
        return AggregationConfig(
            method=self.aggregation, clip_norm=self.clip_norm,
            clip_median_multiple=self.clip_median_multiple,
            noise_multiplier=self.noise_multiplier, trim_fraction=self.trim_fraction,
            max_staleness=self.max_staleness, staleness_decay=self.staleness_decay,
            seed=self.seed, ridge=self.ridge, stats_decay=self.stats_decay,
        )
