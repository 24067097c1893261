"""API bundles and the content-addressed store they live in.

A bundle is a directory with a manifest, ``loadcast-bundle.toml``::

    name = "orders"
    version = "1.4.2"
    command = ["{python}", "app.py"]   # {python}: the executor's interpreter
    port_env = "PORT"                  # the port to listen on comes in this variable
    health_path = "/health"            # 200 here = ready
    capacity_rps = 400                 # what one instance serves (for the planner/director)

and whatever the command needs. :func:`pack` turns it into a reproducible tar (entries
sorted, mtime 0, uid/gid 0, no user names, modes normalised to 0644/0755, no compression,
``__pycache__`` and ``*.pyc`` left out), so the same content always gives the same bytes
and the same ``sha256:<hex>`` digest. A :class:`BundleStore` keeps bundles by digest
(:class:`DirectoryStore`: ``<root>/sha256/<hex>``; the interface is four methods so an
object store can stand behind it later), :func:`bundle_app` serves a store over HTTP
(``GET /bundles/sha256:<hex>``), and :func:`fetch` downloads one and checks that it hashes
to the digest asked for; :func:`unpack` extracts it safely (tarfile's ``data`` filter:
no absolute paths, no links out, no devices) into a versioned directory.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / MANIFEST).write_text('name = "x"\\nversion = "1"\\ncommand = ["true"]\\n')
>>> pack(d) == pack(d), digest_of(pack(d)).startswith("sha256:")
(True, True)
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import tempfile
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST = "loadcast-bundle.toml"
DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
EXCLUDED_DIRS = frozenset({"__pycache__", ".git", ".mypy_cache", ".pytest_cache"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
MAX_BUNDLE_BYTES = 256 << 20


class BundleError(ValueError):
    """A bundle that cannot be packed, stored, fetched or unpacked; says why."""


class DigestMismatch(BundleError):
    """Fetched bytes that do not hash to the digest they were asked for."""


class BundleNotFound(BundleError):
    """No bundle with that digest in the store."""


class Manifest(BaseModel):
    """What an executor needs to run a bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    version: str = Field(min_length=1, max_length=100)
    command: list[str] = Field(min_length=1, description="argv; {python} = the interpreter")
    port_env: str = Field("PORT", pattern=r"^[A-Z_][A-Z0-9_]*$")
    health_path: str = Field("/health", pattern=r"^/[^\s]*$")
    capacity_rps: float | None = Field(None, gt=0, description="one instance, requests/s")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")
    startup_timeout_s: float = Field(30.0, gt=0, le=3600)

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)]
        if bad:
            raise ValueError(f"bad variable names {bad}")
        return v


def parse_manifest(text: str, where: str = MANIFEST) -> Manifest:
    """A manifest from TOML text; :class:`BundleError` names the bad field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BundleError(f"{where} does not parse: {e}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, x['loc'])) or '(manifest)'}: {x['msg']}"
                        for x in e.errors())
        raise BundleError(f"{where}: {bad}") from None


def read_manifest(directory: Path | str) -> Manifest:
    """The manifest of a bundle directory."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BundleError(f"{path}: cannot read the manifest: {e.strerror}") from None
    return parse_manifest(text, str(path))


def digest_of(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """The hex part of a well-formed ``sha256:<64 hex>`` digest, else :class:`BundleError`."""
    m = DIGEST.match(digest)
    if m is None:
        raise BundleError(f"bad digest {digest!r}: must be sha256:<64 lowercase hex digits>")
    return m.group(1)


def _entries(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        base = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            if name.endswith(EXCLUDED_SUFFIXES):
                continue
            out.append(base / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def pack(directory: Path | str) -> bytes:
    """The bundle directory as reproducible tar bytes (see the module docstring)."""
    root = Path(directory)
    read_manifest(root)  # a bundle without a valid manifest is not a bundle
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _entries(root):
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:  # links could point anywhere on the executor's host
                raise BundleError(f"{path}: only regular files and directories can be bundled")
    return buf.getvalue()


class BundleStore(Protocol):
    """Bundles by digest. Narrow on purpose: a directory now, an object store later."""

    def put(self, data: bytes) -> str: ...

    def get(self, digest: str) -> bytes: ...

    def has(self, digest: str) -> bool: ...

    def digests(self) -> list[str]: ...


class DirectoryStore:
    """A :class:`BundleStore` in a directory: ``<root>/sha256/<hex>``, written atomically
    (temporary file + rename), checked against its digest on every read."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _path(self, digest: str) -> Path:
        return self.root / "sha256" / check_digest(digest)

    def put(self, data: bytes) -> str:
        digest = digest_of(data)
        path = self._path(digest)
        if path.exists():
            return digest  # same digest, same bytes: nothing to do
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, digest: str) -> bytes:
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleNotFound(f"no bundle {digest} in {self.root}") from None
        if digest_of(data) != digest:
            raise DigestMismatch(f"stored bundle {digest} is corrupt (hashes to "
                                 f"{digest_of(data)})")
        return data

    def has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def digests(self) -> list[str]:
        d = self.root / "sha256"
        if not d.is_dir():
            return []
        return sorted(f"sha256:{p.name}" for p in d.iterdir() if DIGEST.match(f"sha256:{p.name}"))


def push(directory: Path | str, store: BundleStore) -> tuple[str, Manifest]:
    """Pack ``directory`` into ``store``; returns its digest and manifest."""
    manifest = read_manifest(directory)
    return store.put(pack(directory)), manifest


def manifest_of(data: bytes) -> Manifest:
    """The manifest inside bundle bytes (without unpacking the rest)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            member = tar.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            return parse_manifest(member.read().decode("utf-8"))
    except (tarfile.TarError, KeyError, UnicodeDecodeError) as e:
        raise BundleError(f"not a bundle: {type(e).__name__}: {e}") from None


def unpack(data: bytes, dest: Path | str) -> Manifest:
    """Extract bundle bytes into ``dest`` (created whole or not at all; an existing
    ``dest`` is kept as it is: directories are versioned by digest)."""
    dest = Path(dest)
    manifest = manifest_of(data)
    if dest.is_dir():
        return manifest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"cannot unpack into {dest}: {e}") from None
    return manifest


def fetch(base_url: str, digest: str, *, timeout_s: float = 30.0,
          max_bytes: int = MAX_BUNDLE_BYTES) -> bytes:
    """Download bundle ``digest`` from a store served by :func:`bundle_app` and check that
    it hashes to ``digest`` (:class:`DigestMismatch` otherwise)."""
    check_digest(digest)
    url = f"{base_url.rstrip('/')}/bundles/{digest}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data: bytes = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise BundleNotFound(f"no bundle {digest} at {base_url}") from None
        raise BundleError(f"fetching {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise BundleError(f"fetching {url}: {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise BundleError(f"bundle {digest} is larger than {max_bytes} bytes")
    got = digest_of(data)
    if got != digest:
        raise DigestMismatch(f"bundle fetched from {base_url} hashes to {got}, not {digest}")
    return data


def bundle_app(store: BundleStore) -> web.Application:
    """HTTP access to ``store``: ``GET /bundles`` (digests), ``GET|HEAD
    /bundles/sha256:<hex>`` (the bytes), ``GET /health``."""

    async def one(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        try:
            data = store.get(digest)
        except BundleNotFound as e:
            return web.json_response({"error": str(e)}, status=404)
        except BundleError as e:  # bad digest syntax, or corrupt in the store
            status = 500 if isinstance(e, DigestMismatch) else 400
            return web.json_response({"error": str(e)}, status=status)
        return web.Response(body=data, content_type="application/x-tar",
                            headers={"Docker-Content-Digest": digest,
                                     "Cache-Control": "public, max-age=31536000, immutable"})

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"bundles": store.digests()})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/bundles", listing)
    app.router.add_get("/bundles/{digest}", one)  # GET also answers HEAD
    app.router.add_get("/health", health)
    return app
