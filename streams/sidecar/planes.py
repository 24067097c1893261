"""The data planes a sidecar can drive, by ``sidecar.data_plane`` name."""

from __future__ import annotations

from streams.sidecar.dataplane import DataPlane
from streams.sidecar.envoy import EnvoyPlane
from streams.sidecar.haproxy_plane import HAProxyPlane
from streams.sidecar.proxy_plane import ProxyPlane

DATA_PLANES: dict[str, type[DataPlane]] = {
    "proxy": ProxyPlane,
    "haproxy": HAProxyPlane,
    "envoy": EnvoyPlane,
}
