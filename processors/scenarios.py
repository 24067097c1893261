"""What-if over the current forecasts: change the demand or the capacity, see the predicted
utilization, the overload windows and the mirrors the planner would command.

Values in, values out. A scenario is a list of changes applied in order to the latest
LoadScores (:func:`apply_changes`):

- :class:`DemandFactor` — every matching endpoint's current and forecast demand (mean and
  band) times ``factor`` (an api, a region, both, or all);
- :class:`RemoveTarget` — the endpoint is gone; its demand (now and per horizon) is spread
  over the other endpoints of its api, in proportion to their capacity;
- :class:`AddMirror` — a mirror of ``capacity_rps`` in (api, region): an endpoint named as
  the traffic director names mirrors, so the planner counts it as the mirroring module
  does (its capacity adds to the region's, the demand it carries is the region's).

:func:`evaluate` then reports per endpoint (each forecast point: utilization = mean /
capacity, upper / capacity; overload horizons: upper > capacity) and per (api, region) —
the regional demand as the mirror planner sees it (:class:`processors.mirroring.DemandTable`
on the grid of the smallest step), with its overload windows — and the commands a
:class:`processors.mirroring.MirrorPlanner` with the deployment's planner settings would
issue now for that input. The planner is the real one, started fresh on the scenario's
scores and given a throwaway signing key; mirrors reported running (``running``: accepted,
starting or ready on mirror-status) are restored into it as active with the bundle's
``min_instances`` (mirror-status does not say how many), so it does not command them
again but may scale them up. A retirement needs low demand for a cool-down, which one
evaluation cannot see: scenarios never retire. The commands are returned unsigned: they
are a forecast, never sent.

>>> from schemas.records import ForecastPoint, LoadScore
>>> s = LoadScore("orders-eu-1", "orders", "eu", 0, 60_000, 0.5, 100.0, "CONFIGURED", 40.0,
...               0.5, 10.0, 0.0, 0.0, 60, (ForecastPoint(1, 60_000, 50.0, 40.0, 60.0),))
>>> out = evaluate(apply_changes([s], [DemandFactor(2.0)]), PlannerConfig({}), now_ms=0)
>>> out.endpoints[0]["points"][0]["utilization"], out.endpoints[0]["overload_horizons"]
(1.0, [1])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from processors.mirroring import DemandTable, MirrorPlanner, PlannerConfig, RegionalDemand
from processors.signing import Signer, generate_keypair
from schemas.records import ForecastPoint, LoadScore

MIRROR_SUFFIX = "scenario"
UNSIGNED = ("signature", "key_id", "command_id")


class ScenarioError(ValueError):
    """A change that cannot apply; ``index`` is its place in the list."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class DemandFactor:
    """Demand x ``factor`` for the endpoints of ``api`` / ``region`` (None: any)."""

    factor: float
    api: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class RemoveTarget:
    """``endpoint_id`` removed; its demand goes to the other endpoints of its api."""

    endpoint_id: str


@dataclass(frozen=True)
class AddMirror:
    """A mirror of ``capacity_rps`` serving ``api`` in ``region``."""

    api: str
    region: str
    capacity_rps: float


Change = DemandFactor | RemoveTarget | AddMirror


@dataclass
class ScenarioResult:
    """Per endpoint and per (api, region) utilization, overloads, and planner commands."""

    endpoints: list[dict[str, Any]] = field(default_factory=list)
    regions: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)


def _scaled(s: LoadScore, k: float) -> LoadScore:
    pts = tuple(ForecastPoint(p.horizon, p.at, p.mean * k, p.lower * k, p.upper * k)
                for p in s.forecast)
    return dataclasses.replace(s, current_rps=s.current_rps * k, forecast=pts)


def _plus(s: LoadScore, gone: LoadScore, share: float) -> LoadScore:
    extra = {p.horizon: p for p in gone.forecast}
    pts = tuple(
        ForecastPoint(p.horizon, p.at, p.mean + share * extra[p.horizon].mean,
                      p.lower + share * extra[p.horizon].lower,
                      p.upper + share * extra[p.horizon].upper)
        if p.horizon in extra else p for p in s.forecast)
    return dataclasses.replace(s, current_rps=s.current_rps + share * gone.current_rps,
                               forecast=pts)


def _remove(scores: dict[str, LoadScore], i: int, c: RemoveTarget) -> None:
    gone = scores.pop(c.endpoint_id, None)
    if gone is None:
        raise ScenarioError(i, f"no forecast for endpoint {c.endpoint_id!r}")
    others = [s for s in scores.values() if s.api == gone.api]
    if not others:
        raise ScenarioError(i, f"endpoint {c.endpoint_id!r} is the last of api "
                               f"{gone.api!r}: nothing could take its demand")
    total = sum(s.capacity_rps for s in others)
    for s in others:  # by capacity; equally when no capacity is known
        share = s.capacity_rps / total if total > 0 else 1 / len(others)
        scores[s.endpoint_id] = _plus(s, gone, share)


def _mirror(scores: dict[str, LoadScore], i: int, c: AddMirror) -> None:
    region = [s for s in scores.values() if s.api == c.api and s.region == c.region]
    if not region:
        raise ScenarioError(i, f"no forecast for api {c.api!r} in region {c.region!r}")
    like = max(region, key=lambda s: s.computed_at)
    eid = f"{c.api}-mirror-{c.region}-{MIRROR_SUFFIX}-{i}"
    pts = tuple(ForecastPoint(p.horizon, p.at, 0.0, 0.0, 0.0) for p in like.forecast)
    scores[eid] = dataclasses.replace(
        like, endpoint_id=eid, capacity_rps=c.capacity_rps, capacity_source="CONFIGURED",
        current_rps=0.0, predicted_utilization=0.0, score=1.0, forecast=pts,
        reasons=("scenario mirror",))


def apply_changes(scores: Iterable[LoadScore], changes: Sequence[Change]) -> list[LoadScore]:
    """The scores after ``changes``, in order (ScenarioError names the change that fails)."""
    out = {s.endpoint_id: s for s in scores}
    for i, c in enumerate(changes):
        if isinstance(c, DemandFactor):
            if c.factor < 0:
                raise ScenarioError(i, "factor must be >= 0")
            for eid, s in list(out.items()):
                if (c.api is None or s.api == c.api) and (c.region is None
                                                          or s.region == c.region):
                    out[eid] = _scaled(s, c.factor)
        elif isinstance(c, RemoveTarget):
            _remove(out, i, c)
        else:
            if c.capacity_rps <= 0:
                raise ScenarioError(i, "capacity_rps must be > 0")
            _mirror(out, i, c)
    return sorted(out.values(), key=lambda s: s.endpoint_id)


def _ratio(v: float, capacity: float) -> float | None:
    return round(v / capacity, 6) if capacity > 0 else None


def endpoint_view(s: LoadScore, now_ms: int) -> dict[str, Any]:
    """One endpoint's predicted utilization per horizon and its overload horizons."""
    cap = s.capacity_rps
    points = [{"horizon": p.horizon, "at": p.at, "mean": p.mean, "upper": p.upper,
               "utilization": _ratio(p.mean, cap), "upper_utilization": _ratio(p.upper, cap)}
              for p in s.forecast]
    return {"endpoint_id": s.endpoint_id, "api": s.api, "region": s.region,
            "capacity_rps": cap, "stale": s.is_stale(now_ms), "points": points,
            "overload_horizons": [p.horizon for p in s.forecast if cap > 0 and p.upper > cap]}


def overload_windows(d: RegionalDemand) -> list[dict[str, Any]]:
    """Runs of grid points where the upper band exceeds the capacity."""
    out: list[dict[str, Any]] = []
    run: list[tuple[int, float, float, float]] = []
    for p in [*d.points, None]:
        if p is not None and d.capacity_rps > 0 and p[3] > d.capacity_rps:
            run.append(p)
        elif run:
            out.append({"start": run[0][0], "end": run[-1][0],
                        "peak_upper": max(q[3] for q in run)})
            run = []
    return out


def region_view(d: RegionalDemand) -> dict[str, Any]:
    """One (api, region)'s demand on the planner's grid, as utilization."""
    cap = d.capacity_rps
    return {"api": d.api, "region": d.region, "capacity_rps": cap, "endpoints": d.endpoints,
            "step_ms": d.step_ms,
            "points": [{"at": at, "mean": m, "upper": hi, "utilization": _ratio(m, cap),
                        "upper_utilization": _ratio(hi, cap)} for at, m, _, hi in d.points],
            "overload_windows": overload_windows(d)}


def record_of(s: LoadScore) -> dict[str, Any]:
    """A LoadScore as the record dict the planner consumes."""
    return dataclasses.asdict(s)


@dataclass(frozen=True)
class RunningMirror:
    """A mirror reported running (its latest mirror-status) since ``since_ms``."""

    api: str
    region: str
    since_ms: int


def _restore(planner: MirrorPlanner, running: Iterable[RunningMirror]) -> None:
    cmds = []
    for m in running:
        spec = planner.config.bundles.get(m.api)
        cmds.append({"api": m.api, "region": m.region, "sequence": m.since_ms,
                     "action": "ACTIVATE", "issued_at": m.since_ms,
                     "desired_instances": spec.min_instances if spec else 1,
                     "bundle_digest": spec.digest if spec else "",
                     "command_id": f"running/{m.api}/{m.region}"})
    planner.restore(cmds)


def planner_commands(scores: Iterable[LoadScore], config: PlannerConfig, now_ms: int,
                     running: Iterable[RunningMirror] = ()) -> list[dict[str, Any]]:
    """What a fresh :class:`MirrorPlanner` with ``config``, told of the ``running``
    mirrors, would command now, unsigned."""
    planner = MirrorPlanner(config, Signer("scenario", generate_keypair()[0]))
    _restore(planner, running)
    for s in scores:
        planner.observe_score(record_of(s), now_ms=now_ms)
    return [{k: v for k, v in c.items() if k not in UNSIGNED}
            for c in planner.evaluate(now_ms)]


def evaluate(scores: Sequence[LoadScore], config: PlannerConfig, now_ms: int,
             running: Iterable[RunningMirror] = ()) -> ScenarioResult:
    """Utilization per endpoint and per (api, region), overloads, planner commands."""
    table = DemandTable(central_region="", central_capacity_rps=None)  # every region
    for s in scores:
        table.apply(record_of(s))
    keys = table.keys()  # (api, region) pairs: a method, not a dict
    regions = [d for api, region in keys if (d := table.demand(api, region, now_ms)) is not None]
    return ScenarioResult(
        endpoints=[endpoint_view(s, now_ms) for s in scores],
        regions=[region_view(d) for d in regions],
        commands=planner_commands(scores, config, now_ms, running))
