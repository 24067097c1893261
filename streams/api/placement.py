"""``POST /v1/optimize/placement``: N demand sources x M targets -> the least-cost
assignment within the targets' capacities (:mod:`processors.placement`), in one call.

A source gives its ``demand``, or names an ``endpoint_id`` or an ``api`` (and ``region``)
whose forecast supplies it: the ``mean`` (or ``upper`` band) at ``horizon`` steps or
``lead_seconds`` ahead, summed over the matching endpoints, marked ``stale`` when a score
is past its valid-until. A target gives its ``capacity``, or names an ``endpoint_id``
whose score's ``capacity_rps`` it is. ``cost`` is N rows of M numbers, the cost of one
unit of demand on each target (latency in ms, money per rps, ...), ``null`` where the pair
is not allowed. ``split`` lets a source's demand be divided.

Errors: 413 over the size limits (``sources``, ``targets``, ``cost``), 422 naming the
field for a bad body or a forecast that is not there, and 422 with ``shortfall`` when no
placement fits.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Literal

import numpy as np
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.placement import Placement, PlacementInfeasible, equal_demands, solve_placement
from schemas.records import ForecastPoint, LoadScore
from streams.api.app import SETTINGS, STATE
from streams.api.config import ApiSettings
from streams.api.operations import BodyError, Operation, add_operations, parse_body
from streams.api.state import ForecastState

PATH = "/v1/optimize/placement"


class PlacementSource(BaseModel):
    """A demand source: a given demand, or a forecast of an endpoint or api/region."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=200, description="name in the answer "
                           "(default: endpoint_id, api/region, or the index)")
    demand: float | None = Field(None, ge=0, allow_inf_nan=False, description="given demand")
    endpoint_id: str | None = Field(None, max_length=200)
    api: str | None = Field(None, max_length=200)
    region: str | None = Field(None, max_length=200)
    horizon: int | None = Field(None, ge=1, description="forecast steps ahead (default 1)")
    lead_seconds: float | None = Field(None, ge=0, allow_inf_nan=False,
                                       description="or: the first point this far ahead")
    band: Literal["mean", "upper"] = "mean"

    @model_validator(mode="after")
    def _one_kind(self) -> PlacementSource:
        named = self.endpoint_id is not None or self.api is not None
        if (self.demand is None) == (not named):
            raise ValueError("give either demand or endpoint_id / api (+ region)")
        if self.horizon is not None and self.lead_seconds is not None:
            raise ValueError("give horizon or lead_seconds, not both")
        return self


class PlacementTarget(BaseModel):
    """A target: a given capacity, or an endpoint whose score says its capacity."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=200)
    capacity: float | None = Field(None, ge=0, allow_inf_nan=False)
    endpoint_id: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_kind(self) -> PlacementTarget:
        if (self.capacity is None) == (self.endpoint_id is None):
            raise ValueError("give either capacity or endpoint_id")
        return self


class PlacementRequest(BaseModel):
    """Sources, targets, the cost of each pair per unit of demand (null: not allowed)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[PlacementSource] = Field(min_length=1)
    targets: list[PlacementTarget] = Field(min_length=1)
    cost: list[list[float | None]] = Field(description="N rows (sources) of M (targets)")
    split: bool = Field(False, description="a source's demand may be divided among targets")


class TargetShare(BaseModel):
    target: str
    fraction: float
    demand: float


class SourceAssignment(BaseModel):
    source: str
    demand: float
    stale: bool
    target: str | None = Field(description="null when split over several")
    shares: list[TargetShare]
    cost: float


class TargetLoad(BaseModel):
    target: str
    capacity: float
    load: float
    utilization: float | None


class PlacementAnswer(BaseModel):
    method: str = Field(description="assignment | transport | gap-milp")
    optimal: bool
    total_cost: float
    solve_seconds: float
    assignments: list[SourceAssignment]
    targets: list[TargetLoad]


def _point(s: LoadScore, src: PlacementSource, where: str) -> ForecastPoint:
    pts = sorted(s.forecast, key=lambda p: p.horizon)
    if not pts:
        raise BodyError(422, f"{where}: the forecast of {s.endpoint_id} is empty", where)
    if src.lead_seconds is not None:
        for p in pts:
            if p.horizon * s.step_seconds >= src.lead_seconds:
                return p
        raise BodyError(422, f"{where}.lead_seconds: {src.lead_seconds:g} s is beyond the "
                             f"forecast of {s.endpoint_id} "
                             f"({pts[-1].horizon * s.step_seconds} s)", f"{where}.lead_seconds")
    h = src.horizon or 1
    for p in pts:
        if p.horizon == h:
            return p
    raise BodyError(422, f"{where}.horizon: {s.endpoint_id} forecasts horizons "
                         f"{pts[0].horizon}..{pts[-1].horizon}, not {h}", f"{where}.horizon")


def source_demand(state: ForecastState, src: PlacementSource, i: int,
                  now_ms: int) -> tuple[str, float, bool]:
    """(name, demand, stale) of source ``i``: given, or from the forecasts it names."""
    where = f"sources.{i}"
    if src.demand is not None:
        return src.id or str(i), src.demand, False
    scores = state.find(src.endpoint_id, api=src.api, region=src.region)
    if not scores:
        what = src.endpoint_id or f"api {src.api!r}" + (
            f" in region {src.region!r}" if src.region else "")
        raise BodyError(422, f"{where}: no forecast for {what}", where)
    total = 0.0
    for s in scores:
        p = _point(s, src, where)
        total += p.upper if src.band == "upper" else p.mean
    name = src.id or src.endpoint_id or f"{src.api}/{src.region or '*'}"
    return name, total, any(s.is_stale(now_ms) for s in scores)


def target_capacity(state: ForecastState, t: PlacementTarget, j: int) -> tuple[str, float]:
    """(name, capacity) of target ``j``: given, or its endpoint's capacity_rps."""
    if t.capacity is not None:
        return t.id or str(j), t.capacity
    s = state.scores.get(t.endpoint_id or "")
    if s is None:
        raise BodyError(422, f"targets.{j}.endpoint_id: no score for {t.endpoint_id!r}",
                        f"targets.{j}.endpoint_id")
    return t.id or s.endpoint_id, s.capacity_rps


def check_size(body: PlacementRequest, s: ApiSettings) -> None:
    """413 naming the field over the limits; 422 for a cost matrix of the wrong shape."""
    n, m = len(body.sources), len(body.targets)
    if n > s.placement_max_sources:
        raise BodyError(413, f"sources: {n} over the limit of {s.placement_max_sources}",
                        "sources")
    if m > s.placement_max_targets:
        raise BodyError(413, f"targets: {m} over the limit of {s.placement_max_targets}",
                        "targets")
    if n * m > s.placement_max_pairs:
        raise BodyError(413, f"cost: {n} x {m} pairs over the limit of "
                             f"{s.placement_max_pairs}", "cost")
    if len(body.cost) != n:
        raise BodyError(422, f"cost: {len(body.cost)} rows, expected {n} (one per source)",
                        "cost")
    for i, row in enumerate(body.cost):
        if len(row) != m:
            raise BodyError(422, f"cost.{i}: {len(row)} entries, expected {m} "
                                 "(one per target)", f"cost.{i}")


def cost_matrix(body: PlacementRequest) -> np.ndarray:
    """The cost rows as floats, null -> inf (not allowed)."""
    return np.array([[math.inf if c is None else c for c in row] for row in body.cost],
                    dtype=np.float64)


def answer(p: Placement, sources: list[tuple[str, float, bool]],
           targets: list[tuple[str, float]], cost: np.ndarray) -> dict[str, Any]:
    """The JSON answer (:class:`PlacementAnswer`)."""
    out = []
    for i, (name, demand, stale) in enumerate(sources):
        cols = np.flatnonzero(p.share[i] > 0)
        shares = [{"target": targets[j][0], "fraction": float(p.share[i, j]),
                   "demand": float(demand * p.share[i, j])} for j in cols]
        out.append({"source": name, "demand": demand, "stale": stale,
                    "target": targets[cols[0]][0] if len(cols) == 1 else None,
                    "shares": shares,
                    "cost": float(sum(demand * p.share[i, j] * cost[i, j] for j in cols))})
    loads = [{"target": name, "capacity": cap, "load": float(p.load[j]),
              "utilization": float(p.utilization[j]) if cap > 0 else None}
             for j, (name, cap) in enumerate(targets)]
    return {"method": p.method, "optimal": p.optimal, "total_cost": p.total_cost,
            "solve_seconds": round(p.solve_seconds, 6), "assignments": out, "targets": loads}


async def optimize_placement(request: web.Request) -> web.Response:
    """The least-cost placement of the sources on the targets."""
    body = await parse_body(request, PlacementRequest)
    settings = request.app[SETTINGS]
    state = request.app[STATE]
    check_size(body, settings)
    now_ms = int(time.time() * 1000)
    sources = [source_demand(state, s, i, now_ms) for i, s in enumerate(body.sources)]
    targets = [target_capacity(state, t, j) for j, t in enumerate(body.targets)]
    demand = np.array([d for _, d, _ in sources])
    unequal = not body.split and not equal_demands(demand)
    if unequal and len(sources) * len(targets) > settings.placement_milp_max_pairs:
        raise BodyError(413, f"cost: indivisible sources of unequal demand are a MILP, "
                             f"limited to {settings.placement_milp_max_pairs} pairs "
                             f"(set split, or equal demands)", "cost")
    cost = cost_matrix(body)
    try:
        placed = await asyncio.to_thread(
            solve_placement, demand, np.array([c for _, c in targets]), cost,
            split=body.split, time_limit_s=settings.placement_time_limit_s)
    except PlacementInfeasible as e:
        where = "sources" if e.source is None else f"sources.{e.source}"
        return web.json_response({"error": f"infeasible: {e}", "field": where,
                                  "shortfall": e.shortfall}, status=422)
    except ValueError as e:
        return web.json_response({"error": str(e), "field": "cost"}, status=422)
    return web.json_response(answer(placed, sources, targets, cost))


def add_routes(app: web.Application) -> None:
    """Add ``POST /v1/optimize/placement``."""
    add_operations(app, [Operation(
        "POST", PATH, optimize_placement,
        "Least-cost placement of demand sources on targets within their capacities",
        body=PlacementRequest, response=PlacementAnswer, tag="planning",
        extra_responses={413: "over the size limits", 422: "bad body, unknown forecast, "
                         "or no placement fits (with shortfall)"})])
