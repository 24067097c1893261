"""``POST /v1/scenarios``: what-if over the current forecasts (:mod:`processors.scenarios`).

The body lists changes, applied in order to the latest score of every endpoint (of
``api`` when given): ``demand_factor`` (demand x factor, for an api, a region, both or
all), ``remove_target`` (an endpoint gone, its demand spread over the rest of its api by
capacity), ``add_mirror`` (a mirror of ``capacity_rps`` in a region). The answer has, for
the scenario and (unless ``baseline`` is false) for the forecasts as they are: per
endpoint and per (api, region) the predicted utilization per horizon, the overload
windows (upper band over capacity), and the unsigned commands the mirror planner would
issue now, told of the mirrors that mirror-status reports running. The planner uses the
deployment's planner settings (``[mirror]``, set with :func:`set_planner`); ``bundles``
in the body adds or replaces the bundle of an api for this scenario only (what if
``orders`` had a mirror bundle?).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors import scenarios as sc
from processors.mirroring import BundleSpec, PlannerConfig
from streams.api.app import SETTINGS, STATE
from streams.api.operations import BodyError, Operation, add_operations, parse_body
from streams.api.state import ForecastState

PATH = "/v1/scenarios"
PLANNER = web.AppKey("planner", PlannerConfig)
WHAT_IF_DIGEST = "sha256:" + "0" * 64  # a bundle named only for the scenario


class DemandFactorChange(BaseModel):
    """Demand x ``factor`` for ``api`` / ``region`` (omitted: any)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["demand_factor"]
    factor: float = Field(ge=0, le=1000, allow_inf_nan=False)
    api: str | None = Field(None, max_length=200)
    region: str | None = Field(None, max_length=200)


class RemoveTargetChange(BaseModel):
    """The endpoint is removed; its demand goes to the others of its api by capacity."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["remove_target"]
    endpoint_id: str = Field(min_length=1, max_length=200)


class AddMirrorChange(BaseModel):
    """A mirror of ``capacity_rps`` serving ``api`` in ``region``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["add_mirror"]
    api: str = Field(min_length=1, max_length=200)
    region: str = Field(min_length=1, max_length=200)
    capacity_rps: float = Field(gt=0, allow_inf_nan=False)


class BundleAssumption(BaseModel):
    """What one mirror instance of an api would serve (scenario only)."""

    model_config = ConfigDict(extra="forbid")

    instance_capacity_rps: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_instances: int = Field(1, ge=1, le=1000)
    max_instances: int = Field(1, ge=1, le=1000)

    @model_validator(mode="after")
    def _range(self) -> BundleAssumption:
        if self.max_instances < self.min_instances:
            raise ValueError("max_instances must be >= min_instances")
        return self


ScenarioChange = Annotated[DemandFactorChange | RemoveTargetChange | AddMirrorChange,
                           Field(discriminator="kind")]


class ScenarioRequest(BaseModel):
    """Changes in order; which endpoints; planner assumptions."""

    model_config = ConfigDict(extra="forbid")

    changes: list[ScenarioChange] = Field(default_factory=list)
    api: str | None = Field(None, max_length=200, description="only this api's endpoints")
    bundles: dict[str, BundleAssumption] = Field(
        default_factory=dict, description="api -> mirror bundle assumed for this scenario")
    baseline: bool = Field(True, description="also answer for the unchanged forecasts")


class ScenarioView(BaseModel):
    endpoints: list[dict[str, Any]] = Field(
        description="endpoint_id, api, region, capacity_rps, stale, points (horizon, at, "
                    "mean, upper, utilization, upper_utilization), overload_horizons")
    regions: list[dict[str, Any]] = Field(
        description="api, region, capacity_rps, endpoints, step_ms, points (at, mean, upper,"
                    " utilization, upper_utilization), overload_windows (start, end, "
                    "peak_upper)")
    commands: list[dict[str, Any]] = Field(
        description="MirrorCommand fields the planner would issue now, unsigned")


class ScenarioAnswer(BaseModel):
    now: int = Field(description="epoch ms the scenario was evaluated at")
    scenario: ScenarioView
    baseline: ScenarioView | None = None


def _change(c: DemandFactorChange | RemoveTargetChange | AddMirrorChange) -> sc.Change:
    if isinstance(c, DemandFactorChange):
        return sc.DemandFactor(c.factor, c.api, c.region)
    if isinstance(c, RemoveTargetChange):
        return sc.RemoveTarget(c.endpoint_id)
    return sc.AddMirror(c.api, c.region, c.capacity_rps)


def planner_for(base: PlannerConfig, bundles: dict[str, BundleAssumption]) -> PlannerConfig:
    """The deployment's planner settings with the scenario's bundle assumptions."""
    if not bundles:
        return base
    merged = dict(base.bundles)
    for api, b in bundles.items():
        digest = merged[api].digest if api in merged else WHAT_IF_DIGEST
        merged[api] = BundleSpec(digest, b.instance_capacity_rps, b.min_instances,
                                 b.max_instances)
    return dataclasses.replace(base, bundles=merged)


def _view(r: sc.ScenarioResult) -> dict[str, Any]:
    return {"endpoints": r.endpoints, "regions": r.regions, "commands": r.commands}


RUNNING_STATES = frozenset({"ACCEPTED", "STARTING", "READY"})


def running_mirrors(state: ForecastState) -> list[sc.RunningMirror]:
    """Mirrors whose latest status says they are up or coming up."""
    return [sc.RunningMirror(v.api, v.region, min(v.since.values(), default=v.at))
            for v in state.mirrors.values() if v.state in RUNNING_STATES]


def run(scores: list[Any], changes: list[sc.Change], planner: PlannerConfig, now_ms: int,
        baseline: bool, running: list[sc.RunningMirror]) -> dict[str, Any]:
    """Apply and evaluate (off the event loop); ScenarioError for a change that fails."""
    out: dict[str, Any] = {"now": now_ms, "scenario": _view(
        sc.evaluate(sc.apply_changes(scores, changes), planner, now_ms, running))}
    if baseline:
        out["baseline"] = _view(sc.evaluate(scores, planner, now_ms, running))
    return out


async def scenarios(request: web.Request) -> web.Response:
    """Evaluate a what-if over the current forecasts."""
    body = await parse_body(request, ScenarioRequest)
    settings = request.app[SETTINGS]
    if len(body.changes) > settings.scenario_max_changes:
        raise BodyError(413, f"changes: {len(body.changes)} over the limit of "
                             f"{settings.scenario_max_changes}", "changes")
    state = request.app[STATE]
    scores = state.find(api=body.api)
    if len(scores) > settings.scenario_max_endpoints:
        raise BodyError(413, f"api: {len(scores)} endpoints over the limit of "
                             f"{settings.scenario_max_endpoints} (name an api)", "api")
    planner = planner_for(request.app[PLANNER], body.bundles)
    try:
        out = await asyncio.to_thread(run, scores, [_change(c) for c in body.changes],
                                      planner, int(time.time() * 1000), body.baseline,
                                      running_mirrors(state))
    except sc.ScenarioError as e:
        where = f"changes.{e.index}"
        return web.json_response({"error": f"{where}: {e}", "field": where}, status=422)
    return web.json_response(out)


def set_planner(app: web.Application, planner: PlannerConfig) -> None:
    """Use the deployment's planner settings (``MirrorSettings.planner_config()``)."""
    app[PLANNER] = planner


def add_routes(app: web.Application) -> None:
    """Add ``POST /v1/scenarios`` (planner settings: none until :func:`set_planner`)."""
    if PLANNER not in app:
        app[PLANNER] = PlannerConfig(bundles={})
    add_operations(app, [Operation(
        "POST", PATH, scenarios,
        "What-if over the current forecasts: utilization, overload windows, mirror commands",
        body=ScenarioRequest, response=ScenarioAnswer, tag="planning",
        extra_responses={413: "over the size limits", 422: "bad body or a change that "
                         "cannot apply (names it)"})])
