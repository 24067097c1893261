"""The ``.avsc`` files of ``schemas/``: loading, expanding named references, the text a
registry gets, fingerprints, and the plain (epoch-ms) form the codec writes with."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

__all__ = [
    "NAMESPACE",
    "SCHEMA_DIR",
    "current_schema_files",
    "expand",
    "fingerprint",
    "load_schema_file",
    "named_schemas",
    "plain",
    "registry_text",
]

SCHEMA_DIR = Path(__file__).resolve().parent
NAMESPACE = "loadcast"


def load_schema_file(path: Path) -> dict[str, Any]:
    """Read one ``.avsc`` file as JSON."""
    with path.open(encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def current_schema_files() -> dict[str, Path]:
    """Map of full name (``loadcast.X``) to the current ``.avsc`` file of each value schema."""
    return {f"{NAMESPACE}.{p.stem}": p for p in sorted(SCHEMA_DIR.glob("*.avsc"))}


def named_schemas() -> dict[str, Any]:
    """Parse every current schema once, so that schemas can refer to each other by name."""
    named: dict[str, Any] = {}
    pending = {name: load_schema_file(p) for name, p in current_schema_files().items()}
    # Parse in dependency order by retrying: a schema that names an unparsed type fails
    # with UnknownType until its dependency has been parsed.
    while pending:
        progressed = False
        for name, raw in list(pending.items()):
            try:
                fastavro.parse_schema(raw, named_schemas=named)
            except fastavro.schema.UnknownType:
                continue
            del pending[name]
            progressed = True
        if not progressed:
            raise RuntimeError(f"schemas refer to unknown types: {sorted(pending)}")
    return named


def expand(raw: Mapping[str, Any], named: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A self-contained copy of ``raw`` with every named reference inlined (for registries)."""
    known = dict(named if named is not None else named_schemas())
    parsed = fastavro.parse_schema(dict(raw), named_schemas=known)
    expanded = fastavro.schema.expand_schema(parsed)
    assert isinstance(expanded, dict)  # a record schema expands to a record
    return expanded


def registry_text(schema: Mapping[str, Any]) -> str:
    """The JSON a registry gets for a self-contained schema: each named type defined where
    it is first used and referred to by name after that (as the ``.avsc`` files do; the
    expanded form repeats definitions, which Avro's Java and Python parsers refuse), and
    without fastavro's internal keys (``__fastavro_parsed``, ``__named_schemas``).

    >>> from schemas.codec import Codec
    >>> text = registry_text(Codec.embedded().schema("GlobalModel"))
    >>> "__" in text, text.count('"name": "loadcast.ModelParameter"')
    (False, 1)
    """
    return json.dumps(_public(schema, set(), ""))


def _public(schema: Any, seen: set[str], namespace: str) -> Any:
    if isinstance(schema, list):
        return [_public(v, seen, namespace) for v in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") in ("record", "enum", "fixed") and isinstance(schema.get("name"), str):
        name = schema["name"]
        space = schema.get("namespace", namespace)
        full = name if "." in name or not space else f"{space}.{name}"
        if full in seen:
            return full
        seen.add(full)
        namespace = full.rpartition(".")[0]
    return {k: _public(v, seen, namespace) for k, v in schema.items() if not k.startswith("__")}


def fingerprint(schema: Mapping[str, Any]) -> str:
    """SHA-256 of the Avro parsing canonical form of a self-contained schema."""
    canonical = to_parsing_canonical_form(dict(schema))
    return hashlib.sha256(canonical.encode()).hexdigest()


def plain(schema: Any) -> Any:
    """``schema`` without timestamp logical types, so values are epoch-ms ints (same bytes)."""
    if isinstance(schema, dict):
        out = {k: plain(v) for k, v in schema.items()}
        if out.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
            del out["logicalType"]
        return out
    if isinstance(schema, list):
        return [plain(v) for v in schema]
    return schema
