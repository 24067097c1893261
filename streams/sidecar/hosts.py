"""Hosts edge mirrors may run on (``sidecar.mirror_hosts``): exact names or IP networks.
Used by the settings (to validate) and by the traffic director (to check a mirror's URL).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit


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
