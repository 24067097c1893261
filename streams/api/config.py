"""Settings of ``loadcast api`` (section ``[api]``, ``LOADCAST_API__*``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ApiSettings(BaseModel):
    """Where the API listens, how far back it reads, and what one request may cost."""

    model_config = ConfigDict(extra="forbid")

    listen_host: str = Field("127.0.0.1", description="bind address of the HTTP API")
    port: int = Field(8090, ge=0, le=65535, description="HTTP port (0 = a free one)")
    score_lookback_s: float = Field(
        900.0, ge=0, description="read load-scores and anomalies this far back at start")
    mirror_lookback_s: float = Field(
        86_400.0, ge=0, description="read mirror-status this far back at start")
    history_points: int = Field(
        720, ge=1, le=100_000, description="scores kept per endpoint for charts")
    max_endpoints: int = Field(
        100_000, ge=1, description="endpoints kept at most (more are counted and ignored)")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body, bytes (413 above)")
    async_max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="largest body of POST /v1/predict/async, bytes (413 above)")
    max_jobs: int = Field(
        100, ge=1, le=100_000, description="async jobs kept at most (finished ones expire)")
    job_ttl_s: float = Field(
        3600.0, gt=0, description="a finished async job's results are kept this long")
    job_max_result_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024,
        description="encoded job results kept at most, all jobs together (a job that would "
                    "go over fails)")
    job_max_seconds: float = Field(
        600.0, gt=0, description="an async job running longer than this fails")

    keda_enabled: bool = Field(
        True, description="serve KEDA's External Scaler gRPC protocol (streams/api/scaler.py)")
    keda_port: int | None = Field(
        None, ge=0, le=65535,
        description="gRPC port of the KEDA scaler (0 = a free one; default: port + 1, or a "
                    "free one when port is 0)")
    keda_max_rpcs: int = Field(
        256, ge=1, le=100_000,
        description="KEDA scaler calls and open StreamIsActive streams at once (more are "
                    "refused: RESOURCE_EXHAUSTED)")

    placement_max_sources: int = Field(
        1000, ge=1, le=100_000, description="sources in one placement request (413 above)")
    placement_max_targets: int = Field(
        1000, ge=1, le=100_000, description="targets in one placement request (413 above)")
    placement_max_pairs: int = Field(
        1_000_000, ge=1, description="sources x targets in one placement request (413 above)")
    placement_milp_max_pairs: int = Field(
        10_000, ge=1, description="sources x targets when demands are indivisible and "
        "unequal (a MILP; 413 above)")
    placement_time_limit_s: float = Field(
        10.0, gt=0, le=300, description="time limit of one MILP placement solve")
    scenario_max_changes: int = Field(
        100, ge=1, le=10_000, description="changes in one scenario (413 above)")
    scenario_max_endpoints: int = Field(
        2000, ge=1, description="endpoints one scenario evaluates (413 above: name an api)")

    @model_validator(mode="after")
    def _ports_differ(self) -> ApiSettings:
        if self.keda_enabled and self.port != 0 and self.resolved_keda_port() == self.port:
            raise ValueError(f"keda_port: {self.port} is the HTTP port too (api.port)")
        return self

    def resolved_keda_port(self) -> int:
        """The gRPC port to bind: ``keda_port``, else the HTTP port + 1 (8091 by default),
        else (HTTP port 0) a free one.

        >>> ApiSettings().resolved_keda_port(), ApiSettings(port=0).resolved_keda_port()
        (8091, 0)
        """
        if self.keda_port is not None:
            return self.keda_port
        return 0 if self.port in (0, 65535) else self.port + 1
