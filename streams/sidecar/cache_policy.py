"""HTTP caching rules for a *shared* cache (RFC 9111, RFC 5861): values in, values out.

What the built-in proxy's response cache (:mod:`streams.sidecar.edge_cache`) asks:

- :func:`request_bypass`: may this request be answered from, or stored into, the cache?
- :func:`why_not_storable`: may this response be stored (None) or why not;
- :func:`freshness`: how long it stays fresh, and how long it may then be served stale
  while revalidating (``stale-while-revalidate``) or on an origin error (``stale-if-error``);
- :func:`vary_names` / :func:`vary_key`: which request headers select a stored variant;
- :func:`conditional_headers`: the validators to revalidate a stored response with.

Safe by default: only what the origin marked cacheable with an *explicit* lifetime
(``s-maxage``, ``max-age`` or ``Expires``) is stored; heuristic freshness is never used.
``no-store`` and ``private`` are never stored; neither is a response carrying
``Set-Cookie``, nor ``Vary: *``. A request with credentials (``Authorization``, ``Cookie``
or the configured client-key header) is stored only when the response says ``public``.
``must-revalidate``, ``proxy-revalidate`` and ``s-maxage`` (which implies
``proxy-revalidate`` for a shared cache) forbid serving stale.

>>> cc = parse_cache_control('max-age=60, stale-while-revalidate=30, Private="x"')
>>> cc["max-age"], cc["stale-while-revalidate"], cc["private"]
('60', '30', 'x')
>>> f = freshness({"Cache-Control": "max-age=60, stale-while-revalidate=30"})
>>> f.lifetime_s, f.swr_s, f.sie_s
(60.0, 30.0, 0.0)
>>> why_not_storable("GET", 200, {"Cache-Control": "private, max-age=60"}, {}, credentials=False)
'private'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from multidict import CIMultiDict, CIMultiDictProxy

_CI = (CIMultiDict, CIMultiDictProxy)

CACHEABLE_METHODS = frozenset({"GET"})
# statuses RFC 9110 calls heuristically cacheable (we still require an explicit lifetime)
CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives of a ``Cache-Control`` value, names lower-cased, quotes removed.

    >>> parse_cache_control("no-cache, max-age=0")
    {'no-cache': None, 'max-age': '0'}
    """
    out: dict[str, str | None] = {}
    if not value:
        return out
    for part in value.split(","):
        name, eq, arg = part.strip().partition("=")
        name = name.strip().lower()
        if not name:
            continue
        if name not in out:  # the first occurrence wins (RFC 9111 4.2.1)
            out[name] = arg.strip().strip('"') if eq else None
        elif name == "max-age" or name == "s-maxage":
            out[name] = "0"  # conflicting duplicates: treat as stale
    return out


def header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]`` matched case-insensitively (plain dicts included)."""
    v = headers.get(name)
    if v is not None or isinstance(headers, _CI):
        return v  # case-insensitive already: no need to look further
    n = name.lower()
    for k, v in headers.items():
        if k.lower() == n:
            return v
    return None


def _seconds(v: str | None) -> float | None:
    if v is None or not v.isdigit():
        return None
    return float(min(int(v), 2**31))


def _http_date(v: str | None) -> float | None:
    if not v:
        return None
    try:
        return parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(frozen=True)
class Freshness:
    """How long a stored response is fresh, and its stale windows after that (seconds)."""

    lifetime_s: float
    swr_s: float = 0.0  # stale-while-revalidate
    sie_s: float = 0.0  # stale-if-error
    initial_age_s: float = 0.0  # the Age it arrived with

    def state(self, resident_s: float) -> str:
        """``fresh``, ``swr`` (serve stale, revalidate behind), ``sie`` (stale only on an
        origin error) or ``stale``, after ``resident_s`` seconds in the cache.

        >>> Freshness(10, swr_s=5, sie_s=60).state(12), Freshness(10, sie_s=60).state(30)
        ('swr', 'sie')
        """
        age = self.initial_age_s + max(0.0, resident_s)
        if age < self.lifetime_s:
            return "fresh"
        if age < self.lifetime_s + self.swr_s:
            return "swr"
        if age < self.lifetime_s + self.sie_s:
            return "sie"
        return "stale"

    def ttl(self, resident_s: float) -> float:
        """Seconds of freshness left (negative once stale)."""
        return self.lifetime_s - self.initial_age_s - max(0.0, resident_s)


def explicit_lifetime(headers: Mapping[str, str], cc: Mapping[str, str | None]) -> float | None:
    """``s-maxage``, else ``max-age``, else ``Expires`` - ``Date`` (RFC 9111 4.2.1); None
    without any of them (no heuristic freshness here)."""
    for name in ("s-maxage", "max-age"):
        if name in cc:
            return _seconds(cc[name]) or 0.0
    exp = header(headers, "Expires")
    if exp is not None:
        expires = _http_date(exp)
        date = _http_date(header(headers, "Date"))
        if expires is None:
            return 0.0  # an invalid Expires means "already expired"
        if date is None:
            return None
        return max(0.0, expires - date)
    return None


def freshness(headers: Mapping[str, str]) -> Freshness:
    """The :class:`Freshness` of a response with ``headers`` (lifetime 0 without one)."""
    cc = parse_cache_control(header(headers, "Cache-Control"))
    life = explicit_lifetime(headers, cc) or 0.0
    no_stale = any(d in cc for d in ("must-revalidate", "proxy-revalidate", "s-maxage",
                                     "no-cache"))
    swr = 0.0 if no_stale else _seconds(cc.get("stale-while-revalidate")) or 0.0
    sie = 0.0 if no_stale else _seconds(cc.get("stale-if-error")) or 0.0
    age = _seconds((header(headers, "Age") or "").strip()) or 0.0
    return Freshness(life, swr, sie, age)


def request_bypass(method: str, headers: Mapping[str, str]) -> str | None:
    """Why this request must not use the cache at all (None: it may).

    A request's ``no-cache`` / ``max-age=0`` does not bypass: it is sent to the origin and
    its answer stored (see :func:`must_revalidate_request`).

    >>> request_bypass("POST", {}), request_bypass("GET", {"Cache-Control": "no-store"})
    ('method', 'no-store')
    """
    if method not in CACHEABLE_METHODS:
        return "method"
    cc = header(headers, "Cache-Control")
    if cc and "no-store" in parse_cache_control(cc):
        return "no-store"
    if header(headers, "Range") is not None:
        return "range"  # partial content is not cached here
    return None


def must_revalidate_request(headers: Mapping[str, str]) -> bool:
    """The client asks for an answer validated with the origin (``no-cache``,
    ``max-age=0``, or ``Pragma: no-cache`` without ``Cache-Control``)."""
    cc_v = header(headers, "Cache-Control")
    if cc_v is None:
        return (header(headers, "Pragma") or "").strip().lower() == "no-cache"
    cc = parse_cache_control(cc_v)
    return "no-cache" in cc or cc.get("max-age") == "0"


def has_credentials(headers: Mapping[str, str], extra: Iterable[str] = ()) -> bool:
    """The request carries credentials (``Authorization``, ``Cookie``, ...)."""
    return any(header(headers, h) is not None for h in (*CREDENTIAL_HEADERS, *extra))


def serves_credentials(resp_headers: Mapping[str, str]) -> bool:
    """May a stored response answer a request that carries credentials? Only when the
    origin said ``public`` (RFC 9111 §3.5 also allows ``s-maxage`` and ``must-revalidate``;
    we keep to the rule we store by): a response stored for an anonymous request must not
    answer an authenticated one the origin might answer differently.

    >>> serves_credentials({"Cache-Control": "max-age=60"})
    False
    >>> serves_credentials({"Cache-Control": "public, max-age=60"})
    True
    """
    return "public" in parse_cache_control(header(resp_headers, "Cache-Control"))


def why_not_storable(method: str, status: int, resp_headers: Mapping[str, str],
                     req_headers: Mapping[str, str], *, credentials: bool) -> str | None:
    """None when a shared cache may store this response, else the reason (a short word
    used as a metric label)."""
    if method not in CACHEABLE_METHODS:
        return "method"
    if status not in CACHEABLE_STATUSES:
        return "status"
    cc_v = header(resp_headers, "Cache-Control")
    if cc_v is None and header(resp_headers, "Expires") is None:
        return "no-lifetime"  # most uncacheable answers: nothing else to look at
    req_cc = parse_cache_control(header(req_headers, "Cache-Control"))
    cc = parse_cache_control(cc_v)
    if "no-store" in cc or "no-store" in req_cc:
        return "no-store"
    if "private" in cc:
        return "private"
    if "no-cache" in cc:
        return "no-cache"  # always revalidate: not worth storing here
    if credentials and "public" not in cc:
        return "credentials"
    if header(resp_headers, "Set-Cookie") is not None:
        return "set-cookie"
    if vary_names(resp_headers) is None:
        return "vary-star"
    life = explicit_lifetime(resp_headers, cc)
    if life is None:
        return "no-lifetime"
    if life <= 0 and not validators(resp_headers):
        return "no-lifetime"
    return None


def vary_names(headers: Mapping[str, str]) -> tuple[str, ...] | None:
    """The lower-cased request header names in ``Vary`` (sorted), None for ``Vary: *``.

    >>> vary_names({"Vary": "Accept-Encoding, accept-language"})
    ('accept-encoding', 'accept-language')
    """
    v = header(headers, "Vary") or ""
    names = {n.strip().lower() for n in v.split(",") if n.strip()}
    if "*" in names:
        return None
    return tuple(sorted(names))


def vary_key(names: tuple[str, ...], req_headers: Mapping[str, str]) -> tuple[str, ...]:
    """The selecting values of a request for ``names`` (whitespace normalized)."""
    return tuple(" ".join((header(req_headers, n) or "").split()) for n in names)


def validators(headers: Mapping[str, str]) -> dict[str, str]:
    """``ETag`` / ``Last-Modified`` of a stored response."""
    out = {}
    for name in ("ETag", "Last-Modified"):
        v = header(headers, name)
        if v:
            out[name] = v
    return out


def conditional_headers(stored: Mapping[str, str]) -> dict[str, str]:
    """Request headers that revalidate a stored response with its validators.

    >>> conditional_headers({"ETag": '"v1"', "Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT"})
    {'If-None-Match': '"v1"', 'If-Modified-Since': 'Tue, 01 Dec 2026 00:00:00 GMT'}
    """
    v = validators(stored)
    out = {}
    if "ETag" in v:
        out["If-None-Match"] = v["ETag"]
    if "Last-Modified" in v:
        out["If-Modified-Since"] = v["Last-Modified"]
    return out


def client_not_modified(req_headers: Mapping[str, str], stored: Mapping[str, str]) -> bool:
    """The client's own ``If-None-Match`` matches the stored ``ETag`` (weak comparison),
    so a 304 answers it."""
    inm = header(req_headers, "If-None-Match")
    etag = header(stored, "ETag")
    if not inm or not etag:
        return False
    if inm.strip() == "*":
        return True
    want = etag.strip().removeprefix("W/")
    return any(t.strip().removeprefix("W/") == want for t in inm.split(","))


# headers a 304 may update on the stored response (RFC 9111 4.3.4: all but a few)
NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "transfer-encoding",
                                "content-range", "content-type"})
