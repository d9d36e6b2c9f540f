"""Selectivity summaries and the stop rule (selprune/selectivity.py), on hand-made records."""

from __future__ import annotations

import numpy as np
import pytest

from selprune.selectivity import (
    RETAIN_DROPS,
    forget_drop_at_retain_drop,
    record_drop,
    relative_curves,
    relative_drop,
    selectivity_area,
    should_stop,
    summarize,
)


def _records(forget: list[float], retain: list[float]) -> list[dict]:
    return [{"step": i, "forget": {"top1": f}, "retain": {"top1": r}}
            for i, (f, r) in enumerate(zip(forget, retain, strict=True))]


def test_relative_drop():
    assert relative_drop(0.3, 0.4) == pytest.approx(0.25)
    assert relative_drop(0.5, 0.4) == pytest.approx(-0.25), "negative when it rose"
    assert relative_drop(0.4, 0.4) == 0.0
    assert relative_drop(0.0, 0.0) == 1.0, "a base of 0 does not divide by zero"


def test_record_drop_reads_one_side_and_metric():
    base = {"forget": {"top1": 0.5, "top10": 0.8}, "retain": {"top1": 0.4, "top10": 1.0}}
    last = {"forget": {"top1": 0.2, "top10": 0.6}, "retain": {"top1": 0.3, "top10": 0.9}}
    assert record_drop(last, base, "forget") == pytest.approx(0.6)
    assert record_drop(last, base, "retain") == pytest.approx(0.25)
    assert record_drop(last, base, "forget", "top10") == pytest.approx(0.25)


def test_relative_curves():
    c = relative_curves(_records([0.4, 0.2, 0.1], [0.5, 0.5, 0.25]))
    assert set(c) == {"forget", "retain"}
    np.testing.assert_allclose(c["forget"], [1.0, 0.5, 0.25])
    np.testing.assert_allclose(c["retain"], [1.0, 1.0, 0.5])


def test_selectivity_area_orientation_and_value() -> None:
    # forget falls faster than retain; bases 0.4 and 0.5 (normalised away)
    recs = _records([0.4, 0.2, 0.08], [0.5, 0.45, 0.4])
    # relative: forget 1, .5, .2; retain 1, .9, .8; gap 0, .4, .6 -> trapezoid .7 over 2 steps
    assert selectivity_area(recs) == pytest.approx(0.35)


def test_selectivity_area_is_negative_when_retain_falls_faster() -> None:
    assert selectivity_area(_records([0.5, 0.45, 0.4], [0.4, 0.2, 0.08])) == pytest.approx(-0.35)


def test_selectivity_area_is_zero_without_selectivity() -> None:
    assert selectivity_area(_records([0.4, 0.3], [0.6, 0.45])) == pytest.approx(0.0)
    assert selectivity_area(_records([0.4], [0.5])) == 0.0, "no step: no area"


def test_forget_drop_at_retain_drop() -> None:
    # retain relative 1, .95, .85 ; forget relative 1, .7, .4 -> at a 10% retain drop:
    # halfway between steps 1 and 2 -> forget drop .3 + .5 * (.6 - .3) = .45
    recs = _records([0.5, 0.35, 0.2], [0.8, 0.76, 0.68])
    assert forget_drop_at_retain_drop(recs, 0.10) == pytest.approx(0.45)
    assert forget_drop_at_retain_drop(recs, 0.05) == pytest.approx(0.3)
    assert forget_drop_at_retain_drop(recs, 0.02) == pytest.approx(0.3 * 0.02 / 0.05)
    assert forget_drop_at_retain_drop(recs, 0.15) == pytest.approx(0.6)


def test_forget_drop_at_an_unreached_retain_drop_is_none() -> None:
    recs = _records([0.5, 0.35, 0.2], [0.8, 0.76, 0.68])
    assert forget_drop_at_retain_drop(recs, 0.20) is None


def test_summarize():
    recs = _records([0.5, 0.35, 0.2], [0.8, 0.76, 0.68])
    s = summarize(recs)
    assert s["selectivity_area"] == pytest.approx(selectivity_area(recs))
    assert set(s["forget_drop_at_retain_drop"]) == {f"{d:.2f}" for d in RETAIN_DROPS}
    assert s["forget_drop_at_retain_drop"]["0.10"] == pytest.approx(0.45)
    assert s["forget_drop_at_retain_drop"]["0.20"] is None, "never reached: None, not 0"
    assert s["retain_drop_max"] == pytest.approx(0.15)
    assert s["final_drop"] == {"forget": pytest.approx(0.6), "retain": pytest.approx(0.15)}


# ------------------------------------------------------------------- the stop rule
BASE = {"step": 0, "forget": {"top1": 0.5}, "retain": {"top1": 0.4}}
LAST = {"step": 1, "forget": {"top1": 0.2}, "retain": {"top1": 0.3}}  # retain drop 25%


def test_should_stop_needs_a_rule():
    assert not should_stop([BASE, LAST], None, None)


def test_should_stop_on_forget_accuracy():
    assert should_stop([BASE, LAST], None, 0.25)
    assert not should_stop([BASE, LAST], None, 0.15)
    assert should_stop([BASE], None, 0.6), "already below before any pruning: stop before step 1"


def test_should_stop_on_retain_drop():
    assert should_stop([BASE, LAST], 0.2, None)
    assert not should_stop([BASE, LAST], 0.3, None)
    assert not should_stop([BASE], 0.2, None), "record 0 has no drop"


def test_should_stop_on_either_rule():
    assert should_stop([BASE, LAST], 0.2, 0.15)
    assert should_stop([BASE, LAST], 0.3, 0.25)
    assert not should_stop([BASE, LAST], 0.3, 0.15)


def test_should_stop_reads_the_last_record_against_the_first():
    mid = {"step": 1, "forget": {"top1": 0.1}, "retain": {"top1": 0.1}}  # past both limits, then recovered
    assert not should_stop([BASE, mid, LAST], 0.3, 0.15)
