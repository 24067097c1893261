"""The mirror executor (``loadcast executor``): the edge agent's part that runs API mirrors.

It reads ``mirror-commands`` (every partition, no consumer group: commands are few and
keyed by region) and keeps the commands of its own region. Each one is checked in this
order, and a failed check is a REJECTED status on ``mirror-status`` with the reason (and a
log line), with nothing started:

1. signature: unsigned, unknown key, or a signature that does not match
   (:mod:`processors.signing`, Ed25519 public keys only);
2. expiry: ``expires_at`` passed;
3. sequence: not above the last accepted sequence of its (api, region) — a replay or an
   out-of-order delivery. The very same command again (same id and sequence) is not an
   attack but a redelivery: it changes nothing and the current state is re-announced;
4. for ACTIVATE, the bundle: fetched from the store by digest unless already unpacked,
   and rejected when its bytes do not hash to the digest.

An accepted command is written to ``<work_dir>/state.json`` (atomically, together with
the consumed offsets) *before* it is applied, then the API is reconciled to it: the bundle
is unpacked into ``<work_dir>/bundles/<hex digest>/``, instances are started (the
manifest's command, the port in its ``port_env`` variable, in a session of their own, log
in ``<work_dir>/logs/``), each reported STARTING and, once its health path answers 200,
READY with its URL; RETIRE (and HIBERNATE) reports DRAINING, waits ``drain_seconds`` so
sidecars stop sending new requests, stops the process (SIGTERM, then SIGKILL) and reports
RETIRED. Running instances are in the state file too (pid and process start time, so a
reused pid is never mistaken for one), so a restarted executor adopts the ones still
alive and healthy, re-announces them READY, and starts what its last accepted commands
still want: applying a command twice, or restarting, changes nothing that runs.

Commands are applied one at a time, in order (a start waits for its health check):
commands are rare, and order per (api, region) is what matters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge

from processors.signing import SignatureError, Verifier
from schemas.codec import Codec, CodecError
from streams.bundles import (
    MAX_BUNDLE_BYTES,
    BundleError,
    DigestMismatch,
    Manifest,
    check_digest,
    fetch,
    unpack,
)
from streams.kafka.deadletter import DeadLetterWriter
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name

log = logging.getLogger(__name__)

COMMANDS = Counter("loadcast_executor_commands_total", "Mirror commands by outcome",
                   ["executor", "outcome"])
INSTANCES = Gauge("loadcast_executor_instances", "API instances running", ["executor", "api"])
STATE_FILE = "state.json"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Instance:
    """One running API process."""

    api: str
    digest: str
    port: int
    pid: int
    create_time: float
    url: str
    command_id: str
    sequence: int
    capacity_rps: float | None = None


@dataclass
class ExecutorState:
    """What survives a restart: the last accepted command per API, the instances, and the
    next offset to read per partition."""

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[str, list[Instance]] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted,
                "instances": {a: [asdict(i) for i in v] for a, v in self.instances.items()},
                "offsets": {str(p): o for p, o in self.offsets.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecutorState:
        return cls(dict(data.get("accepted", {})),
                   {a: [Instance(**i) for i in v] for a, v in data.get("instances", {}).items()},
                   {int(p): int(o) for p, o in data.get("offsets", {}).items()})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ExecutorState:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return cls()


@dataclass(frozen=True)
class Verdict:
    """What to do with a command: ``apply``, ``duplicate``, ``reject`` or ``ignore``."""

    kind: str
    reason: str = ""


def check_command(record: Mapping[str, Any], *, region: str, verifier: Verifier,
                  last: Mapping[str, Any] | None, now: int) -> Verdict:
    """Signature, expiry and sequence checks of one decoded MirrorCommand (pure).

    ``last`` is the last command accepted for the record's API (None: none yet).
    """
    if record.get("region") != region:
        return Verdict("ignore", f"for region {record.get('region')!r}")
    try:
        verifier.verify(record)
    except SignatureError as e:
        return Verdict("reject", f"{e.reason}: {e.detail}")
    if int(record["expires_at"]) < now:
        return Verdict("reject", f"expired: expires_at {record['expires_at']} is "
                       f"{(now - int(record['expires_at'])) / 1000:.1f} s in the past")
    if last is not None:
        seq, last_seq = int(record["sequence"]), int(last["sequence"])
        if seq == last_seq and record["command_id"] == last["command_id"]:
            return Verdict("duplicate", "already applied")
        if seq <= last_seq:
            return Verdict("reject", f"replayed or out of order: sequence {seq} is not above "
                           f"the last accepted {last_seq}")
    if record["action"] == "ACTIVATE":
        try:
            check_digest(str(record["bundle_digest"]))
        except BundleError as e:
            return Verdict("reject", str(e))
        if int(record["desired_instances"]) < 1:
            return Verdict("reject", "ACTIVATE with desired_instances < 1")
    return Verdict("apply")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(inst: Instance) -> bool:
    try:
        p = psutil.Process(inst.pid)
        return abs(p.create_time() - inst.create_time) < 0.05 and \
            p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # instances are local


def _healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


StatusSink = Callable[[dict[str, Any]], None]


class Executor:
    """The executor of one region. :meth:`handle` is synchronous and usable without the
    consumer loop (tests, tools); :meth:`run` consumes until ``stop`` is set."""

    def __init__(
        self,
        kafka: KafkaSettings,
        codec: Codec,
        *,
        region: str,
        executor_id: str,
        verifier: Verifier,
        store_url: str,
        work_dir: Path | str,
        drain_seconds: float = 5.0,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        command_lookback_s: float = 600.0,
        stop_instances_on_exit: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.kafka = kafka
        self.codec = codec
        self.region = region
        self.id = executor_id
        self.verifier = verifier
        self.store_url = store_url
        self.work = Path(work_dir)
        self.drain_s = drain_seconds
        self.max_bundle_bytes = max_bundle_bytes
        self.lookback_s = command_lookback_s
        self.stop_on_exit = stop_instances_on_exit
        self.host = host
        self.state_path = self.work / STATE_FILE
        self.state = ExecutorState.load(self.state_path)
        self.commands_topic = topic_name(kafka, "mirror-commands")
        self.status_topic = topic_name(kafka, "mirror-status")
        self.dead_topic = topic_name(kafka, "dead-letter")
        self.producer = RecordProducer(kafka, f"executor-{executor_id}", linger_ms=1.0)
        self.consumer: Consumer | None = None
        self.statuses: list[dict[str, Any]] = []  # everything reported (tests, inspection)
        self._stop = threading.Event()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Adopt the instances of the state file that still run, reconcile every API to
        its last accepted command, and position the consumer."""
        self.work.mkdir(parents=True, exist_ok=True)
        for api, insts in list(self.state.instances.items()):
            kept = []
            for inst in insts:
                health = self._health_url(inst)
                if _alive(inst) and _healthy(health, 2.0):
                    kept.append(inst)
                    self._status(inst.api, inst.command_id, inst.sequence, "READY",
                                 url=inst.url, digest=inst.digest, capacity=inst.capacity_rps,
                                 reason="adopted after executor restart")
                else:
                    log.warning("instance %s of %s (pid %d) is gone or unhealthy", inst.url,
                                api, inst.pid)
                    self._kill(inst)
            self.state.instances[api] = kept
        self._save()
        for api in list(self.state.accepted):
            self.reconcile(api)
        self._open_consumer()

    def _open_consumer(self) -> None:
        c = Consumer(self.kafka.consumer_config(
            None, **{"client.id": f"executor-{self.id}", "enable.partition.eof": False,
                     "fetch.wait.max.ms": 50}))
        md = c.list_topics(self.commands_topic, timeout=10)
        t = md.topics.get(self.commands_topic)
        if t is None or t.error is not None:
            c.close()
            raise RuntimeError(f"topic {self.commands_topic} does not exist")
        parts = sorted(t.partitions)
        known = [TopicPartition(self.commands_topic, p, self.state.offsets[p])
                 for p in parts if p in self.state.offsets]
        new = [TopicPartition(self.commands_topic, p, now_ms() - int(self.lookback_s * 1000))
               for p in parts if p not in self.state.offsets]
        if new:
            try:
                located = c.offsets_for_times(new, timeout=10)
                new = [TopicPartition(tp.topic, tp.partition,
                                      tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                       for tp in located]
            except KafkaException as e:
                log.warning("offsets_for_times failed (%s): reading commands from the start", e)
                new = [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in new]
        c.assign(known + new)
        self.consumer = c

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume commands until ``stop`` (or :meth:`stop`) is set, then close."""
        stop = stop or self._stop
        if self.consumer is None:
            self.start()
        assert self.consumer is not None
        last_check = time.monotonic()
        try:
            while not stop.is_set() and not self._stop.is_set():
                msg = self.consumer.poll(0.2)
                if msg is not None:
                    err = msg.error()
                    if err is None:
                        self.handle(msg.key(), msg.value(), msg.partition() or 0,
                                    msg.offset() or 0)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("command consumer: %s", err)
                self.producer.poll(0)
                if time.monotonic() - last_check > 2.0:
                    last_check = time.monotonic()
                    for api in list(self.state.accepted):
                        self.check_instances(api)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Close Kafka clients; stop the instances only with ``stop_instances_on_exit``."""
        if self.stop_on_exit:
            self.stop_all()
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.producer.flush(10)

    def stop_all(self) -> None:
        """Stop every instance at once (no drain) and forget them."""
        for insts in self.state.instances.values():
            for inst in insts:
                self._kill(inst)
        self.state.instances = {}
        self._save()

    # ----------------------------------------------------------------- commands

    def handle(self, key: bytes | None, value: bytes | None, partition: int = 0,
               offset: int = -1) -> Verdict:
        """One record of mirror-commands: decode, check, accept, apply."""
        try:
            if value is None:
                raise CodecError("invalid", "record has no value")
            name = self.codec.name_of(value)
            if name != "loadcast.MirrorCommand":
                raise CodecError("wrong_schema", f"{name} on {self.commands_topic}")
            record = self.codec.decode(value, "MirrorCommand")
        except CodecError as e:
            self._dead_letter(key, value or b"", e.reason, str(e), partition, offset)
            self._advance(partition, offset)
            return Verdict("reject", f"{e.reason}: {e}")
        api = str(record["api"])
        verdict = check_command(record, region=self.region, verifier=self.verifier,
                                last=self.state.accepted.get(api), now=now_ms())
        if verdict.kind == "apply" and record["action"] == "ACTIVATE":
            verdict = self._ensure_bundle(str(record["bundle_digest"]))
        COMMANDS.labels(self.id, verdict.kind).inc()
        if verdict.kind == "ignore":
            self._advance(partition, offset)
            return verdict
        if verdict.kind == "reject":
            log.warning("rejected %s %s of %s (sequence %s): %s", record["action"],
                        record["command_id"], api, record["sequence"], verdict.reason)
            self._status(api, record["command_id"], record["sequence"], "REJECTED",
                         digest=record["bundle_digest"] or None, reason=verdict.reason)
            self._advance(partition, offset)
            return verdict
        if verdict.kind == "duplicate":
            log.info("command %s delivered again: nothing to do", record["command_id"])
            for inst in self.state.instances.get(api, []):
                self._status(api, inst.command_id, inst.sequence, "READY", url=inst.url,
                             digest=inst.digest, capacity=inst.capacity_rps,
                             reason=f"duplicate of {record['command_id']}: already applied")
            self._advance(partition, offset)
            return verdict
        # Accepted: on disk (with the offset) before anything runs, so a crash from here
        # on is reconciled from the file after the restart.
        kept = {k: v for k, v in record.items() if k not in ("signature", "forecast")}
        self.state.accepted[api] = kept
        self.state.offsets[partition] = offset + 1
        self._save()
        log.info("accepted %s %s of %s: %s", record["action"], record["command_id"], api,
                 record["reason"])
        self._status(api, record["command_id"], record["sequence"], "ACCEPTED",
                     digest=record["bundle_digest"] or None, reason=str(record["reason"]))
        self.reconcile(api)
        return verdict

    def _advance(self, partition: int, offset: int) -> None:
        if offset >= 0:
            self.state.offsets[partition] = offset + 1
            self._save()

    def _bundle_dir(self, digest: str) -> Path:
        return self.work / "bundles" / check_digest(digest)

    def _ensure_bundle(self, digest: str) -> Verdict:
        """Fetch, verify and unpack a bundle not yet unpacked; a verdict on failure."""
        dest = self._bundle_dir(digest)
        if dest.is_dir():
            return Verdict("apply")  # verified when it was unpacked
        try:
            data = fetch(self.store_url, digest, max_bytes=self.max_bundle_bytes)
            unpack(data, dest)
        except DigestMismatch as e:
            return Verdict("reject", f"bundle digest mismatch: {e}")
        except BundleError as e:
            return Verdict("reject", f"bundle not available: {e}")
        return Verdict("apply")

    # ----------------------------------------------------------------- reconcile

    def reconcile(self, api: str) -> None:
        """Make what runs for ``api`` match its last accepted command."""
        cmd = self.state.accepted.get(api)
        if cmd is None:
            return
        insts = [i for i in self.state.instances.get(api, []) if _alive(i)]
        self.state.instances[api] = insts
        want = int(cmd["desired_instances"]) if cmd["action"] == "ACTIVATE" else 0
        digest = str(cmd["bundle_digest"])
        current = [i for i in insts if i.digest == digest] if want else []
        stale = [i for i in insts if i not in current]
        for _ in range(max(0, want - len(current))):
            inst = self._start_instance(api, cmd)
            if inst is None:
                break
            current.append(inst)
        extra = current[want:]
        for inst in [*stale, *extra]:
            self._retire(inst, cmd)
        INSTANCES.labels(self.id, api).set(len(self.state.instances.get(api, [])))

    def check_instances(self, api: str) -> None:
        """An instance whose process died is reported FAILED and replaced."""
        insts = self.state.instances.get(api, [])
        dead = [i for i in insts if not _alive(i)]
        if not dead:
            return
        for inst in dead:
            self._status(api, inst.command_id, inst.sequence, "FAILED", url=inst.url,
                         digest=inst.digest, reason=f"process {inst.pid} exited")
        self.state.instances[api] = [i for i in insts if i not in dead]
        self._save()
        self.reconcile(api)

    def _manifest(self, digest: str) -> Manifest:
        from streams.bundles import read_manifest

        return read_manifest(self._bundle_dir(digest))

    def _health_url(self, inst: Instance) -> str:
        try:
            path = self._manifest(inst.digest).health_path
        except BundleError:
            path = "/health"
        return inst.url + path

    def _start_instance(self, api: str, cmd: Mapping[str, Any]) -> Instance | None:
        digest, cid, seq = str(cmd["bundle_digest"]), str(cmd["command_id"]), int(cmd["sequence"])
        directory = self._bundle_dir(digest)
        try:
            if not directory.is_dir():  # e.g. the work dir was cleaned: fetch again
                verdict = self._ensure_bundle(digest)
                if verdict.kind == "reject":
                    raise BundleError(verdict.reason)
            manifest = self._manifest(digest)
        except BundleError as e:
            self._status(api, cid, seq, "FAILED", digest=digest, reason=str(e))
            return None
        port = _free_port(self.host)
        url = f"http://{self.host}:{port}"
        argv = [sys.executable if a == "{python}" else a.replace("{port}", str(port))
                for a in manifest.command]
        env = {**os.environ, **manifest.env, manifest.port_env: str(port),
               "LOADCAST_INSTANCE": f"{api}@{self.region}:{port}"}
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        logfile = logs / f"{api}-{port}.log"
        self._status(api, cid, seq, "STARTING", url=url, digest=digest,
                     capacity=manifest.capacity_rps)
        try:
            with logfile.open("ab") as out:
                proc = subprocess.Popen(argv, cwd=directory, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        except OSError as e:
            self._status(api, cid, seq, "FAILED", url=url, digest=digest,
                         reason=f"cannot start {argv[0]}: {e.strerror}")
            return None
        inst = Instance(api, digest, port, proc.pid, psutil.Process(proc.pid).create_time(),
                        url, cid, seq, manifest.capacity_rps)
        # In the state file before the health wait: a crash now still knows the pid.
        self.state.instances.setdefault(api, []).append(inst)
        self._save()
        deadline = time.monotonic() + manifest.startup_timeout_s
        health = url + manifest.health_path
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(health, 0.5):
                self._status(api, cid, seq, "READY", url=url, digest=digest,
                             capacity=manifest.capacity_rps)
                log.info("%s ready at %s (pid %d)", api, url, proc.pid)
                return inst
            time.sleep(0.05)
        tail = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
        code = proc.poll()
        reason = (f"exited with {code} before its health check passed" if code is not None
                  else f"{health} not healthy within {manifest.startup_timeout_s:g} s")
        self._status(api, cid, seq, "FAILED", url=url, digest=digest,
                     reason=f"{reason}; log: {tail.strip()[-300:]}")
        self._kill(inst)
        self.state.instances[api].remove(inst)
        self._save()
        return None

    def _retire(self, inst: Instance, cmd: Mapping[str, Any]) -> None:
        cid, seq = str(cmd["command_id"]), int(cmd["sequence"])
        self._status(inst.api, cid, seq, "DRAINING", url=inst.url, digest=inst.digest,
                     reason=f"stopping in {self.drain_s:g} s")
        self.producer.flush(5)  # sidecars must hear of it before the drain wait
        self._stop.wait(self.drain_s)
        self._kill(inst)
        insts = self.state.instances.get(inst.api, [])
        if inst in insts:
            insts.remove(inst)
        self._save()
        self._status(inst.api, cid, seq, "RETIRED", url=inst.url, digest=inst.digest)
        log.info("%s instance %s retired", inst.api, inst.url)

    def _kill(self, inst: Instance) -> None:
        if not _alive(inst):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(inst.pid, signal.SIGTERM)  # its own session: the whole group
        try:
            psutil.Process(inst.pid).wait(10)
        except psutil.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(inst.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                psutil.Process(inst.pid).wait(5)
        except psutil.Error:
            pass

    # ----------------------------------------------------------------- output

    def _save(self) -> None:
        self.state.save(self.state_path)

    def _status(self, api: str, command_id: str, sequence: int, state: str, *,
                url: str | None = None, digest: str | None = None, reason: str = "",
                capacity: float | None = None) -> None:
        rec = {"executor_id": self.id, "region": self.region, "api": api,
               "command_id": command_id, "sequence": int(sequence), "state": state,
               "at": now_ms(), "instance_url": url, "bundle_digest": digest,
               "reason": reason[:1000], "capacity_rps": capacity}
        self.statuses.append(rec)
        self.producer.produce(self.status_topic, self.codec.encode("MirrorStatus", rec),
                              self.region.encode())
        self.producer.poll(0)

    def _dead_letter(self, key: bytes | None, value: bytes, reason: str, detail: str,
                     partition: int, offset: int) -> None:
        log.warning("mirror command at %d@%d to dead-letter: %s", partition, offset, detail)
        DeadLetterWriter(self.producer, self.dead_topic, client=f"executor-{self.id}").send(
            key, value, reason=reason, detail=detail, source_topic=self.commands_topic,
            partition=partition, offset=offset, consumer=f"executor-{self.id}")
        self.producer.poll(0)


def running_pids(work_dir: Path | str) -> list[int]:
    """Pids of the live instances recorded in an executor's state file (for tools and
    tests that must clean up after a killed executor)."""
    state = ExecutorState.load(Path(work_dir) / STATE_FILE)
    return [i.pid for insts in state.instances.values() for i in insts if _alive(i)]


def kill_recorded(work_dir: Path | str) -> int:
    """SIGKILL every live instance recorded in an executor's state file; how many."""
    state = ExecutorState.load(Path(work_dir) / STATE_FILE)
    n = 0
    for insts in state.instances.values():
        for inst in insts:
            if _alive(inst):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(inst.pid, signal.SIGKILL)
                n += 1
    return n
