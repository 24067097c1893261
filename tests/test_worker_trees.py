"""The worker's global trees against the real embedded broker: refit from the stream, given
to every endpoint, restored with the snapshots after a kill -9, and turned off."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from processors.endpoint import EndpointModel
from processors.forecasting.features import K_GLOBAL
from processors.forecasting.global_trees import direct_of
from schemas.codec import Codec
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.kafka_helpers import read_topic
from tests.worker_helpers import (
    final_models,
    make_windows,
    new_app_id,
    produce,
    scores,
    snapshot_trees,
    start_worker,
    stop,
    wait_for_checkpoints,
)

# Small trees, soon: an hour's season (12 steps of 5 min) so rows are pooled after 60
# windows, a refit at 300 rows, and none after it (the next one 1e9 s of data later).
TREES = {"season_seconds": "3600", "global_trees_min_rows": "300",
         "global_trees_rounds": "10", "global_trees_refit_seconds": "1e9",
         "global_trees_keep_every": "1"}
ENDPOINTS = [f"tree-{i}" for i in range(4)]


def versions(models: dict[str, EndpointModel]) -> dict[str, int]:
    out = {}
    for e, m in models.items():
        f = direct_of(m.forecaster)
        assert f is not None
        out[e] = f.global_version
    return out


def wait_for_versions(kafka: KafkaSettings, codec: Codec, proc: Any,
                      timeout: float = 60) -> dict[str, EndpointModel]:
    """The snapshots once every endpoint's refers to global trees."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = final_models(kafka, codec)
        if set(models) == set(ENDPOINTS) and all(versions(models).values()):
            return models
        assert proc.poll() is None, "worker died"
        time.sleep(0.5)
    raise AssertionError(f"no trees in the snapshots: {versions(final_models(kafka, codec))}")


def with_trees(model: EndpointModel, trees: dict[tuple[int, int], Any], partition: int
               ) -> EndpointModel:
    f = direct_of(model.forecaster)
    assert f is not None
    f.set_global_model(trees[(partition, f.global_version)])
    return model


def test_the_worker_refits_shares_and_restores_its_trees(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    app_id = new_app_id()
    first = produce(kafka, codec, make_windows(ENDPOINTS, 0, 200))
    w = start_worker(kafka, app_id, tmp_path / "w.log", **TREES)
    try:
        wait_for_checkpoints(kafka, codec, first, proc=w)
        before = wait_for_versions(kafka, codec, w)
        refitted_at = time.time() * 1000
        wait_for_checkpoints(kafka, codec, first, proc=w)
    finally:
        stop(w, signal.SIGKILL)
    assert set(versions(before).values()) == {1}, "one refit, every endpoint has it"
    trees = snapshot_trees(kafka, codec)
    assert trees and {v for _, v in trees} == {1}

    second = produce(kafka, codec, make_windows(ENDPOINTS, 200, 100))
    w = start_worker(kafka, app_id, tmp_path / "w2.log", **TREES)
    try:
        wait_for_checkpoints(kafka, codec, second, proc=w)
    finally:
        stop(w)
    after = final_models(kafka, codec)
    assert versions(after) == dict.fromkeys(ENDPOINTS, 1), "restored, and no second refit"
    assert "not in the snapshot log" not in (tmp_path / "w2.log").read_text()
    fresh = {s["endpoint_id"] for s in scores(kafka, codec) if s["computed_at"] > refitted_at}
    assert fresh == set(ENDPOINTS)

    # The uninterrupted run from the snapshots before the kill: each model with the trees
    # of its version, fed the rest of its windows in partition order.
    where: dict[str, int] = {}
    ref: dict[str, EndpointModel] = {}
    for m in sorted(read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry")),
                    key=lambda m: (m.partition(), m.offset())):
        window = codec.decode(m.value() or b"", "EndpointTelemetry")
        e = window["endpoint_id"]
        if e not in ref:
            where[e] = m.partition() or 0
            ref[e] = with_trees(before[e], trees, where[e])
        ref[e].observe(window, (m.offset() or 0, 0), now=0.0)  # skips what it has
    for e in ENDPOINTS:
        got = with_trees(after[e], trees, where[e])
        assert got.windows == ref[e].windows == 300
        want_means = [p.mean for p in ref[e].forecaster.forecast(15)]
        assert [p.mean for p in got.forecaster.forecast(15)] == want_means, e
        # Every candidate's forecasts, the trees' too, pending and made alike.
        mine, theirs = direct_of(got.forecaster), direct_of(ref[e].forecaster)
        assert mine is not None and theirs is not None
        assert np.array_equal(mine._pC, theirs._pC, equal_nan=True), e
        trees_now = mine._pC[mine._t % mine.max_horizon][:, K_GLOBAL]
        assert np.isfinite(trees_now).all(), "the trees forecast every horizon"


def test_turned_off_the_worker_has_no_trees(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    ends = produce(kafka, codec, make_windows(ENDPOINTS, 0, 200))
    w = start_worker(kafka, new_app_id(), tmp_path / "w.log", **TREES, global_trees="false")
    try:
        wait_for_checkpoints(kafka, codec, ends, proc=w)
        time.sleep(2.0)  # a refit would have been due within the second: none comes
        wait_for_checkpoints(kafka, codec, ends, proc=w)
    finally:
        stop(w)
    assert versions(final_models(kafka, codec)) == dict.fromkeys(ENDPOINTS, 0)
    assert snapshot_trees(kafka, codec) == {}
