"""Answers of the prediction routes, from the latest score of each endpoint.

:class:`Curves` keeps, per endpoint, a :class:`Ready`: the score's :class:`EncodedCurve`
(its identity, capacity and points encoded as JSON once) and the JSON of the answers to
the horizon lists asked of it so far. It lives in ``ForecastState.prepared``, where the
state makes it again from each newer score of an endpoint once asked about, so one
lookup finds an endpoint's answer parts and a question after a new score does not pay
for preparing them. :func:`encode_batch` answers a batch item asking an endpoint's
horizons by joining bytes: the endpoint's answer to those horizons, its age and
staleness (encoded once per batch and score time), the item's index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from processors.serving import Curve, Row, ServingError
from schemas.records import LoadScore
from streams.api.predict_models import BatchItem, PredictItem, Question
from streams.api.state import ForecastState

MAX_ANSWERS = 200_000  # endpoint answers in one synchronous call (api questions fan out)
# bytes of answers an endpoint keeps until its next score (several horizon lists, or all
# 15 points once): at most about what its curve takes, 0.4 GB for 100,000 endpoints
MAX_KEPT_BYTES = 4096


class EncodedCurve(Curve):
    """A curve that answers in JSON encoded once per score: its identity, capacity and
    points are encoded at their first question, so a batch answer copies bytes instead
    of formatting a score's floats again for every item. Only ``age_s`` and ``stale``
    are encoded per answer (by orjson as well); the parts are joined as JSON fragments."""

    __slots__ = ("_prefix",)

    def __init__(self, score: LoadScore) -> None:
        super().__init__(score)
        head = {k: v for k, v in self._head.items() if k not in ("age_s", "stale")}
        self._prefix = orjson.dumps(head)[:-1] + b',"points":['

    def _value(self, r: Row) -> Any:
        return bytes(memoryview(orjson.dumps(self.point(r))))  # right-sized (see jobs)

    def answer(self, *, horizons: Sequence[float] | None = None,  # type: ignore[override]
               times: Sequence[int] | None = None, now_ms: int) -> orjson.Fragment:
        """:meth:`Curve.answer` as one JSON fragment (same fields, same values)."""
        points = b",".join(self.points(horizons=horizons, times=times))
        age = max(0.0, (now_ms - self.score.computed_at) / 1000)
        stale = b"true" if now_ms > self.score.valid_until else b"false"
        return orjson.Fragment(b"".join((self._prefix, points, b'],"age_s":', orjson.dumps(age),
                                         b',"stale":', stale, b"}")))

    def predictions(self, horizons: Sequence[float] | None) -> bytes:
        """``{"predictions":[`` and this endpoint's answer up to its points (included),
        as :meth:`answer` begins it: what a batch item's JSON starts with."""
        return b"".join((b'{"predictions":[', self._prefix,
                         b",".join(self.points(horizons=horizons))))


class Ready(NamedTuple):
    """An endpoint's latest score, ready to answer (a tuple: unpacked in one step)."""

    curve: EncodedCurve
    answers: dict[tuple[int, ...] | None, bytes]  # horizons -> EncodedCurve.predictions
    computed_at: int
    valid_until: int


def make_ready(score: LoadScore) -> Ready:
    """``score`` made ready to answer (no answers kept yet)."""
    return Ready(EncodedCurve(score), {}, score.computed_at, score.valid_until)


class Curves:
    """A :class:`Ready` per endpoint, made at its first question and kept in the state's
    ``prepared`` (bounded by the state's endpoints); the state makes it again from each
    newer score of the endpoint as it comes (``ForecastState.prepare``)."""

    def __init__(self, state: ForecastState) -> None:
        self.state = state
        self.ready: dict[str, Ready] = state.prepared
        state.prepare = make_ready

    def _ready(self, score: LoadScore) -> Ready:
        r = self.ready.get(score.endpoint_id)
        if r is None or r.curve.score is not score:
            r = self.ready[score.endpoint_id] = make_ready(score)
        return r

    def of(self, score: LoadScore) -> EncodedCurve:
        """The curve of ``score`` (an endpoint's latest)."""
        return self._ready(score).curve

    def endpoint(self, endpoint_id: str) -> Ready | None:
        """The endpoint's latest score made ready (None for an unknown endpoint)."""
        r = self.ready.get(endpoint_id)
        if r is not None:
            return r
        s = self.state.scores.get(endpoint_id)
        return None if s is None else self._ready(s)


def answer_item(curves: Curves, item: PredictItem | Question, now_ms: int) -> dict[str, Any]:
    """One item's result: ``{"predictions": [...]}`` or ``{"error", "field"}``."""
    if item.endpoint_id is not None:
        r = curves.endpoint(item.endpoint_id)
        if r is None:
            return {"error": f"unknown endpoint_id {item.endpoint_id!r}",
                    "field": "endpoint_id"}
        found = [r.curve]
    else:
        found = [curves.of(s) for s in curves.state.find(api=item.api, region=item.region)]
        if not found:
            where = f" in region {item.region!r}" if item.region is not None else ""
            return {"error": f"no endpoint of api {item.api!r}{where}", "field": "api"}
    out = []
    for c in found:
        try:
            out.append(c.answer(horizons=item.horizons, times=item.times, now_ms=now_ms))
        except ServingError as e:  # one endpoint that cannot answer fails the question
            return {"error": f"{c.score.endpoint_id}: {e.message}", "field": e.field}
    return {"predictions": out}


_INDEXES: list[bytes] = []  # b'],"index":i},' for i < the largest batch answered so far


def _indexes(n: int) -> list[bytes]:
    """What closes item i's JSON in a batch answer, for i < n (made once, then shared)."""
    if len(_INDEXES) < n:
        _INDEXES.extend(b'],"index":%d},' % i for i in range(len(_INDEXES), n))
    return _INDEXES


def _ready_answer(r: Ready, horizons: tuple[int, ...] | None) -> bytes | None:
    """``r``'s :meth:`~EncodedCurve.predictions` for ``horizons``, kept for the next
    items while the endpoint keeps at most :data:`MAX_KEPT_BYTES`; None when the curve
    cannot answer."""
    try:
        head = r.curve.predictions(horizons)
    except ServingError:
        return None  # answer_item says why
    if len(head) + sum(map(len, r.answers.values())) <= MAX_KEPT_BYTES:
        r.answers[horizons] = head
    return head


def encode_batch(curves: Curves, items: Sequence[BatchItem | Question], now_ms: int
                 ) -> tuple[bytes, int]:
    """The JSON answer of a batch, ``{"results": [...], "errors": n}``, and n.

    An item asking horizons (or every point) of a known endpoint is answered from the
    endpoint's :class:`Ready` parts: a few lookups, three byte strings added to the
    answer. Any other item (an api, times, an unknown endpoint, a horizon outside the
    forecast) is answered by :func:`answer_item` and encoded by orjson. Results are, value
    for value (and byte for byte), what encoding :func:`answer_item`'s answers gives."""
    ready = curves.ready
    indexes = _indexes(len(items))
    ages: dict[int, tuple[bytes, bytes]] = {}  # score time -> its age_s, stale false/true
    parts: list[bytes] = [b'{"results":[']
    add, extend = parts.append, parts.extend
    errors = general = answered = 0  # general items so far, and their endpoint answers
    stop = MAX_ANSWERS  # before item `stop`, fewer than MAX_ANSWERS answers in all
    for i, it in enumerate(items):
        eid = it.endpoint_id
        if eid is not None and it.times is None and i < stop:
            r = ready.get(eid) or curves.endpoint(eid)
            if r is not None:
                _, kept, computed_at, valid_until = r  # faster than 3 attribute reads
                head = kept.get(it.horizons) or _ready_answer(r, it.horizons)
                if head is not None:
                    age = ages.get(computed_at)
                    if age is None:
                        a = b'],"age_s":' + orjson.dumps(max(0.0, (now_ms - computed_at) / 1e3))
                        age = ages[computed_at] = (a + b',"stale":false}', a + b',"stale":true}')
                    extend((head, age[now_ms > valid_until], indexes[i]))
                    continue
        if answered + i - general >= MAX_ANSWERS:  # general's and the items' answered above
            res: dict[str, Any] = {"error": f"over {MAX_ANSWERS} endpoint answers in one "
                                            "call; use /v1/predict/async", "field": "items"}
        else:
            res = answer_item(curves, it.question() if isinstance(it, BatchItem) else it,
                              now_ms)
        res["index"] = i
        if "error" in res:
            errors += 1
        else:
            answered += len(res["predictions"])
        general += 1
        stop = MAX_ANSWERS - answered + general
        add(orjson.dumps(res) + b",")
    parts[-1] = parts[-1][:-1]  # no comma after the last result
    add(b'],"errors":%d}' % errors)
    return b"".join(parts), errors
