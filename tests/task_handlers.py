"""A swarm handler for the task tests: what it does is in the task's requirements."""

from __future__ import annotations

import time
from typing import Any

from streams.swarm.handlers import TaskInput


def dispatch(task: TaskInput) -> dict[str, Any]:
    """``requirements.fail``: raise; ``requirements.seconds``: sleep that long; then echo."""
    if task.requirements.get("fail"):
        raise RuntimeError(f"told to fail (attempt {task.attempt})")
    seconds = float(task.requirements.get("seconds", 0))
    if seconds:
        time.sleep(min(seconds, 30.0))
    return {"echo": task.description, "attempt": task.attempt}
