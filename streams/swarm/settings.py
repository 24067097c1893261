"""Settings of a swarm worker (section ``[swarm]``, ``LOADCAST_SWARM__…``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SwarmSettings(BaseModel):
    """A swarm worker (``loadcast swarm-worker``): its handler, the task types it serves,
    how many tasks it runs at once."""

    model_config = ConfigDict(extra="forbid")

    handler: str = Field("echo", min_length=1,
                         description="`module:function`, or a built-in: echo, sleep")
    task_types: list[str] = Field(
        default_factory=list,
        description="task types this worker serves (empty = all); workers of one type set "
        "share a consumer group, so type sets of different pools must not overlap")
    concurrency: int = Field(1, ge=1, le=1024, description="tasks run at once")
    worker_id: str | None = Field(None, description="default: swarm-<host>-<pid>")
    group_prefix: str = Field("swarm", min_length=1,
                              description="consumer group: <topic_prefix><this>.<types>")
    max_inline_result_bytes: int = Field(
        256 * 1024, ge=1024, description="larger outputs go to result_dir, by reference")
    result_dir: str | None = Field(None, description="where large outputs are written")
    metrics_port: int = Field(0, ge=0, le=65535, description="serve /metrics here (0 = off)")
