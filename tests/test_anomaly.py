"""Anomaly detection on a real-trace-shaped telemetry stream."""

from __future__ import annotations

import csv
import pickle

import numpy as np

from processors.anomaly import (
    AnomalyDetector,
    HalfSpaceTreesDetector,
    RobustZDetector,
    telemetry_features,
)
from processors.endpoint import ProcessorConfig, make_detector
from streams.edge.replay import data_dir

DATA = data_dir()
INJECTED = (700, 1100, 1500, 1900)


def _stream(n: int = 2000, seed: int = 0) -> list[dict[str, float]]:
    """ELB request counts as the rate; latency and errors that follow the load, plus noise."""
    with open(DATA / "elb_request_count_8c0756.csv", newline="") as fh:
        counts = [float(r["value"]) for r in csv.DictReader(fh)][:n]
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(counts):
        rate = c / 300.0
        p99 = 60 + 30 * rate + rng.normal(0, 4)
        err = max(0.0, rng.normal(0.01, 0.003))
        if i in INJECTED:  # an incident: latency x20 and an error spike
            p99, err = p99 * 20, 0.3
        out.append({"rate": rate, "error_rate": err, "p99_ms": p99})
    return out


def _run(det: AnomalyDetector, stream: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    res = [det.score_and_learn(x) for x in stream]
    return np.array([r.score for r in res]), np.array([r.is_anomaly for r in res])


def test_injected_incidents_score_high_and_normal_windows_do_not() -> None:
    stream = _stream()
    det = HalfSpaceTreesDetector(seed=7)
    scores, flags = _run(det, stream)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for i in INJECTED:
        assert flags[i], (i, scores[i])
        assert scores[i] > 0.9
    normal = np.array([i for i in range(det.warmup, len(stream)) if i not in INJECTED])
    assert flags[normal].mean() < 0.01
    assert np.median(scores[normal]) < 0.6


def test_no_anomalies_during_warmup() -> None:
    stream = _stream(300)
    stream[10] = {"rate": 1.0, "error_rate": 0.9, "p99_ms": 9000.0}
    det = HalfSpaceTreesDetector(warmup=100, seed=1)
    _, flags = _run(det, stream[:100])
    assert not flags.any()
    r = det.score_and_learn(stream[150])
    assert r.warm


def test_deterministic_with_a_seed_and_picklable() -> None:
    stream = _stream(600)
    a, _ = _run(HalfSpaceTreesDetector(seed=3), stream)
    b, _ = _run(HalfSpaceTreesDetector(seed=3), stream)
    np.testing.assert_array_equal(a, b)
    det = HalfSpaceTreesDetector(seed=3)
    _run(det, stream[:400])
    copy = pickle.loads(pickle.dumps(det))
    x, _ = _run(det, stream[400:])
    y, _ = _run(copy, stream[400:])
    np.testing.assert_array_equal(x, y)


def test_robust_z_flags_injected_incidents_and_not_normal_windows() -> None:
    stream = _stream()
    det = RobustZDetector()
    scores, flags = _run(det, stream)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for i in INJECTED:
        assert flags[i], (i, scores[i])
    normal = np.array([i for i in range(det.warmup, len(stream)) if i not in INJECTED])
    assert flags[normal].mean() < 0.01
    assert np.median(scores[normal]) < 0.6


def test_robust_z_never_flags_during_warmup_and_is_deterministic_and_picklable() -> None:
    stream = _stream(600)
    stream[10] = {"rate": 1.0, "error_rate": 0.9, "p99_ms": 9000.0}
    det = RobustZDetector(warmup=100)
    scores, flags = _run(det, stream[:100])
    assert not flags.any() and not scores.any()
    assert det.score_and_learn(stream[150]).warm
    a, _ = _run(RobustZDetector(), stream)
    b, _ = _run(RobustZDetector(), stream)
    np.testing.assert_array_equal(a, b)
    det = RobustZDetector()
    _run(det, stream[:400])
    copy = pickle.loads(pickle.dumps(det))
    x, _ = _run(det, stream[400:])
    y, _ = _run(copy, stream[400:])
    np.testing.assert_array_equal(x, y)


def test_both_detectors_satisfy_the_protocol_and_the_config_picks_them() -> None:
    for name, cls in (("robust-z", RobustZDetector), ("hst", HalfSpaceTreesDetector)):
        det = make_detector(ProcessorConfig(anomaly_detector=name, anomaly_threshold=0.7))
        assert isinstance(det, cls) and isinstance(det, AnomalyDetector)
        assert det.threshold == 0.7
    assert not isinstance(object(), AnomalyDetector)


def test_telemetry_features_from_a_window() -> None:
    f = telemetry_features(
        {
            "window_start": 1_000,
            "window_end": 6_000,
            "request_count": 0,
            "errors_5xx": 0,
            "latency_p99_ms": 0.0,
        }
    )
    assert f["rate"] == 0.0 and f["error_rate"] == 0.0
