"""Settings of the ClickHouse sink and of ``loadcast query`` (section ``[sink]``).

Environment: ``LOADCAST_SINK__DSN=clickhouse://ch-1:8123``, ``LOADCAST_SINK__PASSWORD=…``,
``LOADCAST_SINK__ADMIN_TOKEN=…``. The default DSN is embedded chDB on disk under
``.loadcast/clickhouse`` (relative to the working directory).

>>> SinkSettings().dsn
'chdb://.loadcast/clickhouse'
>>> SinkSettings(dsn="mysql://x")
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for SinkSettings
dsn
  Value error, dsn must start with chdb://, clickhouse://, http:// or https://, not 'mysql://x' ...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

DSN_SCHEMES = ("chdb://", "clickhouse://", "clickhouses://", "http://", "https://")


class SinkSettings(BaseModel):
    """Where ClickHouse is, how the sink batches, and its admin endpoint."""

    model_config = ConfigDict(extra="forbid")

    dsn: str = Field(
        "chdb://.loadcast/clickhouse",
        description="chdb://PATH (embedded, on disk), or clickhouse:// / http(s):// of a server",
    )
    user: str | None = Field(None, description="server user (ignored by chDB)")
    password: SecretStr | None = Field(None, description="server password (ignored by chDB)")
    database: str = Field("loadcast", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    group_id: str = Field("loadcast-sink", min_length=1, description="Kafka consumer group")
    topics: list[str] = Field(
        default_factory=lambda: [
            "telemetry", "load-scores", "mirror-commands", "mirror-status",
            "routing-decisions", "model-updates", "global-model", "anomalies", "dead-letter",
            "tasks", "task-status", "task-results",
        ],
        min_length=1,
        description="short topic names the sink consumes",
    )
    batch_max_records: int = Field(50_000, ge=1, le=5_000_000, description="rows per insert")
    batch_max_seconds: float = Field(1.0, gt=0, le=600, description="max wait before an insert")
    decode_in_clickhouse: bool = Field(
        True,
        description="let ClickHouse decode telemetry values (much faster); records it "
        "refuses are decoded in Python and dead-lettered one by one",
    )
    ttl_days: int = Field(90, ge=0, le=36_500, description="keep rows this long (0 = forever)")
    backoff_initial_seconds: float = Field(0.5, gt=0, le=60)
    backoff_max_seconds: float = Field(30.0, gt=0, le=3600)
    connect_timeout_seconds: float = Field(5.0, gt=0, le=300)
    admin_host: str = Field("127.0.0.1", description="admin HTTP bind address (loopback)")
    admin_port: int = Field(8125, ge=0, le=65535, description="admin HTTP port (0 = a free one)")
    admin_token: SecretStr = Field(
        SecretStr(""),
        description="bearer token for the admin endpoint; empty = the sink makes one and "
        "writes it to a 0600 file next to the chDB directory",
    )
    admin_enabled: bool = Field(True, description="serve queries over HTTP while running")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve /metrics here (0 = off)")

    @field_validator("dsn")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(DSN_SCHEMES):
            raise ValueError(
                f"dsn must start with chdb://, clickhouse://, http:// or https://, not {v!r} "
                "(e.g. chdb://.loadcast/clickhouse or http://127.0.0.1:8123)"
            )
        if v.startswith("chdb://") and not v[len("chdb://"):]:
            raise ValueError("a chdb:// dsn needs a directory, e.g. chdb://.loadcast/clickhouse")
        return v

    @field_validator("topics")
    @classmethod
    def _known_topics(cls, v: list[str]) -> list[str]:
        # Kept in step with streams.kafka.topics.CATALOG (sinks must not import the root package,
        # and a settings model should not need Kafka client imports).
        known = {
            "telemetry", "load-scores", "mirror-commands", "mirror-status", "routing-decisions",
            "model-updates", "global-model", "anomalies", "dead-letter", "tasks", "task-status",
            "task-results",
        }
        bad = [t for t in v if t not in known]
        if bad:
            raise ValueError(f"unknown topics {bad}; known: {sorted(known)}")
        return v
