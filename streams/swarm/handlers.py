"""Task handlers: what a swarm worker runs for a task, and the built-in ones.

A handler is a plain function, sync or async, of one :class:`TaskInput`; what it returns
(anything ``json.dumps`` takes) is the task's result; what it raises fails the attempt
(retried up to ``max_attempts``, then the task fails with the exception as the reason)::

    # mypkg/handlers.py                       loadcast swarm-worker --handler mypkg.handlers:review
    def review(task: TaskInput) -> dict:
        return {"summary": summarize(task.description, model=task.requirements.get("model"))}

Built-ins: ``echo`` (returns the description) and ``sleep`` (sleeps
``requirements.seconds``, default 1, at most 3600, then echoes).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

MAX_SLEEP_S = 3600.0


@dataclass(frozen=True)
class TaskInput:
    """What a handler gets: the task and which attempt this is."""

    task_id: str
    task_type: str
    description: str
    requirements: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    max_attempts: int = 1

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TaskInput:
        """From a Task record (its ``requirements`` JSON parsed)."""
        try:
            req = json.loads(record.get("requirements") or "{}")
        except json.JSONDecodeError:
            req = {}
        return cls(record["task_id"], record["task_type"], record["description"],
                   req if isinstance(req, dict) else {}, int(record["attempt"]),
                   int(record["max_attempts"]))


Handler = Callable[[TaskInput], Any] | Callable[[TaskInput], Awaitable[Any]]


def echo(task: TaskInput) -> dict[str, Any]:
    """Return the task's description (and type): the no-op handler of tests and benchmarks."""
    return {"echo": task.description, "task_type": task.task_type}


async def sleep(task: TaskInput) -> dict[str, Any]:
    """Sleep ``requirements.seconds`` (default 1, at most an hour), then echo."""
    seconds = float(task.requirements.get("seconds", 1.0))
    if not 0 <= seconds <= MAX_SLEEP_S:
        raise ValueError(f"requirements.seconds must be in [0, {MAX_SLEEP_S:g}], not {seconds}")
    await asyncio.sleep(seconds)
    return {"slept": seconds, "echo": task.description}


BUILT_IN: dict[str, Handler] = {"echo": echo, "sleep": sleep}


def load_handler(spec: str) -> Handler:
    """A built-in by name, or ``module:function`` (ValueError naming what is wrong)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler {spec!r}: expected module:function or one of "
                         f"{', '.join(BUILT_IN)}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"handler {spec!r}: cannot import {module_name}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"handler {spec!r}: {module_name} has no function {attr}")
    handler: Handler = fn
    return handler


def run_handler(handler: Handler, task: TaskInput) -> Any:
    """Call ``handler`` (a sync one directly, an async one on its own event loop)."""
    if inspect.iscoroutinefunction(handler):
        return asyncio.run(handler(task))
    out = handler(task)
    if inspect.isawaitable(out):
        async def wait() -> Any:
            return await out

        return asyncio.run(wait())
    return out
