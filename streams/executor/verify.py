"""The checks of one mirror command, pure: its schema, then signature, expiry, sequence
and (for ACTIVATE) the digest's form and the instance count. The bundle's bytes are
checked against the digest when fetched (:mod:`streams.executor.fetch`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from processors.signing import SignatureError, Verifier
from schemas.codec import Codec, CodecError
from streams.bundles import BundleError, check_digest


@dataclass(frozen=True)
class Verdict:
    """What to do with a command: ``apply``, ``duplicate``, ``reject`` or ``ignore``."""

    kind: str
    reason: str = ""


def decode_command(codec: Codec, value: bytes | None, topic: str) -> dict[str, Any]:
    """The MirrorCommand in ``value``; :class:`CodecError` when it is none."""
    if value is None:
        raise CodecError("invalid", "record has no value")
    name = codec.name_of(value)
    if name != "loadcast.MirrorCommand":
        raise CodecError("wrong_schema", f"{name} on {topic}")
    return codec.decode(value, "MirrorCommand")


def check_command(record: Mapping[str, Any], *, region: str, verifier: Verifier,
                  last: Mapping[str, Any] | None, now: int) -> Verdict:
    """Signature, expiry and sequence checks of one decoded MirrorCommand (pure).

    ``last`` is the last command accepted for the record's API (None: none yet).
    """
    if record.get("region") != region:
        return Verdict("ignore", f"for region {record.get('region')!r}")
    try:
        verifier.verify(record)
    except SignatureError as e:
        return Verdict("reject", f"{e.reason}: {e.detail}")
    if int(record["expires_at"]) < now:
        return Verdict("reject", f"expired: expires_at {record['expires_at']} is "
                       f"{(now - int(record['expires_at'])) / 1000:.1f} s in the past")
    if last is not None:
        seq, last_seq = int(record["sequence"]), int(last["sequence"])
        if seq == last_seq and record["command_id"] == last["command_id"]:
            return Verdict("duplicate", "already applied")
        if seq <= last_seq:
            return Verdict("reject", f"replayed or out of order: sequence {seq} is not above "
                           f"the last accepted {last_seq}")
    if record["action"] == "ACTIVATE":
        try:
            check_digest(str(record["bundle_digest"]))
        except BundleError as e:
            return Verdict("reject", str(e))
        if int(record["desired_instances"]) < 1:
            return Verdict("reject", "ACTIVATE with desired_instances < 1")
    return Verdict("apply")
