"""The mirror executor on the real embedded broker, with real bundles fetched over HTTP and
real API processes on 127.0.0.1: what it rejects (and says why), idempotence, restart."""

from __future__ import annotations

import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from processors.signing import Signer, Verifier, generate_keypair
from schemas.codec import Codec
from streams.bundles import DirectoryStore, bundle_app, digest_of, pack
from streams.executor.service import Executor
from streams.executor.state import ExecutorState
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.kafka_helpers import read_topic
from tests.mirror_helpers import (
    FIXTURE,
    app_in_thread,
    bundle_server,
    cleanup_instances,
    command,
    processes_in,
    produce,
    push_fixture,
    start_executor,
    statuses,
    stop,
    wait_for,
)

PRIVATE, PUBLIC = generate_keypair()
OTHER_PRIVATE, _ = generate_keypair()


class TamperedStore:
    """A real store, except that it answers ``lie_for`` with other bytes."""

    def __init__(self, real: DirectoryStore, lie_for: str) -> None:
        self.real, self.lie_for = real, lie_for

    def put(self, data: bytes) -> str:
        return self.real.put(data)

    def get(self, digest: str) -> bytes:
        return self.real.get(self.real.digests()[0]) if digest == self.lie_for \
            else self.real.get(digest)

    def has(self, digest: str) -> bool:
        return True

    def digests(self) -> list[str]:
        return self.real.digests()


@pytest.fixture
def tampered_server(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(url, good digest, a digest the server answers with the good bundle's bytes)."""
    store = DirectoryStore(tmp_path / "store")
    good = store.put(pack(FIXTURE))
    evil = digest_of(b"what the planner really signed")
    with app_in_thread(bundle_app(TamperedStore(store, evil))) as url:
        yield url, good, evil


def test_rejects_bad_commands_says_why_and_starts_nothing(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path,
    tampered_server: tuple[str, str, str],
) -> None:
    url, good_digest, evil_digest = tampered_server
    signer, forger = Signer("k1", PRIVATE), Signer("k1", OTHER_PRIVATE)
    work = tmp_path / "work"
    ex = Executor(kafka, codec, region="edge-1", executor_id="ex-sec",
                  verifier=Verifier({"k1": PUBLIC}), store_url=url, work_dir=work,
                  drain_seconds=0.2, stop_instances_on_exit=True)
    stop_ev = threading.Event()
    t = threading.Thread(target=ex.run, args=(stop_ev,), daemon=True)
    ex.start()
    t.start()
    try:
        unsigned = command(signer, digest=good_digest, sequence=5, sign=False)
        forged = command(forger, digest=good_digest, sequence=6)
        tampered = command(signer, digest=good_digest, sequence=7)
        tampered["desired_instances"] = 50  # changed after signing
        unknown = command(Signer("k9", OTHER_PRIVATE), digest=good_digest, sequence=8)
        expired = command(signer, digest=good_digest, sequence=9, ttl_ms=-1000)
        wrong_digest = command(signer, digest=evil_digest, sequence=10)
        other_region = command(signer, digest=good_digest, sequence=11, region="edge-2")
        bad = [unsigned, forged, tampered, unknown, expired, wrong_digest, other_region]
        produce(kafka, codec, bad, raw=[b"garbage, not a command"])

        want = {unsigned["command_id"]: "unsigned", forged["command_id"]: "bad_signature",
                tampered["command_id"]: "bad_signature", unknown["command_id"]: "unknown_key",
                expired["command_id"]: "expired", wrong_digest["command_id"]: "digest mismatch"}

        def rejected() -> dict[str, str]:
            got = {s["command_id"]: s["reason"] for s in statuses(kafka, codec)
                   if s["state"] == "REJECTED"}
            return got if len(got) >= len(want) else {}

        got = wait_for(rejected, 30, "six REJECTED statuses")
        assert set(got) == set(want), got
        for cid, word in want.items():
            assert word in got[cid], (word, got[cid])
        assert "hashes to" in got[wrong_digest["command_id"]]
        # Nothing started, nothing accepted, no bundle unpacked; edge-2's command ignored.
        assert all(s["state"] == "REJECTED" for s in statuses(kafka, codec))
        assert ex.state.instances == {} and ex.state.accepted == {}
        assert not (work / "bundles").exists() or not any((work / "bundles").iterdir())
        # The undecodable record went to dead-letter with its reason, and the stream went on.
        dl = read_topic(kafka.bootstrap_servers, topic_name(kafka, "dead-letter"), 10)
        assert [dict(m.headers() or [])["loadcast.reason"] for m in dl] == [b"bad_magic"]

        # The executor still works: a good command runs, an older one is then a replay.
        good = command(signer, digest=good_digest, sequence=20)
        produce(kafka, codec, [good])
        ready = wait_for(lambda: [s for s in statuses(kafka, codec)
                                  if s["state"] == "READY"], 30, "READY")
        assert ready[0]["command_id"] == good["command_id"]
        replay = command(signer, digest=good_digest, sequence=19)
        same_seq = command(signer, action="RETIRE", digest=good_digest, sequence=20,
                           instances=0)
        produce(kafka, codec, [replay, same_seq])
        ids = (replay["command_id"], same_seq["command_id"])

        def replays() -> dict[str, str]:
            got = {s["command_id"]: s["reason"] for s in statuses(kafka, codec)
                   if s["state"] == "REJECTED" and s["command_id"] in ids}
            return got if len(got) == 2 else {}

        got = wait_for(replays, 30, "both replays rejected")
        assert "replayed or out of order: sequence 19" in got[replay["command_id"]]
        assert "sequence 20 is not above the last accepted 20" in got[same_seq["command_id"]]
        (inst,) = ex.state.instances["echo-api"]
        assert processes_in(work / "bundles" / good_digest.split(":")[1]) == [inst.pid]
    finally:
        stop_ev.set()
        t.join(30)
        cleanup_instances(work)
    assert ex.state.instances == {}  # stop_instances_on_exit


def instance_set(work: Path) -> set[tuple[str, int, str]]:
    st = ExecutorState.load(work / "state.json")
    return {(i.api, i.pid, i.url) for insts in st.instances.values() for i in insts}


def answer(url: str) -> str:
    with urllib.request.urlopen(url + "/x", timeout=5) as r:
        return str(r.headers["X-Endpoint"])


def test_same_command_twice_one_instance_and_restart_keeps_the_running_set(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    signer = Signer("k1", PRIVATE)
    store, work = tmp_path / "store", tmp_path / "work"
    digest = push_fixture(store)
    bundle_dir = work / "bundles" / digest.split(":")[1]
    ex = None
    with bundle_server(store) as url:
        try:
            ex = start_executor(kafka, region="edge-1", work_dir=work, store_url=url,
                                public_key=PUBLIC, log=tmp_path / "executor.log")
            activate = command(signer, digest=digest, sequence=1)
            produce(kafka, codec, [activate, activate])  # delivered twice
            wait_for(lambda: any("duplicate" in s["reason"] for s in statuses(kafka, codec)),
                     30, "the duplicate to be handled")
            sts = statuses(kafka, codec)
            assert [s["state"] for s in sts if not s["reason"].startswith("duplicate")] == [
                "ACCEPTED", "STARTING", "READY"]
            running = instance_set(work)
            assert len(running) == 1
            (_, pid, inst_url) = next(iter(running))
            assert processes_in(bundle_dir) == [pid]
            assert answer(inst_url).startswith("echo-api@edge-1:")

            # kill -9: the API process lives on; the restarted executor adopts it.
            stop(ex, signal.SIGKILL)
            assert answer(inst_url)
            ex = start_executor(kafka, region="edge-1", work_dir=work, store_url=url,
                                public_key=PUBLIC, log=tmp_path / "executor.log")
            assert instance_set(work) == running
            assert processes_in(bundle_dir) == [pid]
            # published as it adopts, which may be just after it says it is up
            wait_for(lambda: any(s["reason"] == "adopted after executor restart"
                                 for s in statuses(kafka, codec)),
                     30, "the adoption to be published")

            # Killed again, and its instance dies meanwhile: the restart reconciles to the
            # last accepted command (one instance) with a new process.
            stop(ex, signal.SIGKILL)
            cleanup_instances(work)
            wait_for(lambda: not processes_in(bundle_dir), 10, "the instance to die")
            ex = start_executor(kafka, region="edge-1", work_dir=work, store_url=url,
                                public_key=PUBLIC, log=tmp_path / "executor.log")
            again = instance_set(work)
            assert len(again) == 1 and again != running
            assert processes_in(bundle_dir) == [next(iter(again))[1]]

            # RETIRE drains, stops, reports.
            produce(kafka, codec, [command(signer, action="RETIRE", digest=digest,
                                           sequence=2, instances=0)])
            wait_for(lambda: any(s["state"] == "RETIRED" for s in statuses(kafka, codec)),
                     30, "RETIRED")
            assert [s["state"] for s in statuses(kafka, codec)][-2:] == ["DRAINING", "RETIRED"]
            assert instance_set(work) == set()
            wait_for(lambda: not processes_in(bundle_dir), 10, "the process to stop")
        finally:
            stop(ex)
            cleanup_instances(work)
