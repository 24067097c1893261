"""Broker outages, seen once per process: bounded logs and a hook for the broker's return.

Every Kafka client of a process (confluent-kafka through
:meth:`streams.kafka.settings.KafkaSettings.client_config`, aiokafka inside Faust through
:func:`quiet_aiokafka`) reports connection failures here instead of logging each one.
The first failure is logged; while the broker stays away one line at most every
``LOG_EVERY_S`` (30 s) says for how long and how many errors; its return is logged once.
Other errors pass through untouched.

While the broker is away a prober thread tries a TCP connection to the bootstrap servers
every half second. When one answers, the topics loadcast needs are created again (a broker
that lost its storage comes back empty) and the ``on_return`` callbacks run, each told
whether the broker had lost the topics (``lost_log``: offsets start again at 0).

>>> w = BrokerWatch("doc", log_every_s=30.0)
>>> w.failure("Connect to 127.0.0.1:1 failed: Connection refused", now=0.0)
True
>>> w.failure("Connect to 127.0.0.1:1 failed: Connection refused", now=10.0)
False
>>> w.failure("Connect to 127.0.0.1:1 failed: Connection refused", now=31.0)
True
>>> w.errors
3
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streams.kafka.clients import new_admin
from streams.kafka.topics import ensure_topics, topic_name

if TYPE_CHECKING:
    from confluent_kafka import KafkaError

    from streams.kafka.settings import KafkaSettings

log = logging.getLogger("loadcast.broker")

LOG_EVERY_S = 30.0
PROBE_EVERY_S = 0.5
#: Failures reported this soon after the broker answered again are late echoes of the
#: outage (clients retry on their own back-off), counted but not a new outage.
GRACE_S = 5.0
#: librdkafka's log lines go to this logger (filtered here), not straight to stderr.
RDKAFKA_LOGGER = logging.getLogger("loadcast.rdkafka")

# What a lost broker looks like in librdkafka's and aiokafka's messages.
_TRANSPORT = re.compile(
    r"connect to .* failed|connection refused|unable connect|transport failure|"
    r"all broker connections are down|disconnected|unable to (update|request) metadata|"
    r"NodeNotReady|KafkaConnectionError|failed fetch messages|broken pipe|"
    r"reset by peer|connect call failed|waiting for coordinator",
    re.IGNORECASE,
)

ReturnHook = Callable[[bool], None]
_reentry = threading.local()


class BrokerWatch:
    """Connection state of one process's Kafka clients (thread-safe)."""

    def __init__(self, name: str = "loadcast", *, log_every_s: float = LOG_EVERY_S) -> None:
        self.name = name
        self.log_every_s = log_every_s
        self.kafka: KafkaSettings | None = None
        self.lost_at: float | None = None  # monotonic; None while the broker answers
        self.errors = 0  # failures reported during the current outage
        self.outages = 0
        self._last_log = 0.0
        self._back_at = -GRACE_S
        self.late_errors = 0
        self._hooks: list[Any] = []  # ReturnHook or a WeakMethod of one
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ reports

    @property
    def lost(self) -> bool:
        return self.lost_at is not None

    @property
    def just_back(self) -> bool:
        """The broker answered again less than GRACE_S ago: what clients report now is
        the outage's echo (a group member the new broker does not know, a commit timer
        that overran while it was away)."""
        return self.lost_at is None and time.monotonic() - self._back_at < GRACE_S

    def failure(self, text: str, now: float | None = None) -> bool:
        """A client could not reach the broker. Returns True when this one was logged."""
        now = time.monotonic() if now is None else now
        if getattr(_reentry, "active", False):  # a report while logging one: count only
            self.errors += 1
            return False
        message: tuple[Any, ...] | None = None
        with self._lock:
            if self.lost_at is None and now - self._back_at < GRACE_S:
                self.late_errors += 1
                return False
            self.errors += 1
            if self.lost_at is None:
                self.lost_at = self._last_log = now
                self.outages += 1
                message = ("%s: broker unreachable (%s); logging this again at most every "
                           "%.0f s until it answers", self.name, text.strip()[:300],
                           self.log_every_s)
                start = True
            elif now - self._last_log >= self.log_every_s:
                self._last_log = now
                message = ("%s: broker still unreachable after %.0f s (%d errors so far): %s",
                           self.name, now - self.lost_at, self.errors, text.strip()[:300])
                start = False
            else:
                return False
        # logged outside the lock, and never re-entered: a handler that logs again (or
        # writes to a redirected stderr) cannot deadlock or recurse
        _reentry.active = True
        try:
            log.error(*message)
        finally:
            _reentry.active = False
        if start:
            self._start_prober()
        return True

    def error_cb(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb``: transport errors are outages, others are logged."""
        from confluent_kafka import KafkaError

        transport = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                     KafkaError._RESOLVE, KafkaError._TIMED_OUT)
        if err.code() in transport:
            self.failure(err.str())
        elif not self.lost:
            log.error("%s: Kafka client error: %s", self.name, err.str())

    # ------------------------------------------------------------------ return

    def on_return(self, hook: ReturnHook, *, weak: bool = False) -> None:
        """Call ``hook(lost_log)`` (from the prober thread) each time the broker returns;
        ``weak``: a bound method whose object may go away (then it is dropped)."""
        with self._lock:
            self._hooks = [h for h in self._hooks
                           if not isinstance(h, weakref.WeakMethod) or h() is not None]
            self._hooks.append(weakref.WeakMethod(hook) if weak else hook)

    def attach(self, kafka: KafkaSettings) -> None:
        """The settings whose bootstrap servers are probed and whose topics are re-created."""
        self.kafka = kafka

    def _start_prober(self) -> None:
        if self.kafka is None or (self._prober is not None and self._prober.is_alive()):
            return
        self._prober = threading.Thread(target=self._probe, name="broker-watch", daemon=True)
        self._prober.start()

    def _reachable(self) -> bool:
        assert self.kafka is not None
        for hp in self.kafka.bootstrap_servers.split(","):
            host, _, port = hp.strip().rpartition(":")
            with contextlib.suppress(OSError, ValueError), socket.create_connection(
                (host.strip("[]"), int(port)), 0.5
            ):
                return True
        return False

    def _probe(self) -> None:
        while not self._stop.wait(PROBE_EVERY_S):
            if self.lost_at is None:
                return
            if not self._reachable():
                continue
            try:
                lost_log = self._lost_topics()
            except Exception as e:  # answers TCP but not Kafka yet: try again
                log.debug("broker answers TCP but not metadata yet: %s", e)
                continue
            # Hooks first: a process that must start again at offset 0 does so before its
            # topics exist again (nothing can be fetched from a topic that is not there).
            for h in list(self._hooks):
                hook = h() if isinstance(h, weakref.WeakMethod) else h
                if hook is None:
                    continue
                try:
                    hook(lost_log)
                except Exception:
                    log.exception("%s: broker-return hook failed", self.name)
            if lost_log:
                assert self.kafka is not None
                try:
                    ensure_topics(self.kafka)
                except Exception as e:
                    log.warning("%s: re-creating topics failed (%s); trying again", self.name, e)
                    continue
            with self._lock:
                away = time.monotonic() - (self.lost_at or time.monotonic())
                errors, self.errors, self.lost_at = self.errors, 0, None
                self._back_at = time.monotonic()
            log.warning("%s: broker back after %.0f s (%d errors while away)%s", self.name,
                        away, errors, "; it had lost its topics: re-created" if lost_log else "")
            return

    def _lost_topics(self) -> bool:
        """True when the broker answers without loadcast's telemetry topic (it lost its
        storage); raises while it does not answer metadata."""
        assert self.kafka is not None
        md = new_admin(_quiet_config(self.kafka)).list_topics(timeout=3)
        if not md.brokers:
            raise RuntimeError("no brokers in metadata")
        return topic_name(self.kafka, "telemetry") not in md.topics

    def close(self) -> None:
        self._stop.set()


def _quiet_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Client config for the prober: its own failures are not outage reports."""
    conf = {k: v for k, v in kafka.client_config().items() if k not in ("error_cb", "logger")}
    conf["log_level"] = 0
    return conf


#: The process's watch (one per process: logs and probes once, whatever the clients).
WATCH = BrokerWatch()


def watch(kafka: KafkaSettings | None = None, name: str | None = None) -> BrokerWatch:
    """The process-wide watch, attached to ``kafka`` and named ``name`` when given."""
    if kafka is not None and WATCH.kafka is None:
        WATCH.attach(kafka)
    if name is not None:
        WATCH.name = name
    return WATCH


class OutageFilter(logging.Filter):
    """Turns connection-failure records of Kafka client loggers into :meth:`failure`
    reports (logged only as the watch decides); while the broker is away, and for
    GRACE_S after it is back, every other warning or error of those loggers is counted
    and held back too."""

    def __init__(self, w: BrokerWatch | None = None, *, hold_all: bool = True) -> None:
        super().__init__()
        self.w = w or WATCH
        self.hold_all = hold_all  # while away, hold back every warning (client loggers)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            text = record.getMessage()
        except Exception:
            return True
        if _TRANSPORT.search(text):
            self.w.failure(text)
            return False
        if self.hold_all and (self.w.lost or self.w.just_back):
            self.w.failure(text)  # counted (late errors while just back), not logged
            return False
        return True


_FILTER = OutageFilter()
RDKAFKA_LOGGER.addFilter(_FILTER)
# loadcast's own loggers that report Kafka failures (the sink's failed commits): only
# those records are outage reports, anything else they log passes
for _name in ("sinks.sink", "sinks.writer", "sinks.offsets"):
    logging.getLogger(_name).addFilter(OutageFilter(hold_all=False))


def quiet_aiokafka() -> None:
    """Route the connection errors of aiokafka and Faust's transport (loggers that exist
    once Faust is imported) through the watch."""
    names = [n for n in list(logging.root.manager.loggerDict)
             if n == "aiokafka" or n.startswith(("aiokafka.", "faust.transport"))]
    names += [n for n in list(logging.root.manager.loggerDict)
              if n.startswith(("mode.timers", "faust.sensors"))]
    for n in ["aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.client", *names]:
        lg = logging.getLogger(n)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
