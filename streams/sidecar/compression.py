"""Response compression of the built-in proxy: which coding a client gets, and the codecs.

- :func:`negotiate`: the coding for an ``Accept-Encoding`` value (q-values, ``*``,
  ``identity;q=0``), preferring the server's order among equal q-values;
- :func:`worth_compressing`: compressible type, at least ``min_bytes``, not encoded yet
  (never twice: what the origin encoded passes through), not a ``HEAD``/204/304;
- :func:`compress` / :func:`compressor`: gzip (zlib), brotli (``brotli``) and zstd
  (``zstandard``), whole or streamed.

>>> negotiate("gzip;q=0.5, br;q=0.9, zstd;q=0.1", ("zstd", "br", "gzip"))
'br'
>>> negotiate("gzip, br", ("zstd", "br", "gzip")), negotiate("*", ("zstd", "gzip"))
('br', 'zstd')
>>> negotiate("identity", ("gzip",)) is None
True
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import brotli
import zstandard

CODINGS = ("zstd", "br", "gzip")
DEFAULT_TYPES = ("text/", "application/json", "application/xml", "application/javascript",
                 "application/problem+json", "image/svg+xml")
GZIP_LEVEL = 5
BROTLI_QUALITY = 4  # fast; 11 is for static assets
ZSTD_LEVEL = 3


def _q(param: str) -> float:
    name, _, v = param.partition("=")
    if name.strip().lower() != "q":
        return -1.0
    try:
        q = float(v.strip())
    except ValueError:
        return 0.0
    return min(1.0, max(0.0, q))


def accepted(accept_encoding: str) -> dict[str, float]:
    """Coding -> q-value of an ``Accept-Encoding`` value (names lower-cased).

    >>> accepted("gzip;q=0.8, BR, *;q=0")
    {'gzip': 0.8, 'br': 1.0, '*': 0.0}
    """
    out: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, *params = item.split(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for p in params:
            v = _q(p)
            if v >= 0:
                q = v
        if name == "x-gzip":
            name = "gzip"
        out[name] = max(q, out.get(name, 0.0))
    return out


def negotiate(accept_encoding: str | None, available: Sequence[str]) -> str | None:
    """The coding from ``available`` (server preference order) the client accepts with the
    highest q-value, or None (send identity)."""
    if not accept_encoding:
        return None
    acc = accepted(accept_encoding)
    star = acc.get("*")
    best: str | None = None
    best_q = 0.0
    for c in available:
        q = acc.get(c, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = c, q
    return best


def worth_compressing(method: str, status: int, content_type: str | None,
                      content_encoding: str | None, length: int | None, *, min_bytes: int,
                      types: Sequence[str] = DEFAULT_TYPES) -> bool:
    """Compress this response at all (before looking at the client)?

    >>> worth_compressing("GET", 200, "text/html", None, 5000, min_bytes=1024)
    True
    >>> worth_compressing("GET", 200, "image/png", None, 5000, min_bytes=1024)
    False
    """
    if method == "HEAD" or status in (204, 206, 304) or status < 200:
        return False
    if content_encoding and content_encoding.strip().lower() != "identity":
        return False  # never twice
    if length is not None and length < min_bytes:
        return False
    ct = (content_type or "").lower()
    return any(ct.startswith(t) for t in types)


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _Brotli:
    def __init__(self) -> None:
        self._c = brotli.Compressor(quality=BROTLI_QUALITY)

    def compress(self, data: bytes) -> bytes:
        return bytes(self._c.process(data))

    def flush(self) -> bytes:
        return bytes(self._c.finish())


class _Zstd:
    def __init__(self) -> None:
        self._c = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


def compressor(coding: str) -> Compressor:
    """A streaming compressor for ``coding`` (one of :data:`CODINGS`)."""
    if coding == "gzip":
        return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        return _Zstd()
    raise ValueError(f"unknown content coding {coding!r}")


def compress(data: bytes, coding: str) -> bytes:
    """``data`` compressed whole with ``coding``.

    >>> import gzip; gzip.decompress(compress(b"abc" * 100, "gzip")) == b"abc" * 100
    True
    """
    if coding == "br":
        return bytes(brotli.compress(data, quality=BROTLI_QUALITY))
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)
    c = compressor(coding)
    return c.compress(data) + c.flush()


def add_vary(existing: str | None, name: str = "Accept-Encoding") -> str:
    """``existing`` Vary value with ``name`` added once.

    >>> add_vary("Accept-Language"), add_vary("accept-encoding"), add_vary(None)
    ('Accept-Language, Accept-Encoding', 'accept-encoding', 'Accept-Encoding')
    """
    if not existing:
        return name
    names = [n.strip().lower() for n in existing.split(",")]
    if name.lower() in names or "*" in names:
        return existing
    return f"{existing}, {name}"
