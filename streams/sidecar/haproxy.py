"""HAProxy as the data plane: config writer, process runner, runtime-API adapter.

The sidecar writes one backend per API (``be_<api>``, ``balance roundrobin``, a server
per endpoint with initial weight 100: HAProxy weights are 0-256 and a relative weight
computed from an initial 1 would round to 0) plus a ``be_<api>_first`` twin with
``balance first`` for requests that switch dynamic routing off. It starts HAProxy (or
attaches to a running one by its admin socket) and pushes weight changes through the
runtime API, several ``set server BACKEND/SERVER weight N`` commands in one write.

>>> from streams.sidecar.config import Upstream
>>> cfg = render_config([Upstream(id="a", url="http://127.0.0.1:9001", api="orders")],
...                     bind="127.0.0.1:8080", socket_path="/tmp/h.sock")
>>> "server a 127.0.0.1:9001 weight 100" in cfg
True
>>> weight_commands({"orders": {"a": 17}})
'set server be_orders/a weight 17'
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from streams.sidecar.child import ChildProcess
from streams.sidecar.config import Upstream
from streams.sidecar.dataplane import DataPlaneError
from streams.sidecar.edge_config import CompressionSettings, EdgeCacheSettings
from streams.sidecar.proxy import API_HEADER, DYNAMIC_HEADER

INITIAL_WEIGHT = 100


class HAProxyError(DataPlaneError):
    """HAProxy could not be started, or the runtime API refused a command."""


def backend_name(api: str) -> str:
    return f"be_{api}"


def render_config(
    upstreams: Sequence[Upstream],
    *,
    bind: str,
    socket_path: str | Path,
    threads: int = 2,
    connect_timeout_s: float = 5.0,
    request_timeout_s: float = 30.0,
    eject_after_failures: int = 5,
    maxconn: int = 4096,
    check: bool = True,
    cache: EdgeCacheSettings | None = None,
    compression: CompressionSettings | None = None,
) -> str:
    """The haproxy.cfg text for ``upstreams`` (grouped by API; first API is the default).

    Retries: ``retry-on conn-failure empty-response`` with ``option redispatch`` sends a
    refused connection to another server; HAProxy itself never resends a request whose
    body it no longer holds. Outlier ejection: passive ``observe layer4`` health with
    ``error-limit``/``on-error mark-down`` plus active checks that re-admit; the
    ``_first`` twin ``track``s them (each server is checked once, not twice).

    ``timeout connect`` must outlast the SYN retransmits (1 s, then 3 s): a backend that is
    merely saturated (accept queue full, SYN dropped) then answers late instead of
    counting as a layer-4 error. With the former 1000 ms, every such connect timed out,
    ``observe layer4`` marked the saturated servers down one after the other, and HAProxy
    answered 503 to most requests (issue 14: 67-88 % non-2xx where plain HAProxy had none).
    """
    apis: dict[str, list[Upstream]] = {}
    for u in upstreams:
        apis.setdefault(u.api, []).append(u)
    if not apis:
        raise ValueError("no upstreams to write a config for")
    ct = max(1, round(connect_timeout_s * 1000))
    rt = max(1, round(request_timeout_s * 1000))
    lines = _global_and_defaults(socket_path, threads, maxconn, ct, rt)
    lines += _frontend(upstreams, list(apis), bind)
    lines += _backends(apis, check, eject_after_failures, _edge_lines(apis, cache, compression))
    lines += _cache_sections(apis, cache)
    return "\n".join(lines) + "\n"


# HAProxy matches compression types exactly: what a prefix like "text/" stands for
_TYPE_PREFIXES = {"text/": ("text/html", "text/plain", "text/css", "text/javascript",
                            "text/xml", "text/csv")}


def _cache_name(api: str) -> str:
    return f"lc_cache_{api}"


def _edge_lines(apis: Mapping[str, list[Upstream]], cache: EdgeCacheSettings | None,
                compression: CompressionSettings | None) -> dict[str, list[str]]:
    """Per API, the backend lines of HAProxy's own cache and compression for the same rules
    as the built-in proxy where HAProxy has them: its cache stores only GET 200s with an
    explicit lifetime or a validator, never with Authorization, honours no-store/private,
    and handles Vary on Accept-Encoding (``process-vary``); its compression (gzip only)
    skips encoded responses and adds ``Vary: Accept-Encoding``. Not in HAProxy: stale-
    while-revalidate, stale-if-error, single-flight, brotli/zstd, a minimum size."""
    out: dict[str, list[str]] = {}
    for api in apis:
        lines: list[str] = []
        cached = cache is not None and cache.enabled and (not cache.apis or api in cache.apis)
        zipped = compression is not None and compression.enabled and \
            "gzip" in compression.algorithms
        if cached:
            lines.append(f"    filter cache {_cache_name(api)}")
        if zipped:
            lines.append("    filter compression")
        if cached:
            lines += [f"    http-request cache-use {_cache_name(api)}",
                      f"    http-response cache-store {_cache_name(api)}"]
        if zipped and compression is not None:
            types: list[str] = []
            for t in compression.types:
                types += _TYPE_PREFIXES.get(t, (t,) if not t.endswith("/") else ())
            lines += ["    compression algo gzip", f"    compression type {' '.join(types)}"]
        out[api] = lines
    return out


def _cache_sections(apis: Mapping[str, list[Upstream]],
                    cache: EdgeCacheSettings | None) -> list[str]:
    if cache is None or not cache.enabled:
        return []
    lines: list[str] = []
    for api in apis:
        if cache.apis and api not in cache.apis:
            continue
        lines += [f"cache {_cache_name(api)}",
                  f"    total-max-size {max(1, min(4095, cache.max_bytes >> 20))}",
                  f"    max-object-size {min(cache.max_object_bytes, cache.max_bytes // 2)}",
                  "    max-age 86400",
                  "    process-vary on",
                  ""]
    return lines


def _global_and_defaults(socket_path: str | Path, threads: int, maxconn: int,
                         connect_ms: int, server_ms: int) -> list[str]:
    ct, rt = connect_ms, server_ms
    return [
        "global",
        f"    stats socket {socket_path} mode 600 level admin",
        "    stats timeout 30s",
        f"    nbthread {threads}",
        f"    maxconn {maxconn}",
        "",
        "defaults",
        "    mode http",
        f"    timeout connect {ct}ms",
        "    timeout client 30s",
        f"    timeout server {rt}ms",
        "    timeout http-keep-alive 30s",
        "    option http-keep-alive",
        "    http-reuse always",
        "    option redispatch 1",
        "    retries 2",
        "    retry-on conn-failure empty-response",
        "",
    ]


def _frontend(upstreams: Sequence[Upstream], apis: list[str], bind: str) -> list[str]:
    lines = [
        "frontend fe_loadcast",
        f"    bind {bind}",
        # Never an open proxy: HAProxy only ever connects to the servers below, and a
        # request target names nothing else either. CONNECT gets 405; a target that is
        # not a path gets 400 unless it is absolute-form naming an upstream, and then
        # only its path and query go on.
        "    http-request deny deny_status 405 if METH_CONNECT",
        "    acl lc_origin_form url_beg /",
        f"    acl lc_upstream_target url_beg -i {' '.join(_absolute_prefixes(upstreams))}",
        "    http-request deny deny_status 400 if !lc_origin_form !lc_upstream_target",
        "    http-request set-uri %[pathq] if !lc_origin_form",
    ]
    first_api = next(iter(apis))
    for api in apis:
        lines.append(
            f"    use_backend {backend_name(api)}_first if "
            f"{{ req.hdr({DYNAMIC_HEADER}) -i off }} {{ req.hdr({API_HEADER}) -m str {api} }}"
        )
        if api == first_api:
            lines.append(
                f"    use_backend {backend_name(api)}_first if "
                f"{{ req.hdr({DYNAMIC_HEADER}) -i off }} !{{ req.hdr({API_HEADER}) -m found }}"
            )
        lines.append(
            f"    use_backend {backend_name(api)} if {{ req.hdr({API_HEADER}) -m str {api} }}"
        )
    return [*lines, f"    default_backend {backend_name(first_api)}", ""]


def _backends(apis: Mapping[str, list[Upstream]], check: bool,
              eject_after_failures: int, edge: Mapping[str, list[str]]) -> list[str]:
    lines: list[str] = []
    for api, ups in apis.items():
        for suffix, balance in (("", "roundrobin"), ("_first", "first")):
            lines += [f"backend {backend_name(api)}{suffix}", f"    balance {balance}"]
            lines += edge.get(api, [])
            for u in ups:
                srv = f"    server {u.id} {u.host}:{u.port} weight {INITIAL_WEIGHT}"
                if check and suffix:  # the twin follows the main backend's checks
                    srv += f" track {backend_name(api)}/{u.id}"
                elif check:
                    srv += (
                        f" check inter 1s fall 3 rise 2 observe layer4"
                        f" error-limit {eject_after_failures} on-error mark-down"
                    )
                lines.append(srv)
            lines.append("")
    return lines


def _absolute_prefixes(upstreams: Sequence[Upstream]) -> list[str]:
    """The absolute-form target prefixes that name a configured upstream."""
    out: list[str] = []
    for u in upstreams:
        for end in ("/", "?"):
            p = f"{u.url}{end}"
            if p not in out:
                out.append(p)
    return out


def weight_commands(weights: Mapping[str, Mapping[str, int]]) -> str:
    """``set server`` commands for ``{api: {server: weight}}``, ';'-joined in one line."""
    cmds = [
        f"set server {backend_name(api)}/{srv} weight {int(w)}"
        for api, ws in weights.items()
        for srv, w in ws.items()
    ]
    return ";".join(cmds)


class RuntimeAPI:
    """HAProxy's runtime API over its admin socket (non-interactive: one write, one
    answer, connection closed)."""

    def __init__(self, socket_path: str | Path, timeout_s: float = 2.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s

    async def command(self, line: str) -> str:
        """Send one line (commands separated by ';'); returns HAProxy's answer."""
        async def talk() -> bytes:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                return await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
        # arrives as the answer does, and the sidecar's push loop then never stopped.
        async with asyncio.timeout(self.timeout_s):
            answer = await talk()
        return answer.decode(errors="replace")

    def command_sync(self, line: str) -> str:
        """Blocking variant (for set-up, tests and benchmarks)."""
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout_s)
            s.connect(self.socket_path)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    async def set_weights(self, weights: Mapping[str, Mapping[str, int]]) -> None:
        """Push ``{api: {server: weight}}`` in one write; raises on any refusal."""
        line = weight_commands(weights)
        if not line:
            return
        answer = (await self.command(line)).strip()
        if answer:  # success is silent; anything else is an error message
            raise HAProxyError(f"runtime API refused weights: {answer[:300]}")

    async def stats(self) -> list[dict[str, str]]:
        return parse_stats(await self.command("show stat"))

    def stats_sync(self) -> list[dict[str, str]]:
        return parse_stats(self.command_sync("show stat"))


def parse_stats(text: str) -> list[dict[str, str]]:
    """``show stat`` CSV (header line starts with '# ') into dicts."""
    text = text.lstrip("# ")
    return [dict(row) for row in csv.DictReader(io.StringIO(text)) if row.get("pxname")]


def server_counts(stats: Sequence[Mapping[str, str]], api: str) -> dict[str, int]:
    """Requests (HTTP responses) each server of ``be_<api>`` has answered, from HAProxy's
    own counters."""
    out: dict[str, int] = {}
    for row in stats:
        if row.get("pxname") != backend_name(api) or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        total = sum(int(row.get(f"hrsp_{c}xx") or 0) for c in range(1, 6))
        total += int(row.get("hrsp_other") or 0)
        out[row["svname"]] = total
    return out


def haproxy_binary(name: str = "haproxy") -> str | None:
    """Path of the haproxy binary, or None if it is not installed."""
    found = shutil.which(name)
    if found is None and Path("/usr/sbin/haproxy").exists() and name == "haproxy":
        return "/usr/sbin/haproxy"
    return found


class HAProxyProcess(ChildProcess):
    """A HAProxy process of our own: config in a temp dir, foreground, stopped with us."""

    def __init__(self, config_text: str, *, binary: str = "haproxy",
                 workdir: Path | None = None) -> None:
        path = haproxy_binary(binary)
        if path is None:
            raise HAProxyError(f"{binary} not found: install haproxy (make system-deps)")
        self.binary = path
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="loadcast-haproxy-")
        self.dir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.config_path = self.dir / "haproxy.cfg"
        self.config_path.write_text(config_text)
        super().__init__(self.dir / "haproxy.log")

    def check(self) -> None:
        """Validate the config with ``haproxy -c``."""
        r = subprocess.run([self.binary, "-c", "-q", "-f", str(self.config_path)],
                           capture_output=True, timeout=30, check=False)
        if r.returncode != 0:
            out = (r.stderr + r.stdout).decode(errors="replace")[-800:]
            raise HAProxyError(f"haproxy rejects the config (exit {r.returncode}): {out}")

    def start(self, socket_path: str | Path, timeout_s: float = 10.0) -> None:
        self.check()
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        api = RuntimeAPI(socket_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HAProxyError(f"haproxy exited at start: {self.log_tail()}")
            try:
                if "Name: HAProxy" in api.command_sync("show info"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise HAProxyError(f"haproxy did not open {socket_path} within {timeout_s}s")

    def stop(self) -> None:
        self.terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
