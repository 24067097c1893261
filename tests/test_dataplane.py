"""The data-plane protocol: each implementation (built-in proxy, HAProxy, Envoy) starts,
takes a weight change, counts what its upstreams answered, and stops. Real processes on
loopback ports, real backends; a plane whose binary is missing is skipped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streams.sidecar.app import Sidecar
from streams.sidecar.envoy import envoy_binary
from streams.sidecar.haproxy import haproxy_binary
from streams.sidecar.planes import DATA_PLANES
from streams.sidecar.testing import BackendProcess
from tests.test_sidecar import drive, running, sidecar_settings

MISSING = {"haproxy": haproxy_binary() is None, "envoy": envoy_binary() is None}


@pytest.fixture
def backends() -> Iterator[BackendProcess]:
    with BackendProcess({"a": 0, "b": 0, "c": 0}) as b:
        yield b


@pytest.mark.asyncio
@pytest.mark.parametrize("plane", sorted(DATA_PLANES))
async def test_every_data_plane_counts_and_follows_a_drain(
    plane: str, backends: BackendProcess
) -> None:
    if MISSING.get(plane):
        pytest.skip(f"{plane} binary not installed")
    sc = Sidecar(sidecar_settings(backends.urls, data_plane=plane), None,
                 sidecar_id=f"sc-plane-{plane}")
    async with running(sc):
        before = (await sc.plane.counters())["orders"]
        got, statuses = await drive(sc.port, 90)
        after = (await sc.plane.counters())["orders"]
        assert statuses == {200: 90}
        served = {e: after.get(e, 0) - before.get(e, 0) for e in "abc"}
        assert served == {e: got.get(e, 0) for e in "abc"}, (served, got)
        # drain a and b through the protocol's weight change; c takes everything
        sc.set_manual_scores("orders", {"a": 0.0, "b": 0.0, "c": 1.0}, 30)

        async def only_c() -> bool:
            seen, _ = await drive(sc.port, 20)
            return set(seen) == {"c"}

        for _ in range(30):  # bounded: 30 x 20 requests
            if await only_c():
                break
        got, statuses = await drive(sc.port, 60)
        assert statuses == {200: 60} and got == {"c": 60}
        assert sc.health()["status"] == "ok"
