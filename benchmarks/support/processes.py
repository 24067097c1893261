"""Child processes of the benchmarks: stopping one, and ``loadcast sidecar`` in one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streams.kafka.broker import free_port
from streams.kafka.settings import KafkaSettings

REPO = Path(__file__).resolve().parents[2]


def stop_process(proc: subprocess.Popen[Any] | None, wait_s: float = 10.0, *,
                 sig: int = signal.SIGTERM, kill_wait_s: float = 5.0,
                 close_pipes: bool = True) -> None:
    """``sig``, up to ``wait_s`` for it to exit, then SIGKILL (up to ``kill_wait_s``);
    closes its pipes unless told not to. Nothing to do for None or an exited process."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait_s)
    if close_pipes:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def kafka_env(kafka: KafkaSettings, **extra: str) -> dict[str, str]:
    """This process's environment plus the settings that point a ``loadcast`` child
    process at ``kafka``, plus ``extra``."""
    return {**os.environ,
            "LOADCAST_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
            "LOADCAST_KAFKA__PARTITIONS": str(kafka.partitions),
            **extra}


@contextmanager
def sidecar_process(kafka: KafkaSettings, upstreams: Sequence[Any], plane: str, port: int,
                    *, sidecar_id: str, env: Mapping[str, str] | None = None,
                    healthy_within_s: float = 30.0,
                    poll_s: float = 0.1, pids: list[int] | None = None) -> Iterator[int]:
    """``loadcast sidecar --data-plane plane`` on ``port`` in a subprocess (``env``: more
    settings; its pid appended to ``pids``); yields its admin port once its health
    endpoint answers 200."""
    admin = free_port()
    full = {**kafka_env(kafka),
            "LOADCAST_SIDECAR__UPSTREAMS": json.dumps([u.model_dump() for u in upstreams]),
            "LOADCAST_SIDECAR__SIDECAR_ID": sidecar_id,
            "LOADCAST_SIDECAR__DECISION_SAMPLE_RATE": "0.001",
            **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadcast", "sidecar", "--data-plane", plane,
         "--port", str(port), "--admin-port", str(admin)],
        env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
        start_new_session=True)
    if pids is not None:
        pids.append(proc.pid)
    try:
        deadline = time.monotonic() + healthy_within_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"sidecar exited: {err[-1000:]}")
            with (contextlib.suppress(OSError),
                  urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=1) as r):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"sidecar did not become healthy in {healthy_within_s:g} s")
            time.sleep(poll_s)
        yield admin
    finally:
        stop_process(proc, 20)
