"""The batch route's fast path against what it stands for.

- msgspec's :class:`BatchItem` (the route's decoder) and pydantic's :class:`BatchRequest`
  (the documented schema, and the errors) accept and refuse the same bodies: over a seeded
  corpus of good and bad items, whatever msgspec accepts pydantic accepts with the same
  values; what only pydantic accepts is its lax mode (``"5"``, ``1.0``, ``true`` for an
  int), which :func:`decode_batch` hands to pydantic, so the route answers as pydantic.
- :func:`encode_batch` gives, byte for byte, what encoding :func:`answer_item`'s results
  gave, and the values of the pure core (:func:`processors.serving.answer`), through
  new scores, stale ones, interpolation, item errors and the limit of answers per call.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import msgspec
import orjson
import pytest
from pydantic import ValidationError

from processors.serving import answer
from streams.api import answers
from streams.api.answers import Curves, answer_item, encode_batch
from streams.api.operations import BodyError, validate_body
from streams.api.predict_models import (
    _BATCH_DECODER,
    BatchItem,
    BatchRequest,
    Question,
    decode_batch,
)
from streams.api.state import ForecastState

NOW = 1_796_292_000_000
STEP_MS = 60_000
ISO = "2026-12-03T10:00:00"

# values of each field, good and bad: a body's items are good ones with some changed
POOLS: dict[str, list[Any]] = {
    "endpoint_id": ["e1", "", "x" * 256, "x" * 257, 5, True, None, ["e1"], "é"],
    "api": ["orders", "", None, 3, "x" * 257],
    "region": ["eu", "", None, 1.5],
    "horizons": [[1, 6], [0], [], [-1], list(range(64)), list(range(65)), ["5"], [1.0],
                 [1.5], [True], "soon", None, [2**70], {"a": 1}],
    "times": [[NOW], [ISO + "Z"], [ISO], [ISO + "+02:00"], ["2026-12-03 10:00"],
              ["2026-12-03"], ["yesterday"], [], [1.5], [1.0], None, [True], [str(NOW)],
              [-5]],
    "colour": ["red"],
}


VALID: list[dict[str, Any]] = [
    {"endpoint_id": "e1"}, {"endpoint_id": "e1", "horizons": [1, 6]}, {"api": "orders"},
    {"api": "orders", "region": "eu", "times": [NOW]}, {"endpoint_id": "é", "times": [ISO]}]


def _item(rng: random.Random) -> dict[str, Any]:
    """A good item with zero to two fields set to a random value of their pool."""
    item = dict(rng.choice(VALID))
    for _ in range(rng.choice((0, 1, 1, 2))):
        key = rng.choice(list(POOLS))
        item[key] = rng.choice(POOLS[key])
    return item


def _lax(item: dict[str, Any]) -> bool:
    """An int given as pydantic's lax mode takes it: a bool, a float, a numeric string."""
    values = [*(item.get("horizons") or []), *(item.get("times") or [])]
    return any(isinstance(v, bool | float) or (isinstance(v, str) and v.isdigit())
               for v in values)


def _questions(items: list[Any]) -> list[Question]:
    return [it.question() if isinstance(it, BatchItem) else Question(
        it.endpoint_id, it.api, it.region, None if it.horizons is None else tuple(it.horizons),
        None if it.times is None else tuple(it.times)) for it in items]


def _pydantic(raw: bytes) -> list[Question] | tuple[int, str]:
    """What the route answered before msgspec: questions, or the error (status, body)."""
    try:
        return _questions(validate_body(raw, BatchRequest).items)
    except BodyError as e:
        return e.status_code, str(e.text)


def test_msgspec_and_pydantic_accept_and_refuse_the_same_bodies() -> None:
    rng = random.Random(19)
    seen = {"both": 0, "neither": 0, "lax": 0}
    for _ in range(3_000):
        body = {"items": [_item(rng) for _ in range(rng.choice((1, 1, 2)))]}
        raw = json.dumps(body).encode()
        try:
            fast: list[Question] | None = _questions(_BATCH_DECODER.decode(raw).items)
        except msgspec.ValidationError:
            fast = None
        try:
            slow: list[Question] | None = _questions(
                BatchRequest.model_validate_json(raw).items)
        except ValidationError:
            slow = None
        if fast is not None:
            assert fast == slow, body  # msgspec accepts only what pydantic accepts, alike
            seen["both"] += 1
        elif slow is None:
            seen["neither"] += 1
        else:
            assert any(_lax(it) for it in body["items"]), body
            seen["lax"] += 1
        try:  # and the route's decoding is pydantic's, errors included
            got: list[Question] | tuple[int, str] = _questions(decode_batch(raw))
        except BodyError as e:
            got = e.status_code, str(e.text)
        assert got == _pydantic(raw), body
    assert min(seen.values()) >= 30, seen  # the corpus has all three kinds


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"items": [{"endpoint_id": "e1"}] * 10_001}, 413, "items"),
    ({"items": [{"endpoint_id": 5}] * 10_001}, 413, "items"),  # 413 before the items
    ({"items": []}, 422, "items"),
    ({"items": [{"endpoint_id": "e1"}, {"horizons": [1]}]}, 422, "items.1.api"),
    ({"items": [{"endpoint_id": "e1", "horizons": [-1]}]}, 422, "items.0.horizons.0"),
    ({"items": [{"endpoint_id": "e1", "times": ["yesterday"]}]}, 422, "items.0.times.0"),
    ({"items": [{"endpoint_id": "e1", "horizons": [1], "times": [1]}]}, 422, "items.0.times"),
    ({"items": [{"endpoint_id": "e1", "colour": "red"}]}, 422, "items.0.colour"),
    ({"items": [{"endpoint_id": "e1"}], "more": 1}, 422, "more"),
    ({"things": []}, 422, "items"),
    ([], 422, "(body)"),
])
def test_bad_batch_bodies_name_the_field(body: Any, status: int, field: str) -> None:
    with pytest.raises(BodyError) as e:
        decode_batch(json.dumps(body).encode())
    assert (e.value.status_code, json.loads(str(e.value.text))["field"]) == (status, field)
    with pytest.raises(BodyError) as e:
        decode_batch(b"{not json")
    assert e.value.status_code == 422 and "not JSON" in json.loads(str(e.value.text))["error"]


def score(endpoint_id: str, computed_ms: int, means: list[float], *, region: str = "eu",
          capacity: float = 100.0, valid_for_s: float = 120.0) -> dict[str, Any]:
    """A LoadScore record, one forecast point per step (band: mean -/+ 10 %)."""
    return {
        "endpoint_id": endpoint_id, "api": "orders", "region": region,
        "computed_at": computed_ms, "valid_until": computed_ms + int(valid_for_s * 1000),
        "score": 0.5, "capacity_rps": capacity, "capacity_source": "CONFIGURED",
        "current_rps": 3.0, "predicted_utilization": 0.4, "latency_p99_ms": 5.0,
        "error_rate": 0.0, "anomaly_score": 0.0, "step_seconds": STEP_MS // 1000,
        "model": "default", "reasons": [],
        "forecast": [{"horizon": h + 1, "at": computed_ms + (h + 1) * STEP_MS, "mean": m,
                      "lower": m * 0.9, "upper": m * 1.1} for h, m in enumerate(means)],
    }


def reference(curves: Curves, items: list[Question], now_ms: int) -> bytes:
    """The batch answer as the route made it before: answer_item's results, orjson."""
    results: list[dict[str, Any]] = []
    errors = answered = 0
    for i, it in enumerate(items):
        if answered >= answers.MAX_ANSWERS:
            res: dict[str, Any] = {"error": f"over {answers.MAX_ANSWERS} endpoint answers "
                                            "in one call; use /v1/predict/async",
                                   "field": "items"}
        else:
            res = answer_item(curves, it, now_ms)
        res["index"] = i
        if "error" in res:
            errors += 1
        else:
            answered += len(res["predictions"])
        results.append(res)
    return orjson.dumps({"results": results, "errors": errors})


def test_batch_answers_are_answer_items_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    state = ForecastState()
    curves = Curves(state)
    state.apply([("LoadScore", r) for r in (
        score("e1", NOW, [10.0, 20.0, 40.0]),
        score("e2", NOW, [50.0, 60.0, 70.0], capacity=0.0),
        score("e3", NOW - 5_000, [1.0, 2.0, 3.0], region="us"),
        score("old", NOW - 600_000, [5.0, 6.0, 7.0], valid_for_s=540),
        score("empty", NOW, []))])
    raw = json.dumps({"items": [
        {"endpoint_id": "e1", "horizons": [1, 3]}, {"endpoint_id": "e2"},
        {"endpoint_id": "old", "horizons": [0, 2]}, {"endpoint_id": "e3", "horizons": [1]},
        {"endpoint_id": "e1", "horizons": [9]},
        {"endpoint_id": "nope"}, {"endpoint_id": "empty"}, {"api": "orders"},
        {"api": "orders", "region": "us", "horizons": [2]},
        {"endpoint_id": "e1", "times": [NOW + 90_000, ISO]},
        {"endpoint_id": "e1", "horizons": [1, 3]},
        *({"endpoint_id": "e3", "horizons": list(h)}  # more lists than an endpoint keeps
          for _ in range(2) for k in (1, 2) for h in itertools.combinations(range(4), k)),
        {"endpoint_id": "e1", "horizons": ["2"]},  # lax: read by pydantic, answered alike
    ]}).encode()
    for now in (NOW + 1_000, NOW + 200_000):  # fresh, then e1..e3 stale as well
        items = decode_batch(raw)
        got, errors = encode_batch(curves, items, now)
        assert got == reference(curves, _questions(items), now)
        assert errors == 4 and got.count(b'"index"') == len(items)  # 9, nope, empty, api
    kept = state.prepared["e3"].answers
    assert 1 < len(kept) < 10 and sum(map(len, kept.values())) <= answers.MAX_KEPT_BYTES
    assert state.prepared["e1"].answers  # e1's answers are kept ...
    state.apply([("LoadScore", score("e1", NOW + 60_000, [11.0, 21.0, 41.0]))])
    renewed = state.prepared["e1"]  # ... until its next score, made ready as it comes
    assert renewed.curve.score is state.scores["e1"] and not renewed.answers
    assert state.prepared["e3"].curve.score is state.scores["e3"]  # e3 left as it was
    items = decode_batch(raw)
    got, _ = encode_batch(curves, items, NOW + 61_000)
    assert got == reference(curves, _questions(items), NOW + 61_000)
    first = json.loads(got)["results"][0]["predictions"][0]
    assert first == answer(state.scores["e1"], horizons=[1, 3], now_ms=NOW + 61_000)
    assert [p["mean"] for p in first["points"]] == [11.0, 41.0]
    # the limit of endpoint answers per call counts the fast items too
    monkeypatch.setattr(answers, "MAX_ANSWERS", 6)
    got, errors = encode_batch(curves, items, NOW + 61_000)
    assert got == reference(curves, _questions(items), NOW + 61_000)
    assert errors > 5 and b"over 6 endpoint answers" in got
