"""API bundles: reproducible packing, the content-addressed store, serving and fetching
over real HTTP on loopback, safe unpacking."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.bundles import (
    MANIFEST,
    BundleError,
    BundleNotFound,
    DigestMismatch,
    DirectoryStore,
    bundle_app,
    digest_of,
    fetch,
    pack,
    push,
    unpack,
)
from tests.mirror_helpers import FIXTURE, app_in_thread


def copy_bundle(dest: Path) -> Path:
    shutil.copytree(FIXTURE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_same_content_same_bytes_whatever_the_metadata(tmp_path: Path) -> None:
    a = copy_bundle(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    # Same files created in the opposite order, other times and modes, plus junk that is
    # never bundled.
    for name in sorted(os.listdir(a), reverse=True):
        (b / name).write_bytes((a / name).read_bytes())
        os.utime(b / name, (1_000_000, 1_234_567))
    (b / "app.py").chmod(0o600)
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\x00junk")
    (b / "stale.pyc").write_bytes(b"junk")
    assert pack(a) == pack(b)
    assert digest_of(pack(a)) == digest_of(pack(b))

    # Any change of content (or of the executable bit) changes the digest.
    (b / "app.py").write_text((a / "app.py").read_text() + "# changed\n")
    assert digest_of(pack(b)) != digest_of(pack(a))
    c = copy_bundle(tmp_path / "c")
    (c / "app.py").chmod(0o755)
    assert digest_of(pack(c)) != digest_of(pack(a))

    with tarfile.open(fileobj=io.BytesIO(pack(a))) as tar:
        entries = tar.getmembers()
    assert [e.name for e in entries] == sorted(e.name for e in entries)
    assert {(e.mtime, e.uid, e.gid, e.uname, e.gname) for e in entries} == {(0, 0, 0, "", "")}


def test_bad_bundles_say_why(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read the manifest"):
        pack(tmp_path)
    (tmp_path / MANIFEST).write_text('name = "x"\nversion = "1"\ncommand = []\n')
    with pytest.raises(BundleError, match="command: List should have at least 1 item"):
        pack(tmp_path)
    (tmp_path / MANIFEST).write_text('name = "x"\nversion = "1"\ncommand = ["a"]\n'
                                     'health_path = "no-slash"\n')
    with pytest.raises(BundleError, match="health_path"):
        pack(tmp_path)
    (tmp_path / MANIFEST).write_text('name = "x"\nversion = "1"\ncommand = ["a"]\n')
    (tmp_path / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="only regular files"):
        pack(tmp_path)


def test_directory_store(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    digest, manifest = push(FIXTURE, store)
    assert manifest.name == "echo-api" and manifest.capacity_rps == 500
    assert push(copy_bundle(tmp_path / "copy"), store)[0] == digest  # stored once
    assert store.digests() == [digest] and store.has(digest)
    assert store.get(digest) == pack(FIXTURE)
    with pytest.raises(BundleNotFound):
        store.get("sha256:" + "0" * 64)
    with pytest.raises(BundleError, match="bad digest"):
        store.get("sha256:../../etc/passwd")
    # A corrupted file is never handed out as the bundle.
    (tmp_path / "store" / "sha256" / digest.split(":")[1]).write_bytes(b"tampered")
    with pytest.raises(DigestMismatch):
        store.get(digest)


def test_unpack_is_safe_and_versioned(tmp_path: Path) -> None:
    data = pack(FIXTURE)
    dest = tmp_path / "bundles" / digest_of(data).split(":")[1]
    assert unpack(data, dest).name == "echo-api"
    assert (dest / "app.py").read_text() == (FIXTURE / "app.py").read_text()
    assert unpack(data, dest).version == "1.0.0"  # again: kept as it is

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        for name, body in ((MANIFEST, (FIXTURE / MANIFEST).read_bytes()),
                           ("../escaped.txt", b"gotcha")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with pytest.raises(BundleError, match="cannot unpack"):
        unpack(evil.getvalue(), tmp_path / "evil")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "evil").exists()
    with pytest.raises(BundleError, match="not a bundle"):
        unpack(b"not a tar", tmp_path / "nope")


class LyingStore:
    """A store that answers every digest with other bytes (a compromised mirror)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def put(self, data: bytes) -> str:
        raise NotImplementedError

    def get(self, digest: str) -> bytes:
        return self.data

    def has(self, digest: str) -> bool:
        return True

    def digests(self) -> list[str]:
        return []


@pytest.fixture
def lying_server() -> Iterator[str]:
    """A bundle server (in a thread) serving other bytes under any digest."""
    with app_in_thread(bundle_app(LyingStore(pack(FIXTURE) + b"\x00"))) as url:
        yield url


def test_push_serve_fetch_over_http(tmp_path: Path, lying_server: str) -> None:
    env = {**os.environ, "LOADCAST_MIRROR__STORE_DIR": str(tmp_path / "store")}
    r = subprocess.run([sys.executable, "-m", "loadcast", "bundle", "push", str(FIXTURE)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip()
    assert digest == digest_of(pack(FIXTURE))
    bad = subprocess.run([sys.executable, "-m", "loadcast", "bundle", "push", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot read the manifest" in bad.stderr

    server = subprocess.Popen(
        [sys.executable, "-m", "loadcast", "bundle", "serve", "--port", "0", "--duration", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        t0 = time.monotonic()
        assert fetch(url, digest) == pack(FIXTURE)
        assert time.monotonic() - t0 < 5
        with pytest.raises(BundleNotFound):
            fetch(url, "sha256:" + "1" * 64)
        with pytest.raises(BundleError, match="bad digest"):
            fetch(url, "md5:abc")
        with pytest.raises(BundleError, match="larger than"):
            fetch(url, digest, max_bytes=1024)
    finally:
        server.terminate()
        server.wait(10)
    # A server that answers with other bytes is caught by the digest check.
    with pytest.raises(DigestMismatch, match="hashes to"):
        fetch(lying_server, digest)
