"""Settings of ``loadcast api`` (section ``[api]``, ``LOADCAST_API__*``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
