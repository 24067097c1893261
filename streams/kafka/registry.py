"""The Schema Registry side of the codec: schema ids from a Confluent-compatible registry.

:class:`schemas.codec.Codec` takes its ids from any :class:`schemas.codec.SchemaIds`; the
wire package does no I/O, so the registry client lives here, with the Kafka runtime.
Every process chooses its codec the same way (:func:`codec_for`).

>>> codec_for(None).ids.__class__.__name__
'EmbeddedIds'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.codec import Codec, SchemaVersion
from schemas.files import fingerprint, registry_text


def codec_for(url: str | None, config: Mapping[str, Any] | None = None) -> Codec:
    """The codec a process's settings ask for: a Schema Registry when ``url`` is set,
    else the embedded id table. Every process must choose the same way."""
    return Codec(RegistryIds(url, config)) if url else Codec.embedded()


class RegistryIds:
    """A Confluent-compatible Schema Registry (subject per record name, ``<name>-value``)."""

    def __init__(self, url: str, config: Mapping[str, Any] | None = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient({"url": url, **(config or {})})
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, SchemaVersion | None] = {}

    def id_for(self, name: str, schema: dict[str, Any]) -> int:
        from confluent_kafka.schema_registry import Schema

        key = fingerprint(schema)
        if key not in self._ids:
            text = registry_text(schema)
            self._ids[key] = self._client.register_schema(f"{name}-value", Schema(text, "AVRO"))
        return self._ids[key]

    def schema_for(self, schema_id: int) -> SchemaVersion | None:
        if schema_id not in self._schemas:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                s = self._client.get_schema(schema_id)
            except SchemaRegistryError:
                self._schemas[schema_id] = None
            else:
                raw = json.loads(s.schema_str or "{}")
                name = f"{raw.get('namespace', '')}.{raw.get('name', '')}".lstrip(".")
                self._schemas[schema_id] = SchemaVersion(schema_id, name, raw)
        return self._schemas[schema_id]
