"""The task API over HTTP (aiohttp): ``create_task_app(...)`` returns the application, for
``loadcast tasks`` or to mount in another aiohttp app.

=========================  ==========================================================
``POST /v1/tasks``          queue a task: 202, ``Location``, the task (Idempotency-Key)
``GET /v1/tasks/{id}``      its state, attempt, worker; queue position, predicted start
``GET /v1/tasks/{id}/results``  the result once succeeded (404 before, with the state)
``DELETE /v1/tasks/{id}``   cancel it unless finished (409 with its state if it is)
``GET /v1/tasks/forecast``  workers needed per task type at a lead time
``GET /healthz``            200 once task-status is read to its end
=========================  ==========================================================

Bad bodies answer 422 naming the field; an unknown task type 422 listing the known ones;
a body over ``tasks.max_body_bytes`` 413.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processors.tasking import TaskView, workers_needed
from streams.tasks.log import now_ms
from streams.tasks.service import IdempotencyConflict, TaskService
from streams.tasks.settings import TaskSettings

SERVICE: web.AppKey[TaskService] = web.AppKey("task_service", TaskService)
MAX_KEY_CHARS = 255
# requirements as compact JSON with sorted keys (one encoder: json.dumps with options
# builds a new one per call)
CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


class Requirements(BaseModel):
    """What the task needs; the known keys are checked, others pass through."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    deadline: datetime | None = None
    priority: int = Field(0, ge=0, le=9)


class TaskRequest(BaseModel):
    """The body of ``POST /v1/tasks``."""

    model_config = ConfigDict(extra="forbid")

    task_type: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=1_000_000)
    requirements: Requirements = Field(default_factory=Requirements)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (orjson: a tenth of the cost of the json module per answer)."""
    try:
        data = orjson.dumps(body)
    except TypeError:  # what orjson does not write (an integer over 64 bits from a handler)
        data = json.dumps(body).encode()
    return web.Response(body=data, status=status, headers=headers,
                        content_type="application/json")


def _error(status: int, message: str, **more: Any) -> web.Response:
    return _json({"error": message, **more}, status=status)


def _unprocessable(e: ValidationError) -> web.Response:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"  # not JSON, not an object
    return _error(422, f"{where}: {first['msg']}", field=where,
                  errors=[{"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
                          for err in e.errors()[:20]])


def task_json(task: TaskView, service: TaskService) -> dict[str, Any]:
    """The answer for one task: state, attempt, worker, times; position when queued."""
    out: dict[str, Any] = {
        "id": task.task_id, "task_type": task.task_type, "state": task.state.lower(),
        "attempt": task.attempt, "max_attempts": task.max_attempts,
        "submitted_at": task.submitted_at, "updated_at": task.at,
    }
    if task.state == "RUNNING":
        out |= {"worker": task.worker, "started_at": task.started_at}
    if task.reason:
        out["reason"] = task.reason
    if task.state == "SUCCEEDED":
        out["results"] = f"/v1/tasks/{task.task_id}/results"
    est = service.book.estimate(task, time.monotonic(), now_ms())
    if est is not None:
        out["queue_position"] = est.queue_position
        out["predicted_start_at"] = est.predicted_start_ms
    return out


async def submit(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    limit = service.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body: {request.content_length} bytes, over {limit}", field="body")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body: over {limit} bytes", field="body")
    try:  # parsed and checked in one pass (pydantic-core): most of a submit's cost was here
        req = TaskRequest.model_validate_json(raw)
    except ValidationError as e:
        return _unprocessable(e)
    known = service.settings.task_types
    if req.task_type not in known:
        return _error(422, f"task_type: unknown task type {req.task_type!r}; known: "
                      f"{', '.join(known)}", field="task_type", known=known)
    if len(req.description) > service.settings.max_description_chars:
        return _error(422, f"description: longer than {service.settings.max_description_chars}"
                      " characters", field="description")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
        return _error(422, f"Idempotency-Key: 1 to {MAX_KEY_CHARS} characters",
                      field="Idempotency-Key")
    requirements = req.requirements.model_dump(mode="json", exclude_none=True)
    fields = {"task_type": req.task_type, "description": req.description,
              "requirements_json": CANONICAL.encode(requirements)}
    try:
        done = await service.submit(fields, key)
    except IdempotencyConflict as e:
        return _error(409, str(e))
    except (BufferError, RuntimeError) as e:  # producer full, or Kafka refused the record
        return _json({"error": f"task not queued: {e or 'producer full'}; "
                                  "retry later"}, status=503, headers={"Retry-After": "1"})
    answer = task_json(done.view, service) | {"description": req.description,
                                              "requirements": requirements}
    location = f"/v1/tasks/{done.view.task_id}"
    headers = {"Location": location}
    if not done.created:
        headers["Idempotent-Replayed"] = "true"
    return _json(answer, status=202, headers=headers)


def _task(request: web.Request) -> TaskView | web.Response:
    tid = request.match_info["task_id"]
    task = request.app[SERVICE].book.tasks.get(tid)
    if task is None:
        return _error(404, f"no task {tid}")
    return task


async def get_task(request: web.Request) -> web.Response:
    task = _task(request)
    if isinstance(task, web.Response):
        return task
    return _json(task_json(task, request.app[SERVICE]))


async def get_results(request: web.Request) -> web.Response:
    task = _task(request)
    if isinstance(task, web.Response):
        return task
    result = request.app[SERVICE].book.results.get(task.task_id)
    if result is None:
        msg = ("no result yet" if not task.finished else
               "succeeded; result not read yet" if task.state == "SUCCEEDED" else
               f"task {task.state.lower()}, no result")
        return _error(404, msg, state=task.state.lower(), reason=task.reason or None)
    output = json.loads(result["output"]) if result["output"] else None
    return _json({
        "id": task.task_id, "state": "succeeded", "attempt": result["attempt"],
        "worker": result["worker"], "started_at": result["started_at"],
        "finished_at": result["at"], "output": output, "output_ref": result["output_ref"],
        "output_bytes": result["output_bytes"],
    })


async def cancel(request: web.Request) -> web.Response:
    task = _task(request)
    if isinstance(task, web.Response):
        return task
    service = request.app[SERVICE]
    if task.finished:
        return _error(409, f"task already {task.state.lower()}", state=task.state.lower())
    after = await service.cancel(task.task_id)
    if after.state != "CANCELLED":  # finished first (the log decided), or not seen in time
        return _error(409, f"task {after.state.lower()}, not cancelled",
                      state=after.state.lower())
    return _json(task_json(after, service))


async def forecast(request: web.Request) -> web.Response:
    """Workers needed per task type ``lead_seconds`` ahead (query parameter, default 60):
    the arrival rate forecast for then by the processors from the task telemetry
    (:mod:`streams.tasks.demand`; else the rate measured over the window) times the
    measured service time (Little's law), at the target utilization, plus what it takes
    to drain the queue by then."""
    service = request.app[SERVICE]
    try:
        lead = float(request.query.get("lead_seconds", "60"))
        if not 0 <= lead <= 86400 or math.isnan(lead):
            raise ValueError
    except ValueError:
        return _error(422, "lead_seconds: a number of seconds in [0, 86400]",
                      field="lead_seconds")
    book, now = service.book, time.monotonic()
    at_ms = now_ms() + round(lead * 1000)
    rows = []
    for task_type in service.settings.task_types:
        rate = book.arrival_rate(task_type, now)
        source, made = "measured", None
        forecast_rate = service.demand.forecast_rate(task_type, at_ms)
        if forecast_rate is not None:
            rate, made = forecast_rate
            source = "forecast"
        st = book.stats.get(task_type)
        service_s = st.service_s if st is not None else None
        queued = len(book.queued.get(task_type, {}))
        need = None
        if service_s is not None:
            drain = queued / lead if lead > 0 else 0.0  # the backlog, spread over the lead
            need = workers_needed(rate + drain, service_s, service.settings.target_utilization)
        rows.append({"task_type": task_type, "arrival_per_s": round(rate, 4),
                     "arrival_source": source, "forecast_made_at": made,
                     "service_seconds": service_s, "queued": queued, "workers_needed": need})
    return _json({"lead_seconds": lead, "types": rows})


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return _json({"ok": service.live, "tasks": service.book.counts()},
                             status=200 if service.live else 503)


def create_task_app(service: TaskService, settings: TaskSettings | None = None,
                    *, manage_service: bool = True) -> web.Application:
    """The task API on ``service``; with ``manage_service`` the app starts it (reading
    task-status to its end) on start-up and stops it on clean-up."""
    s = settings or service.settings
    app = web.Application(client_max_size=s.max_body_bytes)
    app[SERVICE] = service
    app.router.add_post("/v1/tasks", submit)
    app.router.add_get("/v1/tasks/forecast", forecast)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    app.router.add_get("/v1/tasks/{task_id}/results", get_results)
    app.router.add_delete("/v1/tasks/{task_id}", cancel)
    app.router.add_get("/healthz", healthz)
    if manage_service:
        async def start(_: web.Application) -> None:
            await service.start()

        async def stop(_: web.Application) -> None:
            await service.stop()

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
    return app


async def serve_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` (0 = a free port); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port
