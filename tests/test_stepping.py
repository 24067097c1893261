"""Windows -> model steps: rates, out-of-order, duplicates, gaps, lateness."""

from __future__ import annotations

import pickle
import random

import pytest

from processors.stepping import Step, Stepper

STEP_MS = 60_000


def _windows(step: int, count: int = 10, interval_ms: int = 5_000) -> list[tuple[int, int, int]]:
    base = step * STEP_MS
    return [(base + i, base + i + interval_ms, count) for i in range(0, STEP_MS, interval_ms)]


def _feed(s: Stepper, windows: list[tuple[int, int, int]], ep: str = "e") -> list[Step]:
    out: list[Step] = []
    for w in windows:
        out += s.add(ep, *w)
    return out


def test_rate_is_requests_per_second_and_step_start_in_seconds() -> None:
    s = Stepper(step_seconds=60, lateness_seconds=5)
    out = _feed(s, _windows(100) + _windows(101, count=0))
    assert out == [Step(start=100 * 60.0, rate=12 * 10 / 60, coverage=1.0, windows=12)]
    # An all-zero step is a real zero, not a gap.
    assert s.flush("e") == [Step(start=101 * 60.0, rate=0.0, coverage=1.0, windows=12)]


def test_out_of_order_windows_within_a_step_give_the_same_step() -> None:
    ws = _windows(5, count=7)
    random.Random(1).shuffle(ws)
    s = Stepper(step_seconds=60)
    assert _feed(s, ws) == []
    (step,) = s.flush("e")
    assert step.rate == pytest.approx(7 * 12 / 60)
    assert step.windows == 12


def test_duplicated_windows_are_not_double_counted() -> None:
    s = Stepper(step_seconds=60)
    ws = _windows(3, count=4)
    _feed(s, ws + ws[:5] + [ws[0]])
    (step,) = s.flush("e")
    assert step.rate == pytest.approx(4 * 12 / 60)
    assert s.duplicates == 6


def test_a_step_without_windows_is_a_gap_not_a_zero() -> None:
    s = Stepper(step_seconds=60, lateness_seconds=0)
    out = _feed(s, _windows(0) + _windows(3))  # steps 1 and 2 never reported
    assert [st.start for st in out] == [0.0, 180.0]
    assert all(st.rate > 0 for st in out)


def test_late_window_for_a_closed_step_is_dropped_and_counted() -> None:
    s = Stepper(step_seconds=60, lateness_seconds=5)
    out = _feed(s, _windows(0) + _windows(1)[:2])
    assert [st.start for st in out] == [0.0]
    assert s.add("e", 55_000, 60_000, 1000) == []
    assert s.late == 1
    # ...but a late window within the lateness allowance still counts.
    s2 = Stepper(step_seconds=60, lateness_seconds=10)
    ws = _windows(0)
    out = _feed(s2, [*ws[:-1], (60_000, 65_000, 0), *ws[-1:]])
    assert out == []
    assert s2.flush("e")[0].windows == 12


def test_partial_coverage_rate_and_min_coverage() -> None:
    s = Stepper(step_seconds=60, min_coverage=0.25)
    _feed(s, _windows(0)[:6])  # half the step, 10 per 5 s
    (half,) = s.flush("e")
    assert half.coverage == pytest.approx(0.5)
    assert half.rate == pytest.approx(2.0)
    _feed(s, _windows(2)[:2])  # 10 s of 60: too sparse to trust
    assert s.flush("e") == []
    assert s.sparse == 1


def test_window_straddling_a_boundary_is_split() -> None:
    s = Stepper(step_seconds=60, lateness_seconds=30, min_coverage=0.1)
    s.add("e", 50_000, 70_000, 20)  # 10 s in each step
    a, b = s.flush("e")
    assert (a.start, a.rate, b.start, b.rate) == (0.0, 1.0, 60.0, 1.0)


def test_endpoints_are_independent_and_bad_windows_rejected() -> None:
    s = Stepper(step_seconds=60, lateness_seconds=5)
    _feed(s, _windows(0, count=1), ep="a")
    assert _feed(s, _windows(1, count=2), ep="b") == []  # b's windows do not close a's steps
    assert s.add("a", 10, 10, 5) == [] and s.add("a", 0, 5, -1) == []
    assert s.invalid == 2
    assert s.close_until("a", 65_000)[0].rate == pytest.approx(12 / 60)
    assert s.endpoints == ["a", "b"]
    assert pickle.loads(pickle.dumps(s)).flush("b")[0].rate == pytest.approx(24 / 60)
