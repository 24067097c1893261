"""Mirror planning: predicted regional demand in, signed MirrorCommand records out.

Plain Python (no Kafka, no Faust): :class:`DemandTable` keeps the latest LoadScore of
every endpoint and sums their forecasts per (api, region); :class:`MirrorPlanner` turns
those sums into commands. ``processors.apps.planner`` is the Faust wiring; the routing
sidecar's traffic director uses :class:`DemandTable` too, so both judge demand alike.

**Regional demand.** An endpoint's score counts while it is fresh (``valid_until`` not
passed) and its forecast reaches the future (a replayed or late score whose points all lie
in the past says nothing about what comes). Its curve is ``current_rps`` at
``computed_at`` followed by its forecast points (``at``, ``mean``), interpolated linearly
and held after the last point; the region's demand is the sum of those curves on a grid of
the smallest model step. A mirror's curve (``{api}-mirror-{region}-...``, as the traffic
director names it) is its ``current_rps`` held flat: the demand it carries is the region's,
diverted. **The region's demand series** (``{api}-demand-{region}``, see
:func:`demand_series_id`): an edge sidecar counts every request of its region that needs
an origin under that id, whichever endpoint or mirror serves it (or none), so its
forecaster learns what the region asks for, not the share left to the central endpoints
once a mirror took the rest (a series a mirror censors: the endpoints' forecasters learn
"no spike" from the spikes the mirror carried). While that series has a fresh score it
alone is the region's demand; else the endpoints' and mirrors' curves are summed.
**Central capacity** is ``central_capacity_rps[api]`` when configured, else the sum of the
endpoints' ``capacity_rps``: the endpoints a region's telemetry names are the central ones
serving it (the demand series' capacity is not counted).

**Rules** per (api, region) outside the central region, for APIs with a bundle:

- *Activate* when the first predicted crossing of ``activate_ratio`` × capacity is at most
  the lead time away, lead = measured activation time (the slowest of the last few
  command → READY delays seen on mirror-status; ``activation_seconds`` until one is seen)
  + ``margin_seconds``: early enough to be ready before the crossing, not needlessly
  earlier. ``desired_instances`` = peak predicted demand over the horizon / one
  instance's capacity, rounded up, within ``[min_instances, max_instances]`` (the
  director sends all of the region's requests to the mirror).
- *Scale up* (ACTIVATE with more instances) at once when the peak needs more.
- *Retire* once the peak over the whole horizon has stayed below ``retire_ratio`` ×
  capacity for ``cooldown_seconds``; between the two ratios nothing changes (hysteresis).
- Two commands that change state (activate ↔ retire) are at least ``cooldown_seconds``
  apart, so a forecast oscillating around the threshold cannot make commands alternate
  faster than the cool-down. No fresh score: hold (missing data is not low demand).

Every command carries ``sequence`` = max(previous + 1, issue time in ms) per (api,
region) (monotonic across planner restarts even without the restored state), an expiry
``command_ttl_seconds`` after issue, and an Ed25519 signature (:mod:`processors.signing`).

>>> from processors.signing import Signer, generate_keypair
>>> cfg = PlannerConfig(bundles={"orders": BundleSpec("sha256:" + "a" * 64)},
...                     activation_seconds=2, margin_seconds=2, cooldown_seconds=60)
>>> planner = MirrorPlanner(cfg, Signer("k1", generate_keypair()[0]))
>>> def score(now, means):
...     return {"endpoint_id": "orders-eu-1", "api": "orders", "region": "eu",
...             "computed_at": now, "valid_until": now + 2000, "capacity_rps": 100.0,
...             "current_rps": means[0], "step_seconds": 1,
...             "forecast": [{"horizon": h, "at": now + 1000 * h, "mean": m, "lower": m,
...                           "upper": m} for h, m in enumerate(means, 1)]}
>>> planner.observe_score(score(0, [50, 60, 70, 80, 90, 99, 120]), now_ms=0)
>>> planner.evaluate(now_ms=0)   # crossing 7 s ahead, lead 4 s: not yet
[]
>>> planner.observe_score(score(3000, [80, 90, 99, 120, 130]), now_ms=3000)
>>> [(c["action"], c["desired_instances"]) for c in planner.evaluate(now_ms=3000)]
[('ACTIVATE', 1)]
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.signing import Signer


@dataclass(frozen=True)
class BundleSpec:
    """The bundle that mirrors an API, and what one instance serves."""

    digest: str
    instance_capacity_rps: float | None = None  # None: always min_instances
    min_instances: int = 1
    max_instances: int = 1


@dataclass(frozen=True)
class PlannerConfig:
    """Tunables of the planner (``mirror`` section of the settings)."""

    bundles: Mapping[str, BundleSpec]
    central_capacity_rps: Mapping[str, float] = field(default_factory=dict)
    central_region: str = "central"
    activation_seconds: float = 30.0
    margin_seconds: float = 10.0
    cooldown_seconds: float = 300.0
    activate_ratio: float = 1.0
    retire_ratio: float = 0.8
    command_ttl_seconds: float = 120.0
    activation_samples: int = 5


@dataclass(frozen=True)
class RegionalDemand:
    """Predicted demand of one (api, region): ``points`` are (at ms, mean, lower, upper)
    on the grid, after ``now_ms`` (whose value is ``current_rps``)."""

    api: str
    region: str
    now_ms: int
    current_rps: float
    capacity_rps: float
    step_ms: int
    points: list[tuple[int, float, float, float]]
    endpoints: int

    def crossing(self, threshold: float) -> int | None:
        """Epoch ms when demand first exceeds ``threshold`` (``now_ms`` if it does now)."""
        if self.current_rps > threshold:
            return self.now_ms
        for at, mean, _, _ in self.points:
            if mean > threshold:
                return at
        return None

    def crossing_value(self, threshold: float) -> float:
        """The demand at :meth:`crossing` (the peak when there is none)."""
        if self.current_rps > threshold:
            return self.current_rps
        return next((m for _, m, _, _ in self.points if m > threshold), self.peak())

    def peak(self, within_ms: int | None = None) -> float:
        """Highest predicted (or current) demand, over the horizon or ``within_ms``."""
        until = None if within_ms is None else self.now_ms + within_ms
        means = [m for at, m, _, _ in self.points if until is None or at <= until]
        if within_ms is not None and not means and self.points:
            means = [self.points[0][1]]  # at least the next step
        return max([self.current_rps, *means])

    def forecast_records(self) -> list[dict[str, Any]]:
        """The points as ForecastPoint dicts (for MirrorCommand.forecast)."""
        return [{"horizon": i, "at": at, "mean": m, "lower": lo, "upper": hi}
                for i, (at, m, lo, hi) in enumerate(self.points, 1)]


@dataclass(frozen=True)
class _Score:
    computed_at: int
    valid_until: int
    step_ms: int
    current: float
    capacity: float
    points: tuple[tuple[int, float, float, float], ...]


def _value(anchor: tuple[int, float], pts: tuple[tuple[int, float, float, float], ...],
           t: int, col: int) -> float:
    """Piecewise-linear value of column ``col`` (1 mean, 2 lower, 3 upper) at ``t``."""
    prev_t, prev_v = anchor
    for p in pts:
        if t <= p[0]:
            if p[0] <= prev_t:
                return p[col]
            w = (t - prev_t) / (p[0] - prev_t)
            return prev_v + w * (p[col] - prev_v) if w > 0 else prev_v
        prev_t, prev_v = p[0], p[col]
    return prev_v


def demand_series_id(api: str, region: str) -> str:
    """The endpoint id under which a region's demand for ``api`` is counted and forecast.

    >>> demand_series_id("orders", "eu")
    'orders-demand-eu'
    """
    return f"{api}-demand-{region}"


class DemandTable:
    """The latest score of every endpoint, summed per (api, region) on request."""

    def __init__(self, central_region: str = "central",
                 central_capacity_rps: Mapping[str, float] | None = None) -> None:
        self.central_region = central_region
        self.capacity_override = dict(central_capacity_rps or {})
        self._scores: dict[tuple[str, str], dict[str, _Score]] = {}
        self.ignored = 0

    def apply(self, record: Mapping[str, Any]) -> tuple[str, str] | None:
        """Take one LoadScore dict; returns its (api, region), None if not kept (the
        central region, or older than the score already held)."""
        region = str(record.get("region") or "")
        if not region or region == self.central_region:
            self.ignored += 1
            return None
        key = (str(record["api"]), region)
        eps = self._scores.setdefault(key, {})
        endpoint = str(record["endpoint_id"])
        prev = eps.get(endpoint)
        computed = int(record["computed_at"])
        if prev is not None and computed < prev.computed_at:
            return None
        pts = tuple(sorted(
            (int(p["at"]), float(p["mean"]), float(p["lower"]), float(p["upper"]))
            for p in record.get("forecast") or ()
            if all(math.isfinite(float(p[k])) for k in ("mean", "lower", "upper"))
        ))
        cur = float(record.get("current_rps") or 0.0)
        cap = float(record.get("capacity_rps") or 0.0)
        if endpoint.startswith(f"{key[0]}-mirror-{region}-") and math.isfinite(cur):
            # A mirror (named so by the traffic director) carries the region's demand,
            # diverted: the regular endpoints' forecasts already predict it, and the
            # mirror's own forecaster is seconds old, so its forecast lingers after the
            # mirror stops carrying traffic and counted the same demand twice. What it
            # carries now counts, held flat.
            pts = tuple((at, cur, cur, cur) for at, _, _, _ in pts)
        eps[endpoint] = _Score(computed, int(record["valid_until"]),
                               max(1, int(record.get("step_seconds") or 1)) * 1000,
                               cur if math.isfinite(cur) else 0.0,
                               cap if math.isfinite(cap) else 0.0, pts)
        return key

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._scores)

    def demand(self, api: str, region: str, now_ms: int) -> RegionalDemand | None:
        """The region's predicted demand now; None without a fresh, forward-looking score."""
        fresh = {e: s for e, s in self._scores.get((api, region), {}).items()
                 if s.valid_until >= now_ms and s.points and s.points[-1][0] > now_ms}
        if not fresh:
            return None
        series = fresh.pop(demand_series_id(api, region), None)
        # The region's own demand, while fresh, is all of it: nothing is added to it.
        live = [series] if series is not None else list(fresh.values())
        step = min(s.step_ms for s in live)
        horizon = max(s.points[-1][0] for s in live)
        n = max(1, math.ceil((horizon - now_ms) / step))
        grid = [now_ms + k * step for k in range(1, n + 1)]
        points = []
        for t in grid:
            vals = [0.0, 0.0, 0.0]
            for s in live:
                fut = tuple(p for p in s.points if p[0] > s.computed_at)
                for col in (1, 2, 3):
                    vals[col - 1] += _value((s.computed_at, s.current), fut, t, col)
            points.append((t, vals[0], min(vals[0], vals[1]), max(vals[0], vals[2])))
        current = sum(s.current for s in live)  # as last measured
        # the demand series' capacity is not the region's (mirrors' is: what-if scenarios
        # add capacity as a mirror)
        capacity = self.capacity_override.get(api) or sum(s.capacity for s in fresh.values())
        return RegionalDemand(api, region, now_ms, current, capacity, step, points,
                              len(fresh))


@dataclass
class MirrorState:
    """What the planner last ordered for one (api, region)."""

    api: str
    region: str
    active: bool = False
    instances: int = 0
    digest: str = ""
    sequence: int = 0
    last_command_id: str = ""
    last_change_ms: int | None = None  # last activate/retire (not scale-ups)
    low_since_ms: int | None = None


class MirrorPlanner:
    """Commands from regional demand; see the module docstring for the rules."""

    def __init__(self, config: PlannerConfig, signer: Signer) -> None:
        self.config = config
        self.signer = signer
        self.demand = DemandTable(config.central_region, config.central_capacity_rps)
        self.states: dict[tuple[str, str], MirrorState] = {}
        self.activation_s: dict[str, deque[float]] = {}
        self._issued: dict[str, int] = {}  # command_id -> issued_at (ms), bounded
        self.unplanned: set[str] = set()  # APIs with demand but no bundle configured

    # ----------------------------------------------------------------- inputs

    def observe_score(self, record: Mapping[str, Any], now_ms: int) -> None:
        """One LoadScore dict."""
        self.demand.apply(record)

    def observe_status(self, record: Mapping[str, Any]) -> float | None:
        """One MirrorStatus dict; returns the activation time it measured (seconds), if
        it is the first READY of one of this planner's commands."""
        cid = str(record.get("command_id", ""))
        state = str(record.get("state", ""))
        key = (str(record.get("api", "")), str(record.get("region", "")))
        st = self.states.get(key)
        if state in ("REJECTED", "FAILED") and st is not None and st.active \
                and cid == st.last_command_id:
            # The mirror did not come up: forget it, so a later ACTIVATE can retry it.
            st.active, st.instances = False, 0
            return None
        if state != "READY" or cid not in self._issued:
            return None
        issued = self._issued.pop(cid)
        seconds = max(0.0, (int(record["at"]) - issued) / 1000.0)
        samples = self.activation_s.setdefault(
            key[0], deque(maxlen=self.config.activation_samples))
        samples.append(seconds)
        return seconds

    def restore(self, commands: Iterable[Mapping[str, Any]]) -> int:
        """Continue from this planner's earlier commands (read back from the topic)."""
        n = 0
        for c in sorted(commands, key=lambda c: int(c["sequence"])):
            key = (str(c["api"]), str(c["region"]))
            st = self.states.setdefault(key, MirrorState(*key))
            if int(c["sequence"]) <= st.sequence:
                continue
            active = c["action"] == "ACTIVATE" and int(c["desired_instances"]) > 0
            if active != st.active:
                st.last_change_ms = int(c["issued_at"])
            st.active, st.instances = active, int(c["desired_instances"]) if active else 0
            st.digest, st.sequence = str(c["bundle_digest"]), int(c["sequence"])
            st.last_command_id = str(c["command_id"])
            self._remember(st.last_command_id, int(c["issued_at"]))
            n += 1
        return n

    # ----------------------------------------------------------------- decisions

    def activation_estimate(self, api: str) -> float:
        """Seconds from command to READY to plan for: the slowest recent measurement."""
        samples = self.activation_s.get(api)
        return max(samples) if samples else self.config.activation_seconds

    def lead_seconds(self, api: str) -> float:
        return self.activation_estimate(api) + self.config.margin_seconds

    def evaluate(self, now_ms: int) -> list[dict[str, Any]]:
        """The commands to issue now (signed MirrorCommand dicts)."""
        out = []
        for key in sorted(set(self.demand.keys()) | set(self.states)):
            cmd = self._evaluate_one(key, now_ms)
            if cmd is not None:
                out.append(cmd)
        return out

    def _evaluate_one(self, key: tuple[str, str], now_ms: int) -> dict[str, Any] | None:
        api, region = key
        cfg = self.config
        spec = cfg.bundles.get(api)
        st = self.states.get(key)
        if spec is None:
            self.unplanned.add(api)
            return None
        d = self.demand.demand(api, region, now_ms)
        if d is None:
            return None
        up, down = d.capacity_rps * cfg.activate_ratio, d.capacity_rps * cfg.retire_ratio
        cooldown_ms = int(cfg.cooldown_seconds * 1000)
        lead_s = self.lead_seconds(api)
        if st is None or not st.active:
            crossing = d.crossing(up)
            if crossing is None or crossing - now_ms > lead_s * 1000:
                return None
            if st is not None and st.last_change_ms is not None \
                    and now_ms - st.last_change_ms < cooldown_ms:
                return None  # retired less than a cool-down ago
            peak = d.peak()
            n = self._instances(spec, peak)
            reason = (f"predicted {_rps(d.crossing_value(up))} > central capacity "
                      f"{_rps(d.capacity_rps)} in {max(0, crossing - now_ms) / 1000:.1f} s "
                      f"(lead {lead_s:.1f} s = activation {self.activation_estimate(api):.1f}"
                      f" s + margin {cfg.margin_seconds:.1f} s); peak {_rps(peak)}, "
                      f"{n} instance(s)")
            return self._issue(key, "ACTIVATE", spec.digest, n, d, now_ms, reason, change=True)
        peak = d.peak()
        if peak > up:
            st.low_since_ms = None
            n = self._instances(spec, peak)
            if n > st.instances or spec.digest != st.digest:
                reason = (f"peak {_rps(peak)} needs {n} instance(s), "
                          f"{st.instances} running" if n > st.instances
                          else f"bundle changed to {spec.digest}")
                return self._issue(key, "ACTIVATE", spec.digest, max(n, st.instances), d,
                                   now_ms, reason, change=False)
            return None
        if peak >= down:
            st.low_since_ms = None  # in the hysteresis band: hold
            return None
        if st.low_since_ms is None:
            st.low_since_ms = now_ms
        low_for = now_ms - st.low_since_ms
        since_change = now_ms - (st.last_change_ms or 0)
        if low_for < cooldown_ms or since_change < cooldown_ms:
            return None
        reason = (f"peak {_rps(peak)} < {cfg.retire_ratio:g} x central capacity "
                  f"{_rps(d.capacity_rps)} for {low_for / 1000:.1f} s")
        return self._issue(key, "RETIRE", st.digest, 0, d, now_ms, reason, change=True)

    def _instances(self, spec: BundleSpec, peak: float) -> int:
        if not spec.instance_capacity_rps:
            return spec.min_instances
        n = math.ceil(peak / spec.instance_capacity_rps)
        return max(spec.min_instances, min(spec.max_instances, n))

    def _issue(self, key: tuple[str, str], action: str, digest: str, instances: int,
               d: RegionalDemand, now_ms: int, reason: str, *, change: bool) -> dict[str, Any]:
        st = self.states.setdefault(key, MirrorState(*key))
        st.sequence = max(st.sequence + 1, now_ms)
        cid = f"{key[0]}/{key[1]}/{st.sequence}-{uuid.uuid4().hex[:6]}"
        record = {
            "command_id": cid, "action": action, "api": key[0], "region": key[1],
            "bundle_digest": digest, "desired_instances": instances,
            "sequence": st.sequence, "issued_at": now_ms,
            "expires_at": now_ms + int(self.config.command_ttl_seconds * 1000),
            "reason": reason, "central_capacity_rps": d.capacity_rps,
            "forecast": d.forecast_records(), "key_id": self.signer.key_id,
        }
        st.active = action == "ACTIVATE"
        st.instances = instances
        st.digest = digest
        st.last_command_id = cid
        st.low_since_ms = None
        if change:
            st.last_change_ms = now_ms
        self._remember(cid, now_ms)
        return self.signer.sign(record)

    def _remember(self, cid: str, issued_ms: int) -> None:
        self._issued[cid] = issued_ms
        while len(self._issued) > 1000:
            self._issued.pop(next(iter(self._issued)))


def _rps(v: float) -> str:
    return f"{v:.1f} rps"
