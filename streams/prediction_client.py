"""A typed client of ``loadcast api``: forecasts one by one, in batches, as background
jobs, and the planning calls (placement, scenarios).

    import asyncio
    from streams.prediction_client import PredictionClient

    async def main() -> None:
        async with PredictionClient("http://127.0.0.1:8090") as api:
            [p] = await api.predict("orders-eu-1", horizons=[1, 12])
            print(p["points"][1]["mean"], p["points"][1]["utilization"], p["stale"])
            results = await api.predict_batch([{"endpoint_id": "orders-eu-1"},
                                               {"api": "orders", "region": "eu"}])
            job = await api.wait(await api.predict_async(many_questions))
            print(job["state"], len(job["results"]))

    asyncio.run(main())

An HTTP error (4xx/5xx) raises :class:`PredictionError` with the status, the server's
message and the field it names. A question is a :class:`Question` dict (``endpoint_id``,
or ``api`` with an optional ``region``; ``horizons`` in steps or ``times`` as epoch ms,
ISO strings or datetimes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, NotRequired, TypedDict

import aiohttp


class Question(TypedDict, total=False):
    """One question (the body of ``POST /v1/predict``, an item of a batch or job)."""

    endpoint_id: str
    api: str
    region: str
    horizons: list[int]
    times: list[int | str]


class ForecastValue(TypedDict):
    horizon: float
    at: int
    mean: float
    lower: float
    upper: float
    utilization: float | None
    utilization_upper: float | None


class EndpointForecast(TypedDict):
    """One endpoint's answer (see ``GET /openapi.json`` for every field)."""

    endpoint_id: str
    api: str
    region: str
    computed_at: int
    valid_until: int
    age_s: float
    stale: bool
    model: str
    step_seconds: int
    score: float
    capacity_rps: float
    capacity_source: str
    current_rps: float
    points: list[ForecastValue]


class ItemResult(TypedDict):
    """Item ``index``'s predictions, or its error and the field it names."""

    index: int
    predictions: NotRequired[list[EndpointForecast]]
    error: NotRequired[str]
    field: NotRequired[str]


class Job(TypedDict):
    """An async job (``results``: a page, or every result after :meth:`wait`)."""

    id: str
    state: str
    items: int
    done: int
    errors: int
    error: str | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    expires_at: int | None
    offset: int
    next_offset: int | None
    results: list[ItemResult]


class PredictionError(Exception):
    """An error answer of the API."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.field = field


def _question(q: Question) -> dict[str, Any]:
    out: dict[str, Any] = dict(q)
    if "times" in out:
        out["times"] = [t.isoformat() if isinstance(t, datetime) else t for t in out["times"]]
    return out


class PredictionClient:
    """``loadcast api`` at ``base_url``; use as ``async with`` (or call :meth:`close`)."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None  # made on the running loop

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    async def __aenter__(self) -> PredictionClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: Any = None,
                    headers: dict[str, str] | None = None) -> tuple[Any, str | None]:
        async with self._http.request(method, self.base_url + path, json=body,
                                      headers=headers) as r:
            try:
                answer = await r.json(content_type=None)
            except ValueError:
                answer = {"error": (await r.text())[:500]}
            if r.status >= 400:
                raise PredictionError(r.status, str(answer.get("error", answer)),
                                      answer.get("field"))
            return answer, r.headers.get("Location")

    async def predict(self, endpoint_id: str | None = None, *, api: str | None = None,
                      region: str | None = None, horizons: Sequence[int] | None = None,
                      times: Sequence[int | str | datetime] | None = None
                      ) -> list[EndpointForecast]:
        """The forecasts of ``endpoint_id`` (one) or of every endpoint of ``api``
        (in ``region``), at ``horizons`` (steps) or ``times``; every point by default."""
        q: dict[str, Any] = {k: v for k, v in (("endpoint_id", endpoint_id), ("api", api),
                                               ("region", region)) if v is not None}
        if horizons is not None:
            q["horizons"] = list(horizons)
        if times is not None:
            q["times"] = list(times)
        answer, _ = await self._call("POST", "/v1/predict", _question(q))  # type: ignore[arg-type]
        predictions: list[EndpointForecast] = answer["predictions"]
        return predictions

    async def predict_batch(self, items: Sequence[Question]) -> list[ItemResult]:
        """One result per question (1-10,000), in order; errors are per item."""
        answer, _ = await self._call("POST", "/v1/predict/batch",
                                     {"items": [_question(q) for q in items]})
        results: list[ItemResult] = answer["results"]
        return results

    async def predict_async(self, items: Sequence[Question], *,
                            idempotency_key: str | None = None) -> Job:
        """Submit up to 1,000,000 questions; the job as accepted (queued or running).
        The same ``idempotency_key`` returns the same job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        answer, _ = await self._call("POST", "/v1/predict/async",
                                     {"items": [_question(q) for q in items]}, headers)
        job: Job = answer
        return job

    async def job(self, job_id: str, *, offset: int = 0, limit: int = 10_000) -> Job:
        """The job's state and one page of its results."""
        answer, _ = await self._call("GET", f"/v1/jobs/{job_id}?offset={offset}&limit={limit}")
        job: Job = answer
        return job

    async def wait(self, job: Job | str, *, timeout_s: float = 300.0,
                   poll_s: float = 0.2, page: int = 100_000) -> Job:
        """Poll until the job has succeeded or failed (TimeoutError after ``timeout_s``);
        a succeeded job comes back with every result, read page by page."""
        job_id = job if isinstance(job, str) else job["id"]
        deadline = time.monotonic() + timeout_s
        while True:
            state = await self.job(job_id, limit=page)
            if state["state"] in ("succeeded", "failed"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state['state']} after {timeout_s} s")
            await asyncio.sleep(poll_s)
        results = list(state["results"])
        while state["next_offset"] is not None:
            state = await self.job(job_id, offset=state["next_offset"], limit=page)
            results.extend(state["results"])
        state["results"], state["offset"], state["next_offset"] = results, 0, None
        return state

    async def model_info(self) -> dict[str, Any]:
        """Model kinds, global-model versions and data freshness."""
        answer, _ = await self._call("GET", "/v1/model/info")
        info: dict[str, Any] = answer
        return info

    async def optimize_placement(self, request: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/optimize/placement`` with ``request`` as given; the parsed answer."""
        answer, _ = await self._call("POST", "/v1/optimize/placement", request)
        placement: dict[str, Any] = answer
        return placement

    async def scenarios(self, request: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/scenarios`` with ``request`` as given; the parsed answer."""
        answer, _ = await self._call("POST", "/v1/scenarios", request)
        outcome: dict[str, Any] = answer
        return outcome
