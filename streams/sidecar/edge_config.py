"""Settings of what the built-in proxy serves itself (``sidecar.cache``,
``sidecar.compression``, ``sidecar.rate_limit``, ``sidecar.warming``). All off by default.

>>> EdgeCacheSettings().enabled, RateLimitSettings().enabled
(False, False)
>>> RateLimitSettings(enabled=True, per_client_share=0.1).per_client_share
0.1
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from streams.sidecar.compression import CODINGS, DEFAULT_TYPES


class EdgeCacheSettings(BaseModel):
    """The RFC 9111 response cache (stores only what the origin marked cacheable)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="cache GET responses the origin marks cacheable")
    apis: list[str] = Field(default_factory=list, description="APIs cached (empty: all)")
    max_bytes: int = Field(64 << 20, ge=1024, description="memory bound per API (bytes)")
    max_object_bytes: int = Field(1 << 20, ge=1, description="largest body stored (bytes)")
    x_cache_header: bool = Field(True, description="answer X-Cache: HIT|MISS|STALE|BYPASS")


class CompressionSettings(BaseModel):
    """Compression of responses by the client's Accept-Encoding (q-values)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="compress responses (also: compress_responses)")
    algorithms: list[str] = Field(list(CODINGS), description="server preference order")
    min_bytes: int = Field(1024, ge=0, description="smaller bodies go as they are")
    types: list[str] = Field(list(DEFAULT_TYPES), description="compressible Content-Type prefixes")

    @field_validator("algorithms")
    @classmethod
    def _algos(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in CODINGS]
        if bad:
            raise ValueError(f"unknown coding(s) {bad}; known: {list(CODINGS)}")
        return v


class RateLimitSettings(BaseModel):
    """Adaptive per-client token buckets (streams.sidecar.ratelimit). They act only with a
    configured ``base_rps`` or, with ``per_client_share``, an API capacity that is
    CONFIGURED or confidently LEARNED; never on a guessed one."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    client_header: str = Field(
        "", description="header naming the client (e.g. X-API-Key); empty or absent: address")
    base_rps: float | None = Field(None, gt=0, description="per-client rate while there is room")
    per_client_share: float | None = Field(
        None, gt=0, le=1, description="per-client rate as a share of the API's known capacity")
    burst_s: float = Field(1.0, gt=0, le=60, description="bucket size in seconds of rate")
    headroom_threshold: float = Field(
        0.2, gt=0, lt=1, description="tighten heavy clients when forecast headroom falls below")
    min_factor: float = Field(0.25, gt=0, le=1, description="tightest factor of the base rate")
    heavy_share: float = Field(2.0, ge=1, description="heavy: this x the mean client's rate")
    anomaly_factor: float = Field(5.0, gt=1, description="anomalous: this x its own history")
    max_clients: int = Field(10_000, ge=1, le=10_000_000, description="buckets kept per API")


class WarmingSettings(BaseModel):
    """Forecast-gated cache warming of keys already seen (needs the cache)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    threshold: float = Field(
        0.8, gt=0, description="warm when forecast demand / capacity reaches this")
    top_k: int = Field(50, ge=1, le=10_000, description="most requested keys refreshed per API")
    budget_per_min: float = Field(120.0, gt=0, description="origin requests per minute per API")
    lead_s: float = Field(60.0, gt=0, description="refresh keys that expire within this")
    interval_s: float = Field(1.0, gt=0, le=60, description="how often the gate is checked")
