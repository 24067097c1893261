"""Bundles on the executor's disk: fetched from the store by digest on first use,
verified against the digest, unpacked into ``<work_dir>/bundles/<hex digest>/``."""

from __future__ import annotations

from pathlib import Path

from streams.bundles import (
    MAX_BUNDLE_BYTES,
    BundleError,
    DigestMismatch,
    Manifest,
    check_digest,
    fetch,
    read_manifest,
    unpack,
)
from streams.executor.verify import Verdict


class BundleCache:
    """The unpacked bundles under ``root``, fetched from ``store_url``."""

    def __init__(self, root: Path, store_url: str,
                 max_bytes: int = MAX_BUNDLE_BYTES) -> None:
        self.root = root
        self.store_url = store_url
        self.max_bytes = max_bytes

    def directory(self, digest: str) -> Path:
        return self.root / check_digest(digest)

    def ensure(self, digest: str) -> Verdict:
        """Fetch, verify and unpack a bundle not yet unpacked; a verdict on failure."""
        dest = self.directory(digest)
        if dest.is_dir():
            return Verdict("apply")  # verified when it was unpacked
        try:
            data = fetch(self.store_url, digest, max_bytes=self.max_bytes)
            unpack(data, dest)
        except DigestMismatch as e:
            return Verdict("reject", f"bundle digest mismatch: {e}")
        except BundleError as e:
            return Verdict("reject", f"bundle not available: {e}")
        return Verdict("apply")

    def manifest(self, digest: str) -> Manifest:
        """The manifest of an unpacked bundle (:class:`BundleError` if there is none)."""
        return read_manifest(self.directory(digest))

    def prepared(self, digest: str) -> Manifest:
        """The manifest, fetching the bundle again first when its directory is gone (e.g.
        the work directory was cleaned); :class:`BundleError` when it cannot be had."""
        if not self.directory(digest).is_dir():
            verdict = self.ensure(digest)
            if verdict.kind == "reject":
                raise BundleError(verdict.reason)
        return self.manifest(digest)

    def health_path(self, digest: str) -> str:
        """The bundle's health path; ``/health`` when its manifest cannot be read."""
        try:
            return self.manifest(digest).health_path
        except BundleError:
            return "/health"
