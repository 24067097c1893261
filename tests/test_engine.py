"""The processor engine without a broker: anomalies, batch positions, snapshot/restore."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from processors import anomaly, federated
from processors.endpoint import EndpointModel, ProcessorConfig
from processors.engine import Engine
from processors.federated.coldstart import ColdStartForecaster, warm_start
from processors.federated.params import family_of
from processors.forecasting.features import N_FEATURES
from schemas.codec import Codec
from schemas.federated import GlobalState
from tests.worker_helpers import make_windows


class Outputs:
    def __init__(self) -> None:
        self.scores: list[dict[str, Any]] = []
        self.anomalies: list[dict[str, Any]] = []
        self.dead: list[tuple[str, str]] = []
        self.codec = Codec.embedded()

    def score(self, endpoint_id: str, value: bytes) -> None:
        self.scores.append(self.codec.decode(value, "LoadScore"))

    def anomaly(self, endpoint_id: str, value: bytes) -> None:
        self.anomalies.append(self.codec.decode(value, "Anomaly"))

    def dead_letter(self, key: bytes | None, value: bytes, reason: str, detail: str,
                    partition: int, offset: int) -> None:
        self.dead.append((reason, detail))


CONFIG = ProcessorConfig(step_seconds=300, anomaly_warmup=50, min_change=0.0)


def engine() -> tuple[Engine, Outputs]:
    out = Outputs()
    return Engine(CONFIG, out.codec, out), out


def test_an_incident_is_an_anomaly_and_lowers_the_score(codec: Codec) -> None:
    eng, out = engine()
    windows = make_windows(["e1"], 0, 200)
    for i, w in enumerate(windows):
        eng.handle(0, i, b"e1", codec.encode("EndpointTelemetry", w), now=float(i))
    assert out.anomalies == []  # the ELB-shaped series itself is normal
    before = out.scores[-1]["score"]
    bad = dict(make_windows(["e1"], 200, 1)[0], latency_p99_ms=20_000.0, errors_5xx=40)
    eng.handle(0, 200, b"e1", codec.encode("EndpointTelemetry", bad), now=200.0)
    (anomaly,) = out.anomalies
    assert anomaly["endpoint_id"] == "e1" and anomaly["score"] >= anomaly["threshold"]
    after = out.scores[-1]
    assert after["score"] < before and after["anomaly_score"] >= 0.8
    assert any("anomalous" in r for r in after["reasons"])


def test_two_windows_of_one_endpoint_in_one_batch_are_both_applied(codec: Codec) -> None:
    eng, _ = engine()
    ws = make_windows(["e1"], 0, 2)
    batch = codec.encode("TelemetryBatch", {"agent_id": "a", "region": "eu", "created_at": 0,
                                            "windows": ws})
    eng.handle(0, 0, b"e1", batch, now=0.0)
    eng.handle(0, 0, b"e1", batch, now=1.0)  # redelivered: nothing twice
    assert eng.partitions[0].models["e1"].windows == 2
    assert eng.stats.skipped_replayed == 2


def test_one_bad_window_in_a_batch_is_dead_lettered_alone(codec: Codec) -> None:
    eng, out = engine()
    ws = make_windows(["e1", "e2"], 0, 1)
    ws[1]["request_count"] = -3
    lax = Codec(codec.ids, validate_on_encode=False)
    batch = lax.encode("TelemetryBatch", {"agent_id": "a", "region": "eu", "created_at": 0,
                                          "windows": ws})
    eng.handle(0, 0, b"e1", batch, now=0.0)
    assert [r for r, _ in out.dead] == ["out_of_range"] and "request_count" in out.dead[0][1]
    assert set(eng.partitions[0].models) == {"e1"}


def test_restore_then_replay_equals_one_uninterrupted_run(codec: Codec) -> None:
    values = [codec.encode("EndpointTelemetry", w)
              for w in make_windows(["e1", "e2", "e3"], 0, 150)]
    whole, _ = engine()
    for i, v in enumerate(values):
        whole.handle(0, i, None, v, now=0.0)

    first, _ = engine()
    for i, v in enumerate(values[:200]):
        first.handle(0, i, None, v, now=0.0)
    taken = first.begin_snapshot(0)
    assert taken is not None
    endpoints, checkpoint = taken
    records = [first.snapshot_record(0, e) for e in endpoints]
    for i, v in enumerate(values[200:300], start=200):  # applied after the snapshot: lost
        first.handle(0, i, None, v, now=0.0)

    second, _ = engine()
    resume = second.restore(0, [r.value for r in records if r] + [checkpoint.value])
    assert resume == 200
    second.handle(0, 250, None, values[250], now=0.0)  # fetched before the seek: dropped
    for i, v in enumerate(values[resume:], start=resume):
        second.handle(0, i, None, v, now=0.0)
    for e in ("e1", "e2", "e3"):
        a = whole.partitions[0].models[e]
        b = second.partitions[0].models[e]
        assert a.windows == b.windows == 150
        assert [p.mean for p in a.forecaster.forecast(15)] == [
            p.mean for p in b.forecaster.forecast(15)]


def test_a_snapshot_with_the_hst_detector_from_before_its_rename_restores(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    hst = ProcessorConfig(step_seconds=300, anomaly_warmup=50, anomaly_detector="hst")
    model = EndpointModel.create("e1", hst)
    for i, w in enumerate(make_windows(["e1"], 0, 20)):
        model.observe(w, (i, 0), now=0.0)
    # Pickle it as the old code did: the detector class was processors.anomaly.AnomalyDetector.
    cls = anomaly.HalfSpaceTreesDetector
    with monkeypatch.context() as m:
        m.setattr(anomaly, "AnomalyDetector", cls)
        cls.__qualname__ = "AnomalyDetector"
        try:
            state = pickle.dumps(model, protocol=5)
        finally:
            cls.__qualname__ = "HalfSpaceTreesDetector"
    assert b"AnomalyDetector" in state and b"HalfSpaceTreesDetector" not in state
    record = {"endpoint_id": "e1", "source_partition": 0, "offset": 19, "index": 0,
              "taken_at": 0, "model": "default", "format": "pickle", "state": state}
    eng = Engine(hst, codec, Outputs())
    eng.restore(0, [record])
    restored = eng.partitions[0].models["e1"]
    assert isinstance(restored.anomaly, anomaly.HalfSpaceTreesDetector)
    assert restored.anomaly.seen == 20  # the detector's state came back


def test_a_warm_started_model_snapshotted_before_the_federated_package_restores(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = EndpointModel.create("e1", CONFIG)
    shape = (CONFIG.horizon, N_FEATURES)
    g = GlobalState(family_of(model.forecaster), 1, {
        "weights": np.zeros(shape), "cold_weights": np.full(shape, 0.01)})
    model.forecaster = warm_start(model.forecaster, g)
    assert isinstance(model.forecaster, ColdStartForecaster)
    for i, w in enumerate(make_windows(["e1"], 0, 20)):
        model.observe(w, (i, 0), now=0.0)
    # Pickle it as the old code did: the class was processors.federated.ColdStartForecaster.
    with monkeypatch.context() as m:
        m.setattr(ColdStartForecaster, "__module__", "processors.federated")
        m.setattr(federated, "ColdStartForecaster", ColdStartForecaster, raising=False)
        state = pickle.dumps(model, protocol=5)
    assert b"processors.federated.coldstart" not in state
    record = {"endpoint_id": "e1", "source_partition": 0, "offset": 19, "index": 0,
              "taken_at": 0, "model": "default", "format": "pickle", "state": state}
    eng = Engine(CONFIG, codec, Outputs())
    eng.restore(0, [record])
    restored = eng.partitions[0].models["e1"]
    assert isinstance(restored.forecaster, ColdStartForecaster)
    assert restored.forecaster.forecast(15) == model.forecaster.forecast(15)


def test_worker_metrics_are_read_from_the_engine_at_scrape_time(codec: Codec) -> None:
    import time
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from processors.apps.worker import SCRAPED_METRICS, EngineMetrics

    eng, _ = engine()
    worker = SimpleNamespace(engine=eng, last_snapshot=time.monotonic())
    registry = CollectorRegistry()
    registry.register(EngineMetrics(worker))  # type: ignore[arg-type]  # duck-typed worker
    eng.hold(1)  # assigned, not yet recovered: not counted as a partition
    for i, w in enumerate(make_windows(["e1", "e2"], 0, 3)):
        eng.handle(0, i, w["endpoint_id"].encode(), codec.encode("EndpointTelemetry", w))
    eng.handle(0, 1, b"e1", codec.encode("EndpointTelemetry", make_windows(["e1"], 0, 1)[0]))

    def value(name: str) -> float | None:
        return registry.get_sample_value(name)

    assert value("loadcast_processor_windows_total") == 6
    assert value("loadcast_processor_replayed_total") == 1  # offset 1 again: already applied
    assert value("loadcast_processor_endpoints") == 2
    assert value("loadcast_processor_partitions") == 1
    assert 0 <= (value("loadcast_processor_snapshot_age_seconds") or -1) < 60
    exported = generate_latest(registry).decode()
    assert all(f"# TYPE {n} " in exported for n in SCRAPED_METRICS)


# ----------------------------------------------------------------- global trees

TREES_CONFIG = ProcessorConfig(step_seconds=300, season_seconds=3600, anomaly_warmup=50)
TREES_OPTIONS = {"min_rows": 300, "rounds": 5, "refit_seconds": 1e9, "keep_every": 1}


def trees_engine() -> Engine:
    from processors.forecasting.global_trees import SharedTrees

    out = Outputs()
    return Engine(TREES_CONFIG, out.codec, out, trees=SharedTrees(**TREES_OPTIONS))


def trees_of(model: EndpointModel) -> Any:
    """The default forecaster of ``model`` (where the trees are set)."""
    from processors.forecasting.global_trees import direct_of

    f = direct_of(model.forecaster)
    assert f is not None
    return f


def feed(eng: Engine, codec: Codec, windows: list[dict[str, Any]], first: int = 0) -> None:
    for i, w in enumerate(windows, first):
        eng.handle(0, i, w["endpoint_id"].encode(), codec.encode("EndpointTelemetry", w),
                   now=0.0)


def refit(eng: Engine) -> Any:
    """What the worker does when the trees are due (the fit in the same thread here)."""
    assert eng.trees is not None and eng.trees.due()
    fit = eng.trees.take()
    assert fit is not None
    model = eng.trees.fitted(fit())
    eng.treelog.share(model)
    return model


def snapshot_log(eng: Engine) -> list[Any]:
    """One snapshot round of partition 0 as the worker writes it (trees, models,
    checkpoint, tombstones of trees no longer used), as the restore reads it back."""
    rnd = eng.begin_snapshot(0)
    assert rnd is not None
    out: list[Any] = []
    for endpoint in rnd[0]:
        for r in (eng.treelog.record(0, endpoint), eng.snapshot_record(0, endpoint)):
            if r is not None:
                out.append(r)
    out.append(rnd[1])
    out += eng.treelog.unused(0)
    return [r.value if r.value is not None else {"endpoint_id": r.key, "format": "evicted"}
            for r in out]


def test_the_worker_trees_are_fitted_shared_and_restored_bit_for_bit(codec: Codec) -> None:
    endpoints = ["t-a", "t-b", "t-c"]
    windows = make_windows(endpoints, 0, 200)
    eng = trees_engine()
    feed(eng, codec, windows[:400])
    assert eng.trees is not None and eng.trees.trainer is not None
    assert eng.trees.trainer.rows_held >= 300, "the endpoints' rows are pooled"
    model = refit(eng)
    assert model.version == 1 and not eng.trees.due()  # next refit 1e9 s of data later
    models = eng.partitions[0].models
    assert {trees_of(m).global_version for m in models.values()} == {1}
    assert eng.partitions[0].dirty == set(endpoints), "new trees: every model re-snapshotted"
    log = snapshot_log(eng)
    kinds = [r["format"] for r in log]
    assert kinds[0] == "global-trees" and kinds.count("global-trees") == 1, kinds
    feed(eng, codec, windows[400:500], first=400)
    late = make_windows(["t-new"], 100, 20)  # created after the refit: gets the trees
    feed(eng, codec, late, first=500)
    assert trees_of(models["t-new"]).global_version == 1

    again = trees_engine()
    again.restore(0, log, 0)
    restored = again.partitions[0].models
    assert {trees_of(m).global_version for m in restored.values()} == {1}
    assert again.trees is not None and again.trees.current is not None
    assert again.trees.current.same_trees(model) and again.trees.version == 1
    feed(again, codec, windows[400:500], first=400)
    feed(again, codec, late, first=500)
    for e in [*endpoints, "t-new"]:
        want = [p.mean for p in models[e].forecaster.forecast(15)]
        got = [p.mean for p in restored[e].forecaster.forecast(15)]
        assert got == want, e
    # Without its trees the same snapshot forecasts otherwise: the trees matter above.
    bare = trees_engine()
    bare.restore(0, [r for r in log if r["format"] != "global-trees"], 0)
    feed(bare, codec, windows[400:500], first=400)
    f = trees_of(bare.partitions[0].models["t-a"])
    assert f.global_version == 0, "trees not found: the candidate is empty"
    means = [p.mean for p in f.forecast(15)]
    assert all(np.isfinite(means))
    assert means != [p.mean for p in models["t-a"].forecaster.forecast(15)]


def test_trees_no_snapshot_refers_to_are_deleted(codec: Codec) -> None:
    windows = make_windows(["t-a", "t-b"], 0, 200)
    eng = trees_engine()
    feed(eng, codec, windows[:300])
    first = refit(eng)
    log = snapshot_log(eng)
    assert eng.partitions[0].trees.keys() == {1}
    assert eng.trees is not None and eng.trees.trainer is not None
    feed(eng, codec, windows[300:], first=300)  # more rows: other trees
    eng.trees.trainer._next_fit = 0.0  # due again
    second = refit(eng)
    assert second.version == 2 and not second.same_trees(first)
    log2 = snapshot_log(eng)
    assert [r["endpoint_id"] for r in log2 if r["format"] == "evicted"] == ["__trees__/0/1"]
    assert eng.partitions[0].trees.keys() == {2}
    again = trees_engine()
    again.restore(0, log + log2, 0)
    assert again.partitions[0].trees.keys() == {2}
    assert {trees_of(m).global_version for m in again.partitions[0].models.values()} == {2}


def test_a_restored_partition_with_other_trees_under_the_same_version(
        codec: Codec) -> None:
    """Two workers number their refits alike: a partition moved between them must not end
    up with two sets of trees under one version in its snapshot log."""
    a, b = trees_engine(), trees_engine()
    feed(a, codec, make_windows(["t-a"], 0, 200))
    feed(b, codec, make_windows(["t-b"], 50, 200))
    ta, tb = refit(a), refit(b)
    assert ta.version == tb.version == 1 and not ta.same_trees(tb)
    moved = [dict(r, source_partition=1) for r in snapshot_log(a)]
    b.restore(1, moved, 0)
    assert trees_of(b.partitions[1].models["t-a"]).global_model.same_trees(ta)
    # A new endpoint of the moved partition gets b's trees, which its log must hold
    # under a number of their own.
    w = make_windows(["t-new"], 0, 1)[0]
    b.handle(1, b.partitions[1].resume, b"t-new", codec.encode("EndpointTelemetry", w),
             now=0.0)
    rnd = b.begin_snapshot(1)
    assert rnd is not None
    log = list(moved)
    for endpoint in rnd[0]:
        for r in (b.treelog.record(1, endpoint), b.snapshot_record(1, endpoint)):
            if r is not None and r.value is not None:
                log.append(r.value)
    new = trees_of(b.partitions[1].models["t-new"]).global_model
    assert new.version == 2 and new.same_trees(tb)
    assert trees_of(b.partitions[0].models["t-b"]).global_version == 2  # relabelled too
    assert "t-b" in b.partitions[0].dirty  # so its snapshot says so
    again = trees_engine()
    again.restore(1, log, 0)
    got = again.partitions[1].models
    assert trees_of(got["t-a"]).global_model.same_trees(ta)
    assert trees_of(got["t-new"]).global_model.same_trees(tb)
    assert again.trees is not None and again.trees.version == 2
