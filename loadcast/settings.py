"""Settings of every loadcast process: environment variables and an optional TOML file.

Precedence: explicit arguments > environment (``LOADCAST_<SECTION>__<FIELD>``) > the
settings file (``--config PATH`` or ``LOADCAST_CONFIG``) > defaults. A bad value stops
start-up with a message that names the field, e.g. ``kafka.partitions: Input should be
greater than or equal to 1``.

Every section, field, variable and default: ``loadcast settings`` (from :func:`catalog`).
The sections are defined next to the part they configure: ``kafka``
(:mod:`streams.kafka.settings`), ``agent`` (here), ``processor``
(:mod:`processors.apps.settings`), ``sidecar`` (:mod:`streams.sidecar.config`), ``sink``
(:mod:`sinks.settings`), ``federated`` (:mod:`processors.apps.federated_settings`),
``mirror`` (:mod:`processors.apps.mirror_settings`), ``tasks``
(:mod:`streams.tasks.settings`), ``swarm`` (:mod:`streams.swarm.settings`).

Example file::

    [kafka]
    bootstrap_servers = "kafka-1:9092,kafka-2:9092"
    security_protocol = "SASL_SSL"

    [agent]
    region = "eu-west"
    interval_seconds = 5
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from processors.apps.federated_settings import FederatedSettings
from processors.apps.mirror_settings import MirrorSettings
from processors.apps.settings import ProcessorSettings
from sinks.settings import SinkSettings
from streams.api.config import ApiSettings
from streams.kafka.settings import KafkaSettings
from streams.sidecar.config import SidecarSettings
from streams.swarm.settings import SwarmSettings
from streams.tasks.settings import TaskSettings


class AgentSettings(BaseModel):
    """The edge agent (``loadcast agent``)."""

    model_config = ConfigDict(extra="forbid")

    region: str = Field("central", min_length=1)
    agent_id: str | None = Field(None, description="default: <region>-<hostname>")
    api: str = Field("default", min_length=1, description="API of endpoints not configured")
    interval_seconds: float = Field(5.0, gt=0, le=3600, description="monitoringInterval")
    endpoint_intervals: dict[str, float] = Field(
        default_factory=dict, description="per-endpoint monitoring interval, seconds"
    )
    batch: bool = Field(True, description="publish TelemetryBatch values (one per partition)")
    k_anonymity: int = Field(5, ge=1, description="suppress client counts below k")
    client_hash_key: SecretStr = Field(
        SecretStr(""), description="HMAC key for client hashing (default: random per start)"
    )
    max_buffered: int = Field(100_000, ge=1, description="producer buffer bound, records")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve /metrics here (0 = off)")
    federated: bool = Field(
        False,
        description="also train the forecaster on this edge's telemetry and send model "
        "updates (never telemetry) to the federated rounds ([federated] section)",
    )


class SettingsError(ValueError):
    """Settings that do not validate; the message names every bad field."""


class Settings(BaseSettings):
    """Root settings; one section per component."""

    model_config = SettingsConfigDict(
        env_prefix="LOADCAST_", env_nested_delimiter="__", extra="forbid"
    )
    config_file: ClassVar[Path | None] = None

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    processor: ProcessorSettings = Field(default_factory=ProcessorSettings)
    sidecar: SidecarSettings = Field(default_factory=SidecarSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    federated: FederatedSettings = Field(default_factory=FederatedSettings)
    mirror: MirrorSettings = Field(default_factory=MirrorSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    tasks: TaskSettings = Field(default_factory=TaskSettings)
    swarm: SwarmSettings = Field(default_factory=SwarmSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings from env and the file (``config`` or ``$LOADCAST_CONFIG``).

    Raises :class:`SettingsError` naming each bad field.
    """
    path = config or os.environ.get("LOADCAST_CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"settings file {path} does not exist")
    Settings.config_file = Path(path) if path else None
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}: {err['msg']}")
        raise SettingsError("bad settings: " + "; ".join(problems)) from None
    except ValueError as e:  # TOML syntax errors
        raise SettingsError(f"bad settings file {path}: {e}") from None
    finally:
        Settings.config_file = None


@dataclass(frozen=True)
class SettingInfo:
    """One setting: ``section.field``, its variable, default, value in force, meaning."""

    section: str
    field: str
    env: str
    default: str
    value: str
    description: str
    defined_in: str  # the section's class, module-qualified

    @property
    def name(self) -> str:
        return f"{self.section}.{self.field}"


_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]*@")


def _shown(value: Any) -> str:
    """A value as one would write it in a variable: JSON for structures; secrets, and
    passwords in URLs, masked.

    >>> _shown(None), _shown(True), _shown(2.5), _shown({"a": [1]}), _shown(SecretStr("k"))
    ('', 'true', '2.5', '{"a": [1]}', '**********')
    >>> _shown("https://user:pw@ch.example:8443/?secure=1")
    'https://user:****@ch.example:8443/?secure=1'
    """
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        text = json.dumps(value.model_dump(mode="json"))
    elif value is None:
        text = ""
    elif isinstance(value, bool | dict | list | tuple):
        text = json.dumps(value, default=_jsonable)
    else:
        text = str(value)
    return _URL_PASSWORD.sub(r"\1****@", text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def catalog(settings: Settings | None = None) -> list[SettingInfo]:
    """Every setting of every section, in :class:`Settings` order, with the value in force
    in ``settings`` (default: the defaults).

    >>> rows = catalog()
    >>> r = next(r for r in rows if r.name == "kafka.partitions")
    >>> r.env, r.default, r.defined_in
    ('LOADCAST_KAFKA__PARTITIONS', '6', 'streams.kafka.settings.KafkaSettings')
    """
    settings = settings if settings is not None else Settings.model_construct(
        **{k: f.get_default(call_default_factory=True) for k, f in Settings.model_fields.items()})
    rows = []
    for section, sfield in Settings.model_fields.items():
        cls = sfield.annotation
        assert isinstance(cls, type) and issubclass(cls, BaseModel)
        current = getattr(settings, section)
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            rows.append(SettingInfo(
                section, name, f"LOADCAST_{section.upper()}__{name.upper()}", _shown(default),
                _shown(getattr(current, name)), field.description or "",
                f"{cls.__module__}.{cls.__qualname__}"))
    return rows
