"""Compression by the built-in proxy: each coding by the client's q-values, never twice,
small and incompressible bodies as they are, ``Vary: Accept-Encoding``; streamed and
cached bodies too. Real loopback origin, real HTTP, the bodies decoded with the codecs."""

from __future__ import annotations

import gzip

import aiohttp
import brotli
import pytest
import zstandard
from multidict import CIMultiDict

from streams.sidecar.compression import negotiate
from tests.edge_helpers import edge_sidecar

TEXT = b"".join(b"line %d of a json-ish text body\n" % i for i in range(300))  # ~9 KiB
DECODE = {"gzip": gzip.decompress, "br": brotli.decompress,
          "zstd": lambda b: zstandard.ZstdDecompressor().decompress(b)}


async def raw_get(cs: aiohttp.ClientSession, port: int, path: str,
                  ae: str | None) -> tuple[bytes, CIMultiDict[str]]:
    headers = {"Accept-Encoding": ae} if ae is not None else {"Accept-Encoding": "identity"}
    async with cs.get(f"http://127.0.0.1:{port}{path}", headers=headers) as r:
        assert r.status == 200
        return await r.read(), CIMultiDict(r.headers)


def test_negotiation_follows_q_values() -> None:
    order = ("zstd", "br", "gzip")
    assert negotiate("gzip", order) == "gzip"
    assert negotiate("gzip;q=1.0, br;q=0.5", order) == "gzip"
    assert negotiate("br, gzip", order) == "br"  # equal q: the server's order
    assert negotiate("zstd;q=0, br;q=0, gzip;q=0.1", order) == "gzip"
    assert negotiate("*;q=0.2, zstd;q=0", order) == "br"
    assert negotiate("deflate, identity", order) is None
    assert negotiate("gzip;q=0", order) is None
    assert negotiate("GZIP;Q=0.7", order) == "gzip"


@pytest.mark.asyncio
async def test_each_coding_negotiated_and_decodes_to_the_original() -> None:
    async with edge_sidecar(compression={"enabled": True}) as (sc, o), \
            aiohttp.ClientSession(auto_decompress=False) as cs:
        o.set("/t", headers={"Content-Type": "application/json"}, body=TEXT)
        for ae, want in [("gzip", "gzip"), ("br;q=1, gzip;q=0.5", "br"),
                         ("zstd, br;q=0.9", "zstd"), ("gzip;q=0.2, zstd;q=0.1", "gzip")]:
            body, h = await raw_get(cs, sc.port, "/t", ae)
            assert h["Content-Encoding"] == want, ae
            assert DECODE[want](body) == TEXT and len(body) < len(TEXT) // 3
            assert "accept-encoding" in h["Vary"].lower()
        body, h = await raw_get(cs, sc.port, "/t", None)
        assert body == TEXT and "Content-Encoding" not in h and "Accept-Encoding" in h["Vary"]


@pytest.mark.asyncio
async def test_never_twice_and_not_small_or_incompressible() -> None:
    async with edge_sidecar(compression={"enabled": True, "min_bytes": 1024}) as (sc, o), \
            aiohttp.ClientSession(auto_decompress=False) as cs:
        pre = gzip.compress(TEXT)
        o.set("/pre", headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
              body=pre)
        o.set("/small", headers={"Content-Type": "text/plain"}, body=b"x" * 500)
        o.set("/png", headers={"Content-Type": "image/png"}, body=b"\x89PNG" + TEXT)
        body, h = await raw_get(cs, sc.port, "/pre", "br, zstd, gzip")
        assert body == pre and h["Content-Encoding"] == "gzip"  # passed through, once
        for p in ("/small", "/png"):
            body, h = await raw_get(cs, sc.port, p, "gzip, br, zstd")
            assert "Content-Encoding" not in h and body == o.replies[p].body


@pytest.mark.asyncio
async def test_streamed_and_cached_bodies_are_compressed_per_client() -> None:
    big = TEXT * 40  # ~360 KiB: streamed through, compressed on the fly
    async with edge_sidecar(compression={"enabled": True},
                            cache={"enabled": True}) as (sc, o), \
            aiohttp.ClientSession(auto_decompress=False) as cs:
        o.set("/big", headers={"Content-Type": "text/plain"}, body=big)
        body, h = await raw_get(cs, sc.port, "/big", "zstd")
        assert h["Content-Encoding"] == "zstd" and DECODE["zstd"](body) == big
        o.set("/c", headers={"Content-Type": "text/html", "Cache-Control": "max-age=60",
                             "ETag": '"e1"'}, body=TEXT)
        for ae in ("gzip", "br", "gzip", None, "zstd"):
            body, h = await raw_get(cs, sc.port, "/c", ae)
            if ae is None:
                assert body == TEXT
            else:
                assert h["Content-Encoding"] == ae and DECODE[ae](body) == TEXT
                assert h["ETag"] == 'W/"e1"'  # the encoded bytes differ from the stored
        assert o.hits["/c"] == 1  # one origin fetch, every client its own coding


@pytest.mark.asyncio
async def test_compress_responses_keeps_meaning_gzip_only() -> None:
    async with edge_sidecar(compress_responses=True) as (sc, o), \
            aiohttp.ClientSession(auto_decompress=False) as cs:
        o.set("/t", headers={"Content-Type": "text/plain"}, body=TEXT)
        body, h = await raw_get(cs, sc.port, "/t", "br, zstd, gzip;q=0.1")
        assert h["Content-Encoding"] == "gzip" and gzip.decompress(body) == TEXT
