"""Settings of predictive mirroring (section ``[mirror]``, ``LOADCAST_MIRROR__…``).

Validated with pydantic; :meth:`MirrorSettings.planner_config` turns them into the pure
planner's :class:`~processors.mirroring.PlannerConfig`, :meth:`MirrorSettings.signer` /
:meth:`MirrorSettings.verifier` into the keys of :mod:`processors.signing`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from processors.mirroring import BundleSpec, PlannerConfig
from processors.signing import (
    KeyFormatError,
    Signer,
    Verifier,
    load_private_key,
    load_public_key,
    public_key_of,
)


class MirrorBundle(BaseModel):
    """``[mirror.bundles.<api>]``: the bundle that mirrors an API."""

    model_config = ConfigDict(extra="forbid")

    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="from `bundle push`")
    instance_capacity_rps: float | None = Field(None, gt=0, description="one instance")
    min_instances: int = Field(1, ge=1, le=1000)
    max_instances: int = Field(1, ge=1, le=1000)

    @model_validator(mode="after")
    def _range(self) -> MirrorBundle:
        if self.max_instances < self.min_instances:
            raise ValueError("max_instances must be >= min_instances")
        return self


class MirrorSettings(BaseModel):
    """Predictive mirroring (section ``[mirror]``, ``LOADCAST_MIRROR__…``): keys, the
    bundle store, the planner (``loadcast planner``) and the executor
    (``loadcast executor``)."""

    model_config = ConfigDict(extra="forbid")

    # signing
    key_id: str = Field("default", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    signing_key: SecretStr = Field(
        SecretStr(""), description="planner: base64 Ed25519 private key (`mirror keygen`)")
    trusted_keys: dict[str, str] = Field(
        default_factory=dict,
        description="executor: key_id -> base64 public key (default: signing_key's)")
    # bundle store
    store_dir: Path = Field(Path(".loadcast/bundles"), description="`bundle push` target")
    store_url: str = Field("http://127.0.0.1:8470", pattern=r"^https?://[^\s/]+(:\d+)?/?$",
                           description="where executors fetch bundles")
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8470, ge=0, le=65535, description="`bundle serve` port")
    # planner
    planner_app_id: str = Field("loadcast-planner", min_length=1)
    bundles: dict[str, MirrorBundle] = Field(default_factory=dict, description="per API")
    central_region: str = Field("central", min_length=1)
    central_capacity_rps: dict[str, float] = Field(
        default_factory=dict, description="per API (default: sum of the scores' capacity)")
    activation_seconds: float = Field(30.0, gt=0, description="until measured")
    margin_seconds: float = Field(10.0, ge=0)
    cooldown_seconds: float = Field(300.0, ge=0)
    activate_ratio: float = Field(1.0, gt=0)
    retire_ratio: float = Field(0.8, gt=0)
    command_ttl_seconds: float = Field(120.0, gt=0)
    tick_seconds: float = Field(1.0, gt=0, le=60)
    planner_metrics_port: int = Field(0, ge=0, le=65535)
    # executor
    region: str | None = Field(None, description="executor region (default: agent.region)")
    executor_id: str | None = Field(None, description="default: executor-<region>-<host>")
    work_dir: Path = Field(Path(".loadcast/executor"), description="bundles, state, logs")
    drain_seconds: float = Field(5.0, ge=0, le=3600)
    max_bundle_bytes: int = Field(256 << 20, ge=1024)
    command_lookback_seconds: float = Field(
        600.0, ge=0, description="first start: read commands this far back")
    stop_instances_on_exit: bool = Field(
        False, description="stop API processes when the executor exits (else keep them "
        "running; a restarted executor adopts them)")
    executor_metrics_port: int = Field(0, ge=0, le=65535)

    @field_validator("signing_key")
    @classmethod
    def _private(cls, v: SecretStr) -> SecretStr:
        if v.get_secret_value():
            try:
                load_private_key(v.get_secret_value())
            except KeyFormatError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _public(cls, v: dict[str, str]) -> dict[str, str]:
        for k, key in v.items():
            try:
                load_public_key(key)
            except KeyFormatError as e:
                raise ValueError(f"{k}: {e}") from None
        return v

    @model_validator(mode="after")
    def _ratios(self) -> MirrorSettings:
        if self.retire_ratio > self.activate_ratio:
            raise ValueError("retire_ratio must be <= activate_ratio (hysteresis)")
        return self

    def signer(self) -> Signer:
        """The planner's signer; ValueError when no signing key is set."""
        key = self.signing_key.get_secret_value()
        if not key:
            raise ValueError("mirror.signing_key is not set: create one with "
                             "`loadcast mirror keygen`")
        return Signer(self.key_id, key)

    def verifier(self) -> Verifier:
        """The executor's verifier: ``trusted_keys``, or the signing key's public half."""
        keys = dict(self.trusted_keys)
        if not keys and self.signing_key.get_secret_value():
            keys[self.key_id] = public_key_of(self.signing_key.get_secret_value())
        if not keys:
            raise ValueError("mirror.trusted_keys is empty: an executor must trust a key")
        return Verifier(keys)

    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(
            bundles={api: BundleSpec(b.digest, b.instance_capacity_rps, b.min_instances,
                                     b.max_instances) for api, b in self.bundles.items()},
            central_capacity_rps=dict(self.central_capacity_rps),
            central_region=self.central_region,
            activation_seconds=self.activation_seconds,
            margin_seconds=self.margin_seconds,
            cooldown_seconds=self.cooldown_seconds,
            activate_ratio=self.activate_ratio,
            retire_ratio=self.retire_ratio,
            command_ttl_seconds=self.command_ttl_seconds,
        )
