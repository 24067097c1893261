"""``loadcast tasks`` and ``loadcast swarm-worker``: the task API and its worker swarm.

    loadcast tasks -b HOST:PORT --port 8480            # POST/GET/DELETE /v1/tasks...
    loadcast swarm-worker -b HOST:PORT --handler echo   # or mypkg.handlers:review

Kafka and aiohttp are imported inside the commands (start-up speed of ``loadcast --help``).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Annotated

import typer

from loadcast.cli.common import SettingsFn, console, ensure_kafka, fail
from loadcast.cli.options import BootstrapOpt, LogLevelOpt, set_log_level
from streams.signals import stop_on_signals

DurationOpt = Annotated[
    float | None, typer.Option(help="Stop after this many seconds.", min=0)
]


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``tasks`` and ``swarm-worker``."""
    app.command("tasks")(_tasks(get_settings))
    app.command("swarm-worker")(_swarm_worker(get_settings))


def _tasks(get_settings: SettingsFn) -> Callable[..., None]:
    def tasks(
        bootstrap: BootstrapOpt = None,
        host: Annotated[str | None, typer.Option(help="Bind address (tasks.host).")] = None,
        port: Annotated[int | None, typer.Option(
            help="Port (tasks.port; 0 = a free one).", min=0, max=65535)] = None,
        metrics_port: Annotated[int | None, typer.Option(
            help="Serve /metrics on this port (tasks.metrics_port; 0 = off).",
            min=0, max=65535)] = None,
        duration: DurationOpt = None,
        log_level: LogLevelOpt = None,
    ) -> None:
        """Serve the task API: submit, status, results, cancel; keeps the swarm's leases.
        Prints its URL once task-status is read to its end."""
        from streams.kafka.registry import codec_for
        from streams.kafka.runtime import KafkaRuntime
        from streams.metrics import serve_metrics
        from streams.tasks.app import create_task_app, serve_app
        from streams.tasks.service import TaskService

        set_log_level(log_level)
        s = get_settings(bootstrap)
        ensure_kafka(s.kafka)
        serve_metrics(s.tasks.metrics_port if metrics_port is None else metrics_port)
        rt = KafkaRuntime(s.kafka)
        service = TaskService(rt, codec_for(s.kafka.schema_registry_url), s.tasks)
        bind = host or s.tasks.host

        async def run(stop: threading.Event) -> None:
            runner, bound = await serve_app(create_task_app(service), bind,
                                            s.tasks.port if port is None else port)
            print(f"http://{bind}:{bound}", flush=True)
            console.print(f"task API on http://{bind}:{bound}: {len(service.book.tasks)} "
                          f"task(s) known; types {', '.join(s.tasks.task_types)}")
            try:
                while not stop.is_set():
                    await asyncio.sleep(0.2)
            finally:
                await runner.cleanup()

        import uvloop

        with stop_on_signals(duration) as stop:
            try:
                uvloop.run(run(stop))
            except (OSError, TimeoutError) as e:
                raise fail(f"task API did not start: {e}", 1) from None

    return tasks


def _swarm_worker(get_settings: SettingsFn) -> Callable[..., None]:
    def swarm_worker(
        bootstrap: BootstrapOpt = None,
        handler: Annotated[str | None, typer.Option(
            help="module:function, or a built-in: echo, sleep (swarm.handler).")] = None,
        types: Annotated[str | None, typer.Option(
            help="Comma-separated task types served (swarm.task_types; empty = all).")] = None,
        concurrency: Annotated[int | None, typer.Option(
            help="Tasks run at once (swarm.concurrency).", min=1, max=1024)] = None,
        worker_id: Annotated[str | None, typer.Option(help="Worker id (swarm.worker_id).")] = None,
        session_timeout_ms: Annotated[int, typer.Option(
            help="Consumer group session timeout: a worker dead before it said RUNNING "
                 "loses its tasks to another after this.", min=1000, max=300_000)] = 6000,
        duration: DurationOpt = None,
        log_level: LogLevelOpt = None,
    ) -> None:
        """Run a swarm worker: take tasks, run the handler, heartbeat, publish results."""
        from streams.kafka.registry import codec_for
        from streams.kafka.runtime import KafkaRuntime
        from streams.metrics import serve_metrics
        from streams.swarm.handlers import load_handler
        from streams.swarm.worker import SwarmWorker, group_id

        set_log_level(log_level)
        s = get_settings(bootstrap)
        sw = s.swarm.model_copy(update={k: v for k, v in {
            "handler": handler, "concurrency": concurrency, "worker_id": worker_id,
            "task_types": [t.strip() for t in types.split(",") if t.strip()]
            if types is not None else None}.items() if v is not None})
        try:
            fn = load_handler(sw.handler)
        except ValueError as e:
            raise fail(str(e)) from None
        ensure_kafka(s.kafka)
        serve_metrics(sw.metrics_port)
        worker = SwarmWorker(KafkaRuntime(s.kafka), codec_for(s.kafka.schema_registry_url), sw,
                             fn, session_timeout_ms=session_timeout_ms)
        group = group_id(sw, s.kafka.topic_prefix)
        console.print(f"swarm worker {worker.id} in group {group}: handler {sw.handler}, "
                      f"concurrency {sw.concurrency}")
        # one write: with unbuffered output print() writes "ready" and the newline apart,
        # and workers sharing a log interleaved them ("readyready")
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        with stop_on_signals(duration) as stop:
            worker.run(stop)
        console.print(f"swarm worker {worker.id}: {worker.done} attempt(s) finished")

    return swarm_worker
