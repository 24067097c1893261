"""The traffic director: edge mirrors as upstreams, chosen per request region.

Pure (no I/O): the sidecar feeds it LoadScore and MirrorStatus dicts and asks it, per
request, for a mirror endpoint or None (= route centrally as before).

- **Mirrors** come from mirror-status: READY adds ``instance_url`` as an endpoint of the
  API's mirror group in that region, if its host is one of ``mirror_hosts`` (names, addresses
  or CIDR networks): mirror-status is written by any executor and is not signed, so a forged
  status must not make the sidecar forward to a host outside its configuration. DRAINING,
  RETIRED or FAILED of that URL removes it (DRAINING comes ``drain_seconds`` before the
  process stops, so no new request goes to an instance that is about to go).
- **Demand** is :class:`processors.mirroring.DemandTable`, the planner's own sum of the
  region's endpoint forecasts, and so is central capacity (configured per API, else the
  sum of the scores' ``capacity_rps``).
- **Rule** (the seeds' traffic director) for a request from region R (the
  ``X-Loadcast-Region`` header, else the sidecar's region): a mirror in R when the peak
  predicted demand of R within ``lookahead_s`` exceeds central capacity (``enter_ratio``;
  it stays so until demand drops below ``leave_ratio`` × capacity: hysteresis) and the
  mirror group has headroom (requests routed to it in the last second below
  ``headroom`` × its capacity; unknown capacity = headroom); else central; else 503 with
  Retry-After (the proxy's answer when no central endpoint can take it). A mirror is
  also the fallback when every central endpoint is ejected. Inside the mirror group the
  choice is the predictive policy (score-weighted power-of-two-choices), as inside the
  central group.

>>> d = MirrorDirector(region="central", mirror_hosts=["127.0.0.0/8"])
>>> d.apply_statuses([{"api": "orders", "region": "eu", "state": "READY", "at": 0,
...     "instance_url": "http://127.0.0.1:9100", "capacity_rps": 50.0,
...     "executor_id": "x", "command_id": "c", "sequence": 1}], now_ms=0)
1
>>> sorted(d.mirrors[("orders", "eu")])
['http://127.0.0.1:9100']
>>> d.apply_statuses([{"api": "orders", "region": "eu", "state": "READY", "at": 0,
...     "instance_url": "http://203.0.113.9/", "capacity_rps": 50.0,
...     "executor_id": "x", "command_id": "c", "sequence": 2}], now_ms=0), d.refused_hosts
(0, 1)
"""

from __future__ import annotations

import ipaddress
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from processors.mirroring import DemandTable
from streams.sidecar.policies import Endpoint, make_policy
from streams.sidecar.router import Route

REGION_HEADER = "X-Loadcast-Region"
_REGION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
GONE = frozenset({"DRAINING", "RETIRED", "FAILED"})


def valid_region(value: str) -> bool:
    """A region name as the header may carry it."""
    return bool(_REGION.match(value))


class HostAllowlist:
    """Hosts a mirror may run on: exact names (case-insensitive) or IP networks.

    >>> a = HostAllowlist(["edge-1.example", "10.0.0.0/8"])
    >>> a.allows("http://10.2.3.4:8080/"), a.allows("http://EDGE-1.example"), a.allows("http://x/")
    (True, True, False)
    >>> HostAllowlist(["10.0.0.0/33"])
    Traceback (most recent call last):
    ...
    ValueError: mirror_hosts: '10.0.0.0/33' is neither a host name nor an IP network
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for e in entries:
            e = e.strip()
            if "/" in e or _is_ip(e):
                try:
                    self.networks.append(ipaddress.ip_network(e, strict=False))
                except ValueError:
                    raise ValueError(f"mirror_hosts: {e!r} is neither a host name nor an "
                                     "IP network") from None
            elif re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", e):
                self.names.add(e.lower().rstrip("."))
            else:
                raise ValueError(f"mirror_hosts: {e!r} is neither a host name nor an IP network")

    def allows(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            _ = parts.port  # a malformed port raises here
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not host:
            return False
        if _is_ip(host):
            ip = ipaddress.ip_address(host)
            return any(ip in n for n in self.networks)
        return host.lower().rstrip(".") in self.names


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass
class Mirror:
    """One ready mirror instance."""

    endpoint: Endpoint
    capacity_rps: float | None
    executor_id: str
    ready_at_ms: int


@dataclass
class _Group:
    overflow: bool = False
    demand_rps: float = 0.0
    capacity_rps: float = 0.0
    second: int = 0  # the wall-clock second being counted
    count: int = 0  # requests routed to the group in that second
    last_rate: float = 0.0  # requests in the previous second
    routed: int = 0
    urls: dict[str, Mirror] = field(default_factory=dict)


class MirrorDirector:
    """Mirror groups per (api, region) and the rule above."""

    def __init__(
        self,
        *,
        region: str,
        central_region: str = "central",
        central_capacity_rps: Mapping[str, float] | None = None,
        lookahead_s: float = 10.0,
        headroom: float = 0.9,
        enter_ratio: float = 1.0,
        leave_ratio: float = 0.8,
        rng: random.Random | None = None,
        mirror_hosts: Iterable[str] = (),
    ) -> None:
        self.region = region
        self.allowlist = HostAllowlist(mirror_hosts)
        self.refused_hosts = 0  # READY statuses naming a host outside ``mirror_hosts``
        self.demand = DemandTable(central_region, central_capacity_rps)
        self.lookahead_ms = int(lookahead_s * 1000)
        self.headroom = headroom
        self.enter = enter_ratio
        self.leave = leave_ratio
        self.policy = make_policy("predictive", rng or random.Random())
        self.groups: dict[tuple[str, str], _Group] = {}
        self._ticked_ms = 0

    @property
    def mirrors(self) -> dict[tuple[str, str], dict[str, Mirror]]:
        return {k: g.urls for k, g in self.groups.items() if g.urls}

    # ----------------------------------------------------------------- inputs

    def apply_scores(self, records: Iterable[Mapping[str, Any]], now_ms: int) -> None:
        touched = {k for r in records if (k := self.demand.apply(r)) is not None}
        for key in touched:
            self._judge(key, now_ms)

    def apply_statuses(self, records: Iterable[Mapping[str, Any]], now_ms: int) -> int:
        """MirrorStatus dicts; returns how many changed the mirror set."""
        changed = 0
        for r in records:
            url = r.get("instance_url")
            if not url:
                continue
            key = (str(r["api"]), str(r["region"]))
            g = self.groups.setdefault(key, _Group())
            state = r["state"]
            if state == "READY" and url not in g.urls:
                if not self.allowlist.allows(str(url)):
                    self.refused_hosts += 1
                    continue
                host_port = url.split("://", 1)[-1]
                eid = f"{key[0]}-mirror-{key[1]}-{host_port.replace(':', '-')}"[:100]
                ep = Endpoint(eid, url, key[0], key[1], r.get("capacity_rps"))
                g.urls[url] = Mirror(ep, r.get("capacity_rps"), str(r.get("executor_id", "")),
                                     int(r["at"]))
                changed += 1
                self._judge(key, now_ms)
            elif state in GONE and url in g.urls:
                del g.urls[url]
                changed += 1
        return changed

    def tick(self, now_ms: int) -> None:
        """Re-judge every group (scores expire); at most every 250 ms."""
        if now_ms - self._ticked_ms < 250:
            return
        self._ticked_ms = now_ms
        for key in list(self.groups):
            self._judge(key, now_ms)

    def _judge(self, key: tuple[str, str], now_ms: int) -> None:
        g = self.groups.setdefault(key, _Group())
        d = self.demand.demand(key[0], key[1], now_ms)
        if d is None or d.capacity_rps <= 0:
            g.overflow, g.demand_rps = False, 0.0  # no prediction: central (reactive)
            return
        peak = d.peak(self.lookahead_ms)
        g.demand_rps, g.capacity_rps = peak, d.capacity_rps
        if peak > d.capacity_rps * self.enter:
            g.overflow = True
        elif peak < d.capacity_rps * self.leave:
            g.overflow = False

    # ----------------------------------------------------------------- choice

    def _candidates(self, g: _Group, now: float, now_s: int) -> list[Endpoint]:
        if now_s != g.second:
            g.last_rate = float(g.count) if now_s == g.second + 1 else 0.0
            g.second, g.count = now_s, 0
        eps = [m.endpoint for m in g.urls.values() if m.endpoint.available(now)]
        caps = [m.capacity_rps for m in g.urls.values() if m.endpoint.available(now)]
        if eps and all(c is not None for c in caps):
            cap = sum(c for c in caps if c is not None)
            if max(g.last_rate, g.count) >= cap * self.headroom:
                return []  # the mirror group is full: central takes the rest
        return eps

    def choose(self, route: Route, region: str | None, now: float, now_s: int) -> Endpoint | None:
        """A mirror endpoint for a request of ``route`` from ``region`` (None: central).
        ``now`` is monotonic seconds (ejection), ``now_s`` the wall-clock second."""
        return self._pick(route, region, now, now_s, overflow_only=True)

    def fallback(self, route: Route, region: str | None, now: float,
                 now_s: int) -> Endpoint | None:
        """A mirror when no central endpoint can take the request (any demand)."""
        return self._pick(route, region, now, now_s, overflow_only=False)

    def _pick(self, route: Route, region: str | None, now: float, now_s: int,
              overflow_only: bool) -> Endpoint | None:
        g = self.groups.get((route.api, region or self.region))
        if g is None or not g.urls or (overflow_only and not g.overflow):
            return None
        eps = self._candidates(g, now, now_s)
        if not eps:
            return None
        g.count += 1
        g.routed += 1
        return self.policy.pick(eps, now)

    def view(self) -> dict[str, Any]:
        """JSON-able state for the admin server."""
        out: dict[str, Any] = {}
        for (api, region), g in sorted(self.groups.items()):
            out[f"{api}/{region}"] = {
                "overflow": g.overflow,
                "predicted_demand_rps": round(g.demand_rps, 3),
                "central_capacity_rps": round(g.capacity_rps, 3) if math.isfinite(
                    g.capacity_rps) else None,
                "routed": g.routed,
                "mirrors": {u: {"endpoint_id": m.endpoint.id, "capacity_rps": m.capacity_rps,
                                "executor_id": m.executor_id, "requests": m.endpoint.requests,
                                "failures": m.endpoint.failures}
                            for u, m in g.urls.items()},
            }
        return out
