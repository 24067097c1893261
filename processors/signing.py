"""Ed25519 signatures over MirrorCommand records.

The planner signs with a private key; executors verify with public keys only, so an edge
host that is taken over cannot forge commands for the others (with HMAC every executor
would hold the signing secret). Keys are the raw 32 bytes, base64-encoded, as
``loadcast mirror keygen`` prints them.

What is signed: a domain prefix and the canonical JSON of every field of the record but
``signature`` (sorted keys, no spaces, floats as Python's shortest round-trip repr), so a
verifier that decoded the Avro record reproduces exactly the signed bytes, and any changed
field (the action, the bundle digest, the sequence, the expiry, the key id...) breaks it.

>>> private, public = generate_keypair()
>>> signer = Signer("k1", private)
>>> cmd = signer.sign({"command_id": "c1", "action": "ACTIVATE", "sequence": 7})
>>> Verifier({"k1": public}).verify(cmd)
>>> cmd["sequence"] = 8
>>> Verifier({"k1": public}).verify(cmd)
Traceback (most recent call last):
...
processors.signing.SignatureError: bad_signature: signature of key 'k1' does not match
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"loadcast.MirrorCommand/1\n"


class KeyFormatError(ValueError):
    """A key that is not base64 of 32 raw Ed25519 bytes."""


class SignatureError(ValueError):
    """A record whose signature does not verify; ``reason`` is one of ``unsigned``,
    ``unknown_key``, ``bad_signature``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the domain prefix and canonical JSON of the record
    without its ``signature`` field."""
    body = {k: v for k, v in record.items() if k != "signature"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"record cannot be signed: {e}") from None
    return DOMAIN + text.encode("ascii")


def _raw(b64: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise KeyFormatError(f"{what} must be 32 bytes (base64 of a raw Ed25519 key), "
                             f"got {len(raw)}")
    return raw


def load_private_key(b64: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from base64 of its 32 raw bytes."""
    return Ed25519PrivateKey.from_private_bytes(_raw(b64, "private key"))


def load_public_key(b64: str) -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes."""
    return Ed25519PublicKey.from_public_bytes(_raw(b64, "public key"))


def _b64_public(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_of(private_b64: str) -> str:
    """The base64 public key that belongs to a base64 private key."""
    return _b64_public(load_private_key(private_b64).public_key())


def generate_keypair() -> tuple[str, str]:
    """A new (private, public) key pair, both base64 of the raw 32 bytes."""
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return base64.b64encode(raw).decode(), _b64_public(key.public_key())


class Signer:
    """Signs records with one private key, named ``key_id``."""

    def __init__(self, key_id: str, private_b64: str) -> None:
        self.key_id = key_id
        self._key = load_private_key(private_b64)

    def sign(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``record`` with ``key_id`` set and ``signature`` over the rest."""
        out = {k: v for k, v in record.items() if k != "signature"}
        out["key_id"] = self.key_id
        out["signature"] = self._key.sign(canonical_bytes(out))
        return out


class Verifier:
    """Verifies records against trusted public keys ``{key_id: base64 public key}``."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = {k: load_public_key(v) for k, v in keys.items()}

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, record: Mapping[str, Any]) -> None:
        """Return if ``record`` is signed by a trusted key; raise :class:`SignatureError`."""
        sig = record.get("signature") or b""
        if not sig:
            raise SignatureError("unsigned", "command carries no signature")
        key_id = str(record.get("key_id", ""))
        key = self._keys.get(key_id)
        if key is None:
            raise SignatureError("unknown_key", f"key {key_id!r} is not trusted "
                                 f"(trusted: {', '.join(self.key_ids) or 'none'})")
        try:
            key.verify(bytes(sig), canonical_bytes(record))
        except (InvalidSignature, ValueError):
            raise SignatureError("bad_signature",
                                 f"signature of key {key_id!r} does not match") from None
