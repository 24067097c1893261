"""Settings of the task API (section ``[tasks]``, ``LOADCAST_TASKS__…``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TASK_TYPES = ["code_generation", "analysis", "research", "echo", "sleep"]


class TaskSettings(BaseModel):
    """The task API (``loadcast tasks``): which task types it accepts, how many attempts a
    task gets, the lease of a running attempt, and the bounds of one request."""

    model_config = ConfigDict(extra="forbid")

    task_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TASK_TYPES),
        description="task types POST /v1/tasks accepts (others: 422 listing these)")
    max_attempts: int = Field(3, ge=1, le=100, description="attempts before a task fails")
    lease_seconds: float = Field(
        10.0, gt=0, le=3600,
        description="a running attempt without a heartbeat for this long is retried")
    keeper_interval_seconds: float = Field(
        0.0, ge=0, le=60, description="lease check period (0 = a quarter of the lease)")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024,
                                description="larger request bodies: 413")
    max_description_chars: int = Field(32_000, ge=1)
    host: str = Field("127.0.0.1", description="bind address of `loadcast tasks`")
    port: int = Field(8480, ge=0, le=65535, description="port of `loadcast tasks` (0 = free)")
    metrics_port: int = Field(0, ge=0, le=65535,
                              description="serve /metrics here (0 = off)")
    forecast_window_seconds: float = Field(
        60.0, gt=0, le=86400, description="arrival rates and throughput are measured over this")
    telemetry_interval_seconds: float = Field(
        5.0, ge=0, le=3600,
        description="publish task arrivals per type as telemetry this often (0 = off)")
    telemetry_region: str = Field("central", min_length=1,
                                  description="region of the task telemetry windows")
    target_utilization: float = Field(0.8, gt=0, le=1,
                                      description="forecast: how busy a worker may be")

    @field_validator("task_types")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one task type")
        bad = [t for t in v if not t or len(t) > 64 or not t.replace("_", "").replace(
            "-", "").isalnum()]
        if bad:
            raise ValueError(f"task types must be 1-64 letters, digits, _ or -: {bad}")
        return v
