"""The response cache's memory: stored responses by key and variant, LRU bounded by bytes.

Pure (no I/O, times passed in). A key is the request target (path and query) of one API;
its variants are selected by the request headers the response's ``Vary`` names
(:mod:`streams.sidecar.cache_policy`). Each entry is charged its body, its headers and a
fixed overhead; inserting past ``max_bytes`` evicts least recently used entries first.

>>> s = CacheStore(max_bytes=2000, max_object_bytes=1000)
>>> e = s.put("/a", {}, StoredResponse(200, (("X", "1"),), b"x" * 600, 0.0, Freshness(60)))
>>> s.get("/a", {}).body[:3], s.bytes
(b'xxx', 858)
>>> _ = s.put("/b", {}, StoredResponse(200, (), b"y" * 600, 0.0, Freshness(60)))
>>> _ = s.put("/c", {}, StoredResponse(200, (), b"z" * 600, 0.0, Freshness(60)))
>>> s.get("/a", {}) is None, s.evictions   # /a was least recently used
(True, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from streams.sidecar.cache_policy import Freshness, vary_key, vary_names

ENTRY_OVERHEAD = 256  # bytes charged per entry beyond body and headers
_NO_VARY = ("\0",)  # the variant part of the key of a response without Vary


@dataclass
class StoredResponse:
    """One stored response (body as received from the origin)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float  # monotonic seconds when received (or last revalidated)
    fresh: Freshness
    request_headers: tuple[tuple[str, str], ...] = ()  # the Vary-selecting ones
    encoded: dict[str, bytes] = field(default_factory=dict)  # compressed copies by coding
    key: str = ""  # where it is stored (set by the store)
    # the prebuilt status line and headers of a fresh hit (streams.sidecar.fastpath); None:
    # not built yet, b"": this response cannot be answered that way. Reset when the
    # headers change (a revalidation).
    head: bytes | None = None

    @property
    def size(self) -> int:
        return (len(self.body) + sum(len(k) + len(v) for k, v in self.headers)
                + sum(len(b) for b in self.encoded.values()) + ENTRY_OVERHEAD)

    def header(self, name: str) -> str | None:
        n = name.lower()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return None

    def header_map(self) -> dict[str, str]:
        return dict(self.headers)


class CacheStore:
    """Stored responses of one API, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int, max_object_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes
        self.bytes = 0
        self.evictions = 0
        self._lru: OrderedDict[tuple[str, tuple[str, ...]], StoredResponse] = OrderedDict()
        self._sizes: dict[tuple[str, tuple[str, ...]], int] = {}
        self._vary: dict[str, tuple[str, ...]] = {}  # key -> Vary names of its variants
        self._by_key: dict[str, set[tuple[str, tuple[str, ...]]]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def _full_key(self, key: str, req_headers: Mapping[str, str]
                  ) -> tuple[str, tuple[str, ...]] | None:
        names = self._vary.get(key)
        if names is None:
            return None
        if not names:
            return key, _NO_VARY  # the common case, on every hit: no tuple work
        return key, (*names, "\0", *vary_key(names, req_headers))

    def get(self, key: str, req_headers: Mapping[str, str]) -> StoredResponse | None:
        """The variant of ``key`` stored for these request headers (marked recently used)."""
        names = self._vary.get(key)
        if names is None:
            return None
        # inline for the common case of no Vary (every cache hit comes here)
        fk = (key, _NO_VARY) if not names else self._full_key(key, req_headers)
        if fk is None:
            return None
        e = self._lru.get(fk)
        if e is not None:
            self._lru.move_to_end(fk)
        return e

    def peek(self, key: str, req_headers: Mapping[str, str]) -> StoredResponse | None:
        """Like :meth:`get` without touching recency (for warming)."""
        fk = self._full_key(key, req_headers)
        return None if fk is None else self._lru.get(fk)

    def variants(self, key: str) -> list[StoredResponse]:
        """Every stored variant of ``key`` (recency untouched)."""
        return [self._lru[fk] for fk in self._by_key.get(key, ()) if fk in self._lru]

    def put(self, key: str, req_headers: Mapping[str, str], e: StoredResponse) -> bool:
        """Store ``e`` for ``key`` and these request headers; False when it is too big."""
        names = vary_names(dict(e.headers)) or ()
        if e.size > self.max_object_bytes + ENTRY_OVERHEAD or e.size > self.max_bytes:
            return False
        if self._vary.get(key, names) != names:  # Vary changed: drop the old variants
            self.drop(key)
        fk = (key, (*names, "\0", *vary_key(names, req_headers)))
        e.request_headers = tuple((n, req_headers.get(n) or "") for n in names
                                  if req_headers.get(n) is not None)
        self._remove(fk)
        self._vary[key] = names
        e.key = key
        self._lru[fk] = e
        self._by_key.setdefault(key, set()).add(fk)
        self._sizes[fk] = n = e.size
        self.bytes += n
        self._evict()
        return fk in self._lru

    def resize(self, key: str, req_headers: Mapping[str, str]) -> None:
        """Charge an entry again after it grew (a compressed copy added)."""
        fk = self._full_key(key, req_headers)
        if fk is not None and fk in self._lru:
            n = self._lru[fk].size
            self.bytes += n - self._sizes[fk]
            self._sizes[fk] = n
            self._evict()

    def drop(self, key: str) -> None:
        """Forget every variant of ``key``."""
        for fk in list(self._by_key.get(key, ())):
            self._remove(fk)
        self._vary.pop(key, None)

    def _remove(self, fk: tuple[str, tuple[str, ...]]) -> None:
        if self._lru.pop(fk, None) is not None:
            self.bytes -= self._sizes.pop(fk)
            self._unindex(fk)

    def _unindex(self, fk: tuple[str, tuple[str, ...]]) -> None:
        fks = self._by_key.get(fk[0])
        if fks is not None:
            fks.discard(fk)
            if not fks:
                del self._by_key[fk[0]]
                self._vary.pop(fk[0], None)

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._lru:
            fk, _ = self._lru.popitem(last=False)
            self.bytes -= self._sizes.pop(fk)
            self.evictions += 1
            self._unindex(fk)
