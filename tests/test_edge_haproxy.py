"""HAProxy mode: the generated config turns on HAProxy's own cache and gzip compression for
the same rules (where HAProxy has them), and a real HAProxy serves hits from it."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import aiohttp
import pytest

from streams.sidecar.config import Upstream
from streams.sidecar.edge_config import CompressionSettings, EdgeCacheSettings
from streams.sidecar.haproxy import haproxy_binary, render_config
from tests.edge_helpers import edge_sidecar

UPS = [Upstream(id="a", url="http://127.0.0.1:9001", api="orders"),
       Upstream(id="b", url="http://127.0.0.1:9002", api="users")]


def test_config_has_cache_and_compression_only_when_enabled() -> None:
    plain = render_config(UPS, bind="127.0.0.1:1", socket_path="/tmp/x.sock")
    assert "cache" not in plain and "compression" not in plain
    cfg = render_config(UPS, bind="127.0.0.1:1", socket_path="/tmp/x.sock",
                        cache=EdgeCacheSettings(enabled=True, apis=["orders"],
                                                max_bytes=8 << 20),
                        compression=CompressionSettings(enabled=True))
    assert "cache lc_cache_orders\n    total-max-size 8\n" in cfg
    assert "lc_cache_users" not in cfg  # only the APIs asked for
    assert cfg.count("http-response cache-store lc_cache_orders") == 2  # both twins
    assert cfg.count("compression algo gzip") == 4  # every backend
    assert "text/plain" in cfg and "application/json" in cfg
    no_gzip = render_config(UPS, bind="127.0.0.1:1", socket_path="/tmp/x.sock",
                            compression=CompressionSettings(enabled=True,
                                                            algorithms=["br", "zstd"]))
    assert "compression" not in no_gzip  # HAProxy has gzip only


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy binary not installed")
def test_haproxy_accepts_the_config(tmp_path: Path) -> None:
    cfg = render_config(UPS, bind="127.0.0.1:1", socket_path=tmp_path / "h.sock",
                        cache=EdgeCacheSettings(enabled=True),
                        compression=CompressionSettings(enabled=True))
    (tmp_path / "h.cfg").write_text(cfg)
    out = subprocess.run([str(haproxy_binary()), "-c", "-f", str(tmp_path / "h.cfg")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy binary not installed")
@pytest.mark.asyncio
async def test_haproxy_serves_hits_from_its_cache_and_gzips() -> None:
    text = b"some json-ish text\n" * 400
    async with edge_sidecar(data_plane="haproxy", cache={"enabled": True},
                            compression={"enabled": True}) as (sc, o), \
            aiohttp.ClientSession(auto_decompress=False) as cs:
        o.set("/c", headers={"Cache-Control": "max-age=60", "Content-Type": "text/plain"},
              body=text)
        o.set("/n", headers={"Cache-Control": "no-store", "Content-Type": "text/plain"},
              body=text)
        for p in ("/c", "/c", "/c", "/n", "/n"):
            async with cs.get(f"http://127.0.0.1:{sc.port}{p}",
                              headers={"Accept-Encoding": "gzip"}) as r:
                assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
                assert gzip.decompress(await r.read()) == text
        assert (o.hits["/c"], o.hits["/n"]) == (1, 2)
