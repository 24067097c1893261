"""Pre-scaling: capacity that takes time to come up, brought up by reaction or by forecast.

A pool of identical instances (worker slots, queues, deadlines: ``backends.py``) of which
``min_instances`` are always on; more, up to ``max_instances``, can be requested and serve
only ``activation_intervals`` monitoring intervals after the request (2-5: a pod that pulls
and warms, an edge mirror that starts). The load is a compressed day (a trace from
``streams/traces`` or ``--trace FILE``, or the seasonal shape) with **recurring spikes**:
the same flash crowds at the same time of day in every season, history included (a daily
batch, a scheduled broadcast) -- what a seasonal forecaster can know and a reactive
autoscaler cannot.

Lanes (all route with the sidecar's real ``Router``; instances not active are ejected):

- ``hpa+peak-ewma``: the Kubernetes HPA algorithm on observed utilization every interval:
  ``desired = ceil(current * utilization / target)``, no change within the tolerance
  (0.1), scale-up at once, scale-down to the highest recommendation of the stabilization
  window (Kubernetes' default is 300 s; 120 s here, in a day compressed to 900 s);
  peak-EWMA routing.
- ``loadcast``: the project's own forecast (``processors.endpoint.EndpointModel``: the
  stepper, ``make_forecaster("default")``, the LoadScore's forecast points) of the pool's
  demand, fed the agent's windows; the planner rule of ``processors.mirroring`` (act when
  the predicted crossing is within the lead time = activation time + margin; size for the
  peak of the points up to the lead time and one step, planning for the forecast's mean +
  ``plan_band`` (0.3) of the way to its upper band -- a margin -- or for the whole upper
  band (``event_band``) when the mean crosses what the always-on instances serve at the
  target: the peak of a spike on a bursty base is the spike times a burst, which no mean
  knows; a planned size is held for the window it was sized on, lead time + one step) with
  the HPA recommendation, stabilization window included, as a floor (never below what
  reaction would do); ``predictive`` routing (equal weights: in a homogeneous pool it routes
  as peak-EWMA, so the difference is capacity timing alone).
- ``loadcast-persistence``: the ablation, the same with the forecaster replaced by
  persistence.
- ``oracle``: the same planner reading the true future load.

Per run: SLO-violation seconds (seconds whose requests have p99 over the SLO or more than
1 % errors, shed included), p99 and errors in the spike phases, lead time of capacity
(from the first second the serving capacity covered the spike's peak demand at 80 %
utilization to the first second demand crossed 80 % of the always-on capacity; positive =
ready before the crossing), and cost in instance-seconds (requested instances pay from the
request on).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.routing_sim.backends import BackendSpec, ServiceTime
from benchmarks.routing_sim.control import _position_kw, _window
from benchmarks.routing_sim.engine import OK, T0, RunResult, SimConfig, Simulation
from benchmarks.routing_sim.loadshape import LoadShape, read_trace
from benchmarks.routing_sim.scenarios import ScaledScenario
from processors.endpoint import EndpointModel, ProcessorConfig

LANES = ("hpa+peak-ewma", "loadcast", "loadcast-persistence", "oracle")
REACTIVE_LANE = "hpa+peak-ewma"
#: capacity "covers" demand at this utilization (lead time and "ready before")
READY_UTIL = 0.8
ABLATION_LANE = "loadcast-persistence"


def load_trace(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A ``timestamp,value`` CSV, or one count per line: (seconds, values). ValueError
    names the file and line of the first bad row."""
    with open(path) as fh:
        first = fh.readline()
    if "," in first:
        return read_trace(path)
    ys: list[float] = []
    with open(path) as fh:
        for i, line in enumerate(fh, start=1):
            s = line.strip()
            if not s:
                continue
            try:
                y = float(s)
            except ValueError:
                raise ValueError(f"{path}:{i}: bad value {s!r}") from None
            if not math.isfinite(y) or y < 0:
                raise ValueError(f"{path}:{i}: value must be finite and >= 0, got {y}")
            ys.append(y)
    if len(ys) < 2:
        raise ValueError(f"{path}: needs at least 2 values")
    return np.arange(len(ys), dtype=float), np.asarray(ys)


@dataclass
class PrescaleScenario(ScaledScenario):
    """The pre-scaling scenario."""

    slots: int = 8
    min_instances: int = 3
    max_instances: int = 8
    activation_intervals: float = 3.0
    target_util: float = 0.6
    tolerance: float = 0.1
    stabilization_s: float = 120.0  # scale-down window (Kubernetes' default 300 s)
    day_s: float = 900.0
    mean_util: float = 0.55  # base load's mean, of the always-on capacity
    amplitude: float = 0.3
    spikes: tuple[tuple[float, float, float], ...] = ((120.0, 210.0, 2.6), (450.0, 540.0, 2.0))
    ramp_s: float = 3.0
    margin_intervals: float = 1.0
    plan_band: float = 0.3  # plan for mean + plan_band x (upper - mean) of the forecast band
    event_band: float = 1.0  # ... and this far when a crossing of the always-on pool is predicted

    @property
    def duration_s(self) -> float:
        return self.t(self.day_s)

    @property
    def lead_s(self) -> float:
        """How far ahead the planner must act: activation time + margin."""
        return (self.activation_intervals + self.margin_intervals) * self.interval_s

    @property
    def plan_hold_s(self) -> float:
        """How long a planned size is held: the window of forecast points it was sized
        on (the lead time and one step)."""
        return self.lead_s + self.step_s

    @property
    def instance_rps(self) -> float:
        return self.spec(0).capacity_rps

    def spec(self, i: int) -> BackendSpec:
        svc = ServiceTime("lognormal", self.median_s, self.sigma)
        return BackendSpec(f"i{i}", self.slots, svc, self.queue_per_slot * self.slots)

    def spike_windows(self) -> list[tuple[float, float, float]]:
        return [(self.t(a), self.t(b), f) for a, b, f in self.spikes]

    def load(self) -> LoadShape:
        """Base shape (trace or seasonal) x recurring spikes, in the run and the history."""
        bin_s = 0.1
        n = round(self.duration_s / bin_s)
        total = (self.history_seasons + 1) * n
        mean = self.mean_util * self.min_instances * self.instance_rps
        if self.trace is not None:
            ts, ys = load_trace(self.trace)
            x = (ts - ts[0]) / max(ts[-1] - ts[0], 1e-9) * (total - 1)
            r = np.interp(np.arange(total), x, ys)
            r = np.maximum(r * (mean / max(float(r[-n:].mean()), 1e-9)), 0.0)
            # the trace's own peaks may exceed the pool: cap the base at 80 % of min capacity
            r = np.minimum(r, 0.8 * self.min_instances * self.instance_rps)
        else:
            t = np.arange(-self.history_seasons * n, n) * bin_s
            r = mean * (1.0 - self.amplitude * np.cos(2 * math.pi * t / self.duration_s))
        tt = (np.arange(total) % n) * bin_s  # time of day of every bin, history included
        mult = np.ones(total)
        ramp = self.t(self.ramp_s)
        for a, b, f in self.spike_windows():
            up = np.clip((tt - a) / max(ramp, 1e-9), 0.0, 1.0)
            down = np.clip((b - tt) / max(ramp, 1e-9), 0.0, 1.0)
            mult *= 1.0 + (f - 1.0) * np.minimum(up, down)
        r = r * mult
        src = f"trace:{self.trace.name}" if self.trace else "seasonal"
        return LoadShape(r[-n:], bin_s, r[:-n], src)

    def config(self, seed: int, load: LoadShape) -> SimConfig:
        return SimConfig([self.spec(i) for i in range(self.max_instances)], load,
                         arrivals="poisson", deadline_s=self.deadline_s, seed=seed,
                         interval_s=self.interval_s)

    def describe(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s, "instance": {
                "slots": self.slots, "capacity_rps": round(self.instance_rps, 1),
                "service_median_ms": self.median_s * 1000, "sigma": self.sigma,
                "queue_limit": self.queue_per_slot * self.slots},
            "instances": [self.min_instances, self.max_instances],
            "activation_s": self.activation_intervals * self.interval_s,
            "activation_intervals": self.activation_intervals,
            "interval_s": self.interval_s, "target_utilization": self.target_util,
            "hpa_tolerance": self.tolerance,
            "stabilization_s": self.t(self.stabilization_s),
            "load": "trace:" + self.trace.name if self.trace else "seasonal",
            "spikes": [{"start_s": a, "end_s": b, "factor": f}
                       for a, b, f in self.spike_windows()],
            "slo_ms": self.slo_ms, "deadline_s": self.deadline_s, "plan_band": self.plan_band,
            "event_band": self.event_band, "plan_hold_s": self.plan_hold_s,
        }


class ScalingControl:
    """Drives the pool size of one lane; ``mode`` is ``hpa``, ``forecast`` or ``oracle``."""

    def __init__(self, sc: PrescaleScenario, mode: str, load: LoadShape,
                 forecaster: str = "default") -> None:
        self.sc, self.mode, self.load, self.forecaster = sc, mode, load, forecaster
        self.requested: list[tuple[float, int]] = []  # (t, instances requested)
        self.ready_at: list[float] = []  # per instance: when it serves (inf: not requested)
        self.samples: list[float] = []
        self.serving: dict[int, int] = {}  # second -> instances serving
        self.count = 0
        self.recs: deque[tuple[float, int]] = deque()  # HPA recommendations (stabilization)
        self.planned: deque[tuple[float, int]] = deque()  # the planner's sizes (plan_hold_s)
        self._pos = 0

    # -- set-up -----------------------------------------------------------------------

    def start(self, sim: Simulation) -> None:
        sc = self.sc
        self.sim = sim
        n = sc.max_instances
        self.ready_at = [0.0 if i < sc.min_instances else math.inf for i in range(n)]
        self.want = sc.min_instances
        for i, e in enumerate(sim.endpoints):
            e.weight = 1.0
            if i >= sc.min_instances:
                e.ejected_until = math.inf
        sim.route.stale = False
        self.requested.append((0.0, self.want))
        if self.mode == "forecast":
            cfg = ProcessorConfig(
                forecaster=self.forecaster, step_seconds=sc.step_s,
                season_seconds=max(1, round(sc.duration_s)), horizon=sc.horizon,
                lateness_seconds=sc.interval_s,
                capacity_rps={"pool": sc.max_instances * sc.instance_rps})
            self.model = EndpointModel.create("pool", cfg)
            self._kw = _position_kw()
            self.forecast: list[tuple[float, float, float]] = []
            self._prefeed()
        sim.schedule(1.0, self._sample)
        sim.schedule(sc.interval_s, self._tick)

    def _observe(self, count: int, end_s: float) -> None:
        iv = self.sc.interval_s
        w = _window("pool", self.sim.cfg.api, round((end_s - iv) * 1000), round(end_s * 1000),
                    count, 100.0, 160.0, 200.0)
        self._pos += 1
        pos: Any = (self._pos, 0) if self._kw == "position" else self._pos
        obs = self.model.observe(w, **{self._kw: pos}, now=end_s + 0.5)
        if obs.score is not None and obs.score.get("forecast"):
            self.forecast = [(p["at"] / 1000.0 - T0, p["mean"], p["upper"])
                             for p in obs.score["forecast"]]

    def _prefeed(self) -> None:
        iv = self.sc.interval_s
        per = max(1, round(iv / self.load.bin_s))
        h = self.load.history
        k = h.size // per
        rates = h[-k * per:].reshape(k, per).mean(axis=1) if k else np.zeros(0)
        for j, r in enumerate(rates):
            self._observe(round(r * iv), T0 - (k - j - 1) * iv)

    # -- the loop -----------------------------------------------------------------------

    def _sample(self, t: float) -> None:
        """Once a second: utilization of the active instances (busy slots / slots)."""
        active = [b for i, b in enumerate(self.sim.backends) if self.ready_at[i] <= t]
        self.serving[int(t)] = len(active)
        if active:
            self.samples.append(sum(min(b.busy, self.sc.slots) for b in active)
                                / (self.sc.slots * len(active)))
        self._activate(t)
        if t + 1.0 <= self.load.duration_s + 5:
            self.sim.schedule(t + 1.0, self._sample)

    def _activate(self, t: float) -> None:
        for i, e in enumerate(self.sim.endpoints):
            on = self.ready_at[i] <= t
            if on and e.ejected_until == math.inf:
                e.ejected_until = 0.0
            elif not on:
                e.ejected_until = math.inf

    def _hpa(self, t: float) -> int:
        sc = self.sc
        util = float(np.mean(self.samples)) if self.samples else 0.0
        self.samples = []
        current = sum(1 for r in self.ready_at if r <= t)
        ratio = util / sc.target_util
        if abs(ratio - 1.0) <= sc.tolerance:
            return self.want
        return max(sc.min_instances, min(sc.max_instances, math.ceil(current * ratio)))

    def _needed(self, t: float) -> int:
        """Instances for the peak demand expected before new capacity could serve."""
        sc = self.sc
        lead = sc.lead_s
        if self.mode == "oracle":
            grid = np.arange(t, t + lead + sc.interval_s, self.load.bin_s)
            peak = max(self.load.rate_at(x) for x in grid)
        else:
            pts = [(m, u) for at, m, u in self.forecast if at <= t + lead + sc.step_s]
            # a predicted event (the mean crosses what the always-on pool serves at the
            # target): size for its upper band, since the peak of a spike on a bursty
            # base is the spike times a burst no forecast's mean can know
            on = sc.min_instances * sc.instance_rps * sc.target_util
            b = sc.event_band if any(m > on for m, _ in pts) else sc.plan_band
            peak = max((m + b * (u - m) for m, u in pts), default=0.0)
        return math.ceil(peak / (sc.instance_rps * sc.target_util))

    def _tick(self, t: float) -> None:
        sc = self.sc
        hpa = self._hpa(t)
        if self.mode == "forecast":
            self._observe(self.count, T0 + t)
            self.count = 0
        rec = max(sc.min_instances, min(sc.max_instances, hpa))
        self.recs.append((t, rec))
        while self.recs and self.recs[0][0] < t - sc.t(sc.stabilization_s):
            self.recs.popleft()
        want = rec if rec >= self.want else max(r for _, r in self.recs)
        if self.mode != "hpa":
            # a planned size is held for the window its forecast covered (lead + one
            # step), not the HPA's stabilization window: the forecast already looked ahead
            self.planned.append((t, self._needed(t)))
            while self.planned[0][0] < t - sc.plan_hold_s:
                self.planned.popleft()
            planned = max(n for _, n in self.planned)
            want = max(want, min(sc.max_instances, planned))
        if want != self.want:
            self._resize(want, t)
        if t + sc.interval_s <= self.load.duration_s:
            self.sim.schedule(t + sc.interval_s, self._tick)

    def _resize(self, want: int, t: float) -> None:
        act = self.sc.activation_intervals * self.sc.interval_s
        for i in range(self.sc.max_instances):
            if i < want and self.ready_at[i] == math.inf:
                self.ready_at[i] = t + act
                self.sim.schedule(t + act, self._activate)
            elif i >= want:
                self.ready_at[i] = math.inf
        self.want = want
        self.requested.append((t, want))
        self._activate(t)

    def serving_history(self, n: int) -> np.ndarray:
        """Instances serving in each second ``[0, n)`` (sampled at the second's start)."""
        out = np.full(n, float(self.sc.min_instances))
        last = float(self.sc.min_instances)
        for k in range(n):
            last = float(self.serving.get(k, last))
            out[k] = last
        return out

    def on_response(self, backend: int, rtt_ms: float, status: int, t: float,
                    timed_out: bool) -> None:
        self.count += 1
        if self.ready_at[backend] > t:  # a retired instance answered: it stays out
            self.sim.endpoints[backend].ejected_until = math.inf


def run_lane(lane: str, seed: int, sc: PrescaleScenario) -> dict[str, Any]:
    """One run of one lane: its metrics."""
    load = sc.load()
    cfg = sc.config(seed, load)
    if lane == REACTIVE_LANE:
        ctl, policy = ScalingControl(sc, "hpa", load), "peak-ewma"
    elif lane == "loadcast":
        ctl, policy = ScalingControl(sc, "forecast", load), "predictive"
    elif lane == ABLATION_LANE:
        ctl, policy = ScalingControl(sc, "forecast", load, "persistence"), "predictive"
    elif lane == "oracle":
        ctl, policy = ScalingControl(sc, "oracle", load), "predictive"
    else:
        raise ValueError(f"unknown lane {lane!r}")
    sim = Simulation(cfg, policy, ctl)
    r = sim.run()
    return {"lane": lane, "seed": seed, **measure(r, ctl, sc, load)}


def _instances_over_time(ctl: ScalingControl, n: int) -> np.ndarray:
    """Requested instances per second (what is paid for)."""
    out = np.zeros(n)
    for t, k in ctl.requested:
        out[int(t):] = k
    return out


def measure(r: RunResult, ctl: ScalingControl, sc: PrescaleScenario,
            load: LoadShape) -> dict[str, Any]:
    n = math.ceil(r.duration_s)
    sec = r.t_arrival.astype(np.int64)
    order = np.argsort(sec, kind="stable")
    bounds = np.searchsorted(sec[order], np.arange(n + 1))
    bad_s = 0
    for k in range(n):
        idx = order[bounds[k]:bounds[k + 1]]
        if idx.size == 0:
            continue
        out = r.outcome[idx]
        err = float((out != OK).mean()) * 100.0
        p99 = float(np.percentile(r.rtt_ms[idx], 99))
        bad_s += int(p99 > sc.slo_ms or err > 1.0)
    spikes: list[dict[str, Any]] = []
    rate = np.array([load.rate_at(k + 0.5) for k in range(n)])
    cap_ready = ctl.serving_history(n) * sc.instance_rps
    for a, b, _ in sc.spike_windows():
        ia, ib = int(a), min(n, int(b))
        tail = int(sc.t(20.0))
        m = (r.t_arrival >= a) & (r.t_arrival < b + tail)
        out = r.outcome[m]
        lat = r.rtt_ms[m]
        lo = max(0, ia - int(sc.t(60.0)))
        base = sc.min_instances * sc.instance_rps * READY_UTIL  # the same for every lane
        cross = next((k for k in range(ia, ib) if rate[k] > base), None)
        need = float(rate[ia:ib].max()) / READY_UTIL
        ready = next((k for k in range(lo, ib) if cap_ready[k] >= need), None)
        lead = None if cross is None or ready is None else float(cross - ready)
        spikes.append({
            "start_s": a, "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "errors_pct": 100.0 * float((out != OK).mean()) if out.size else 0.0,
            "lead_s": lead, "ready_before": lead is not None and lead >= 0,
            "crossed": cross is not None,
        })
    paid = _instances_over_time(ctl, n)
    sm = (np.zeros(0, dtype=bool) if not spikes else np.zeros_like(r.t_arrival, dtype=bool))
    for a, b, _ in sc.spike_windows():
        sm |= (r.t_arrival >= a) & (r.t_arrival < b + sc.t(20.0))
    out = r.outcome[sm]
    return {
        "slo_violation_s": float(bad_s),
        "spike_p99_ms": float(np.percentile(r.rtt_ms[sm], 99)) if sm.any() else None,
        "spike_errors_pct": 100.0 * float((out != OK).mean()) if out.size else 0.0,
        "instance_s": float(paid.sum()),
        "spikes": spikes,
        "scale_events": len(ctl.requested) - 1,
    }


# -- aggregation ----------------------------------------------------------------------

#: the issue's targets for loadcast vs the reactive autoscaler
SLO_RATIO = 0.5
READY_SHARE = 0.9
COST_RATIO = 1.15


def _stats(values: list[float]) -> dict[str, Any]:
    """Median, mean and 95 % interval (Student t on the mean) over seeds."""
    from benchmarks.routing_sim.metrics import mean_ci

    got = [v for v in values if v is not None]
    if not got:
        return {"median": None, "mean": None, "ci95": None, "values": values}
    mean, half = mean_ci(got)
    return {"median": float(np.median(got)), "mean": mean, "ci95": half, "values": values}


def summarize(runs: list[dict[str, Any]], sc: PrescaleScenario) -> dict[str, Any]:
    lanes: dict[str, Any] = {}
    for lane in LANES:
        rs = sorted((r for r in runs if r["lane"] == lane), key=lambda r: r["seed"])
        if not rs:
            continue
        spikes = [s for r in rs for s in r["spikes"] if s["crossed"]]
        leads = [s["lead_s"] for s in spikes]
        lanes[lane] = {
            "slo_violation_s": _stats([r["slo_violation_s"] for r in rs]),
            "spike_p99_ms": _stats([r["spike_p99_ms"] for r in rs]),
            "spike_errors_pct": _stats([r["spike_errors_pct"] for r in rs]),
            "instance_s": _stats([r["instance_s"] for r in rs]),
            "lead_s": _stats([x for x in leads if x is not None]),
            "spikes_crossing": len(spikes),
            "ready_before": sum(1 for s in spikes if s["ready_before"]),
            "never_ready": sum(1 for x in leads if x is None),
        }
    out: dict[str, Any] = {"scenario": sc.describe(), "lanes": lanes, "seeds": len(
        {r["seed"] for r in runs})}
    if REACTIVE_LANE in lanes:
        ref = lanes[REACTIVE_LANE]
        for a in lanes.values():
            a["slo_vs_reactive"] = _ratio(a["slo_violation_s"], ref["slo_violation_s"])
            a["cost_vs_reactive"] = _ratio(a["instance_s"], ref["instance_s"])
        lc = lanes.get("loadcast")
        if lc:
            share = lc["ready_before"] / lc["spikes_crossing"] if lc["spikes_crossing"] else 0.0
            out["checks"] = {
                "prescale_slo_violation_le_0.5x_reactive": (
                    lc["slo_vs_reactive"] is not None and lc["slo_vs_reactive"] <= SLO_RATIO),
                "prescale_capacity_ready_before_ge_90pct_of_spikes": share >= READY_SHARE,
                "prescale_cost_le_1.15x_reactive": (
                    lc["cost_vs_reactive"] is not None and lc["cost_vs_reactive"] <= COST_RATIO),
            }
            ab = lanes.get(ABLATION_LANE)
            if ab:
                out["ablation"] = _between(lc["slo_violation_s"]["mean"],
                                           ab["slo_violation_s"]["mean"],
                                           ref["slo_violation_s"]["mean"])
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Ratio of means (a mean of 0 against 0 is 1: equal)."""
    if a["mean"] is None or b["mean"] is None:
        return None
    if b["mean"] == 0:
        return 1.0 if a["mean"] == 0 else math.inf
    return float(a["mean"] / b["mean"])


def _between(pred: float, abl: float, react: float) -> dict[str, Any]:
    """Where the ablation's SLO-violation seconds land between loadcast and reactive."""
    span = react - pred
    pos = (abl - pred) / span if abs(span) > 1e-9 else None
    if pos is None:
        label = "loadcast = reactive: nothing to place"
    elif pos <= 0.05:
        label = "at loadcast (the gain is not the forecast's)"
    elif pos >= 0.95:
        label = "at reactive (the gain is the forecast's)"
    else:
        label = f"between ({pos:.0%} of the way to reactive)"
    return {"loadcast": pred, "ablation": abl, "reactive": react,
            "position": pos, "label": label}


def print_table(console: Any, res: dict[str, Any], title: str) -> None:
    from rich.table import Table

    d = res["scenario"]
    t = Table(title=f"Pre-scaling, {title}: activation {d['activation_s']:.0f} s "
                    f"({d['activation_intervals']:g} intervals), {res['seeds']} seeds; "
                    "median [mean ±95 % CI]")
    for c in ("lane", "SLO-violation s", "vs reactive", "spike p99 ms", "spike errors %",
              "ready before", "lead s", "instance-s", "cost vs reactive"):
        t.add_column(c, justify="left" if c == "lane" else "right")
    for lane, a in res["lanes"].items():
        t.add_row(lane, _f(a["slo_violation_s"], 1), _r(a.get("slo_vs_reactive")),
                  _f(a["spike_p99_ms"], 0), _f(a["spike_errors_pct"], 2),
                  f"{a['ready_before']}/{a['spikes_crossing']}", _f(a["lead_s"], 0),
                  _f(a["instance_s"], 0), _r(a.get("cost_vs_reactive")))
    console.print(t)
    if "ablation" in res:
        console.print(f"  ablation ({ABLATION_LANE}), SLO-violation s: "
                      f"{res['ablation']['label']}")


def _f(a: dict[str, Any], digits: int) -> str:
    if a.get("median") is None:
        return "-"
    return f"{a['median']:.{digits}f} [{a['mean']:.{digits}f} ±{a['ci95']:.{digits}f}]"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"
