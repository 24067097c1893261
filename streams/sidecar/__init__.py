"""The routing sidecar: score subscriber, routing policies, built-in aiohttp proxy and the
HAProxy runtime-API adapter. ``loadcast sidecar`` runs one (see :mod:`loadcast.cli.sidecar`).

Light to import: the settings model only; the rest loads on use.
"""

from streams.sidecar.config import SidecarSettings, Upstream, UpstreamConfigError

__all__ = ["SidecarSettings", "Upstream", "UpstreamConfigError"]
