"""The prediction API: forecasts per endpoint, one, in batches, or as background jobs.

- ``POST /v1/predict``: one question (:class:`PredictItem`); 404 for an unknown endpoint
  or api, 422 naming the field;
- ``POST /v1/predict/batch``: 1-10,000 questions, one result each (an unknown endpoint is
  that item's error); more items: 413 naming ``items``;
- ``POST /v1/predict/async``: 1-1,000,000 questions, 202 + ``Location: /v1/jobs/{id}``;
  the same ``Idempotency-Key`` returns the same job;
- ``GET /v1/jobs/{id}``: the job's state; once succeeded, results by page (``offset``,
  ``limit``);
- ``GET /v1/model/info``: model kinds of the scores, global-model versions, freshness.

Every answer comes from the latest score of each endpoint (:mod:`streams.api.state`), as
:func:`processors.serving.answer` gives it, encoded by :mod:`streams.api.answers` (a
batch: from each endpoint's JSON parts); a stale score is answered and marked ``stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from streams.api.answers import Curves, answer_item, encode_batch
from streams.api.app import SETTINGS, STATE, error
from streams.api.jobs import JobsFull, JobStore
from streams.api.operations import (
    Operation,
    add_operations,
    parse_body,
    read_body,
    validate_body,
)
from streams.api.predict_models import (
    AsyncRequest,
    BatchRequest,
    BatchResponse,
    JobResponse,
    ModelInfo,
    PredictItem,
    PredictResponse,
    compact,
    decode_batch,
)

JOBS: web.AppKey[JobStore] = web.AppKey("jobs", JobStore)
MAX_PAGE = 100_000  # job results in one page
VALIDATE_CHUNK = 10_000  # async items validated between two yields to the event loop
IDEMPOTENCY_KEY = "Idempotency-Key"


def _json(body: Any, status: int = 200) -> web.Response:
    """A JSON answer encoded by orjson (a batch answer is megabytes: 5-10x faster)."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _now_ms() -> int:
    return round(time.time() * 1000)


CURVES: web.AppKey[Curves] = web.AppKey("curves", Curves)


async def predict(request: web.Request) -> web.Response:
    """``POST /v1/predict``."""
    item = await parse_body(request, PredictItem)
    res = answer_item(request.app[CURVES], item, _now_ms())
    if "error" in res:
        return error(404 if res["field"] in ("endpoint_id", "api") else 422, res["error"],
                     res["field"])
    return _json(res)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch is decoded, answered and encoded.

    A batch allocates a few containers per item that live until its answer is encoded;
    meanwhile the collector would run every 700 allocations and, in full collections, walk
    the whole state (every score and curve: millions of objects). That was 60 % of a
    10,000-item batch's time. The answers hold no cycles (reference counting frees them),
    and the pause lasts one bounded step with no await in it (a batch of at most 10,000
    items, or the JSON decoding of an async body)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


async def predict_batch(request: web.Request) -> web.Response:
    """``POST /v1/predict/batch``: per-item results; the call fails only as a whole body."""
    raw = await read_body(request)
    with cyclic_gc_paused():  # from decoding the body to its answer's bytes, no await
        items = decode_batch(raw)
        encoded, _ = encode_batch(request.app[CURVES], items, _now_ms())
        del items
    return web.Response(body=encoded, content_type="application/json")


async def predict_async(request: web.Request) -> web.Response:
    """``POST /v1/predict/async``: 202 and where to find the job."""
    settings = request.app[SETTINGS]
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is not None and not 0 < len(key) <= 256:
        return error(422, "Idempotency-Key: 1 to 256 characters", IDEMPOTENCY_KEY)
    jobs = request.app[JOBS]
    if key is not None and (kept := jobs.get(jobs.by_key.get(key, ""))) is not None:
        job = kept  # the same job, without reading the body again
    else:
        raw = await read_body(request, limit=settings.async_max_body_bytes)
        with cyclic_gc_paused():  # a million dicts decoded: no collections meanwhile
            body = validate_body(raw, AsyncRequest)
        del raw
        items: list[Any] = body.items
        for start in range(0, len(items), VALIDATE_CHUNK):  # the loop answers in between
            for i in range(start, min(start + VALIDATE_CHUNK, len(items))):
                items[i] = compact(items[i], f"items.{i}")
            await asyncio.sleep(0)
        if key is not None and (kept := jobs.get(jobs.by_key.get(key, ""))) is not None:
            job = kept  # the same key came in while this body was checked
        else:
            curves = request.app[CURVES]
            try:
                job, _ = jobs.submit(items, lambda it, now: answer_item(curves, it, now), key)
            except JobsFull as e:
                return web.json_response({"error": str(e)}, status=429,
                                         headers={"Retry-After": "5"})
    return web.Response(
        body=jobs.page(job, 0, 0), status=202, content_type="application/json",
        headers={"Location": f"/v1/jobs/{job.id}"})


def _query_int(request: web.Request, name: str, default: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise web.HTTPUnprocessableEntity(
            text=f'{{"error": "{name}: not an integer", "field": "{name}"}}',
            content_type="application/json") from None
    if not 0 <= v <= hi:
        raise web.HTTPUnprocessableEntity(
            text=f'{{"error": "{name}: 0 to {hi}", "field": "{name}"}}',
            content_type="application/json")
    return v


async def get_job(request: web.Request) -> web.Response:
    """``GET /v1/jobs/{id}?offset=0&limit=10000``."""
    jobs = request.app[JOBS]
    job = jobs.get(request.match_info["id"])
    if job is None:
        return error(404, "no such job (never made, or its results expired)", "id")
    offset = _query_int(request, "offset", 0, 2**31)
    limit = _query_int(request, "limit", 10_000, MAX_PAGE)
    return web.Response(body=jobs.page(job, offset, limit), content_type="application/json")


async def model_info(request: web.Request) -> web.Response:
    """``GET /v1/model/info``: model kinds, global-model versions, data freshness."""
    state = request.app[STATE]
    now = _now_ms()
    kinds: dict[str, dict[str, Any]] = {}
    stale = 0
    for s in state.scores.values():
        k = kinds.setdefault(s.model, {"model": s.model, "endpoints": 0, "stale": 0,
                                       "newest_computed_at": s.computed_at})
        k["endpoints"] += 1
        k["newest_computed_at"] = max(k["newest_computed_at"], s.computed_at)
        if now > s.valid_until:
            k["stale"] += 1
            stale += 1
    ages = [max(0.0, (now - s.computed_at) / 1000) for s in state.scores.values()]
    return web.json_response({
        "endpoints": len(state.scores),
        "stale_endpoints": stale,
        "newest_score_age_s": min(ages) if ages else None,
        "oldest_score_age_s": max(ages) if ages else None,
        "kinds": sorted(kinds.values(), key=lambda k: k["model"]),
        "global_models": state.models,
    })


async def _close_jobs(app: web.Application) -> None:
    await app[JOBS].close()


def add_routes(app: web.Application) -> None:
    """Add the prediction routes and the job store to ``app``."""
    s = app[SETTINGS]
    app[CURVES] = Curves(app[STATE])
    app[JOBS] = JobStore(max_jobs=s.max_jobs, ttl_s=s.job_ttl_s, max_seconds=s.job_max_seconds,
                         max_result_bytes=s.job_max_result_bytes)
    app.on_cleanup.append(_close_jobs)
    add_operations(app, [
        Operation("POST", "/v1/predict", predict,
                  "Forecast of one endpoint, or of every endpoint of an api (and region)",
                  body=PredictItem, response=PredictResponse,
                  extra_responses={404: "unknown endpoint_id or api",
                                   413: "body too large", 422: "invalid body (names the field)"}),
        Operation("POST", "/v1/predict/batch", predict_batch,
                  "1 to 10,000 questions in one call, one result (or item error) each",
                  body=BatchRequest, response=BatchResponse,
                  extra_responses={413: "more than 10,000 items or body too large",
                                   422: "invalid body (names the field)"}),
        Operation("POST", "/v1/predict/async", predict_async,
                  "Up to 1,000,000 questions answered in the background (Idempotency-Key "
                  "header: the same job again)",
                  body=AsyncRequest, response=JobResponse, status=202,
                  extra_responses={413: "more than 1,000,000 items or body too large",
                                   422: "invalid body (names the field)",
                                   429: "every kept job is still queued or running"}),
        Operation("GET", "/v1/jobs/{id}", get_job,
                  "An async job's state and a page of its results (offset, limit)",
                  response=JobResponse, extra_responses={404: "no such job",
                                                         422: "bad offset or limit"}),
        Operation("GET", "/v1/model/info", model_info,
                  "Model kinds, global-model versions and data freshness", response=ModelInfo),
    ])
