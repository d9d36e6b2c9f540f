"""The anamnesia index (selprune/anamnesia.py): the evaluation schedule, the index and the
recovery AUC, and the matched random control, on synthetic curves with answers worked out
by hand (nothing trains here: tests/experiment/test_retrain.py)."""

from __future__ import annotations

import math

import pytest

from selprune.anamnesia import (
    anamnesia_index,
    censored_text,
    log_schedule,
    match_random_step,
    record_at,
    recovery_auc,
    worst_case,
)
from selprune.errors import SelpruneError


# ------------------------------------------------------------------------------ schedule
def test_log_schedule() -> None:
    assert log_schedule(1) == [0, 1]
    assert log_schedule(8) == [0, 1, 2, 4, 8]
    assert log_schedule(10) == [0, 1, 2, 4, 8, 10]
    assert log_schedule(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(SelpruneError, match="at least 1"):
        log_schedule(0)


# ------------------------------------------------------------------------- index and AUC
BASE, PRUNED = 0.6, 0.2


def curve_from(fracs: dict[int, float], tokens_per_step: int = 32) -> list[dict]:
    """Records whose forget top-1 has regained `fracs[step]` of BASE - PRUNED."""
    return [{"step": s, "tokens": s * tokens_per_step, "forget": {"top1": PRUNED + f * (BASE - PRUNED)}}
            for s, f in sorted(fracs.items())]


def test_index_interpolates_between_bracketing_evaluations() -> None:
    # linear recovery, 10% per step, capped at full: evaluated at 0, 1, 2, 4, 8, 16
    curve = curve_from({s: min(s / 10, 1.0) for s in log_schedule(16)})
    idx = anamnesia_index(curve, BASE, PRUNED)
    assert idx["note"] is None and idx["removed"] == pytest.approx(0.4)
    half, ninety = idx["thresholds"]["0.5"], idx["thresholds"]["0.9"]
    # 50%: between step 4 (0.4) and step 8 (0.8) -> 4 + 0.1 / 0.4 * 4 = 5
    assert half["step"] == pytest.approx(5.0) and half["tokens"] == pytest.approx(160.0)
    assert half["target"] == pytest.approx(0.4)
    # 90%: between step 8 (0.8) and step 16 (1.0) -> 8 + 0.1 / 0.2 * 8 = 12 (in step count, not the true 9)
    assert ninety["step"] == pytest.approx(12.0) and ninety["tokens"] == pytest.approx(384.0)


def test_index_threshold_met_at_first_evaluation_and_exactly_at_one() -> None:
    curve = curve_from({0: 0.6, 1: 0.7, 2: 1.0})
    idx = anamnesia_index(curve, BASE, PRUNED, fractions=(0.5, 1.0))
    assert idx["thresholds"]["0.5"]["step"] == 0
    assert idx["thresholds"]["1"]["step"] == pytest.approx(2.0)


def test_index_not_reached() -> None:
    curve = curve_from({0: 0.0, 1: 0.1, 2: 0.3, 4: 0.2})
    idx = anamnesia_index(curve, BASE, PRUNED)
    for q in ("0.5", "0.9"):
        t = idx["thresholds"][q]
        assert t["step"] is None and t["tokens"] is None and t["censored"] is True
        assert "not reached within 4 steps" in t["note"]
        # the honest bound: the index is above the whole budget, and how far it got
        assert t["bound"] == {"steps": 4, "tokens": curve[-1]["tokens"]}
        assert t["text"] == f"> 4 steps, {curve[-1]['tokens']} tokens"
        assert t["recovered_final"] == pytest.approx(0.2)  # curve_from gives recovered fractions


@pytest.mark.parametrize("pruned", [BASE, BASE + 0.1])
def test_index_when_pruning_removed_nothing(pruned: float) -> None:
    curve = [{"step": s, "tokens": s, "forget": {"top1": BASE}} for s in (0, 1, 2)]
    idx = anamnesia_index(curve, BASE, pruned)
    assert idx["thresholds"]["0.5"]["step"] == 0 and idx["thresholds"]["0.9"]["step"] == 0
    assert "nothing to recover" in idx["note"]
    assert idx["recovery_auc"] == 1.0 and math.isfinite(idx["removed"])


def test_index_rejects_bad_input() -> None:
    with pytest.raises(SelpruneError, match="outside"):
        anamnesia_index(curve_from({0: 0.0, 1: 1.0}), BASE, PRUNED, fractions=(1.5,))
    with pytest.raises(SelpruneError, match="empty"):
        anamnesia_index([], BASE, PRUNED)
    with pytest.raises(SelpruneError, match="increase"):
        anamnesia_index(curve_from({0: 0.0, 1: 1.0})[::-1], BASE, PRUNED)


def test_recovery_auc_known_areas() -> None:
    linear = curve_from({s: s / 16 for s in log_schedule(16)})  # trapezoid is exact on a line
    assert recovery_auc(linear, BASE, PRUNED) == pytest.approx(0.5)
    # full at step 4, held to 16: 0.5 * 4 + 12 = 14 over 16 steps; overshoot above base clips to 1
    assert recovery_auc(curve_from({0: 0.0, 4: 1.0, 16: 1.5}), BASE, PRUNED) == pytest.approx(14 / 16)
    assert recovery_auc(curve_from({0: 1.0, 8: 1.0}), BASE, PRUNED) == pytest.approx(1.0)
    # below the pruned level clips to 0
    assert recovery_auc(curve_from({0: 0.0, 2: -0.5, 8: 0.0}), BASE, PRUNED) == pytest.approx(0.0)


def test_match_random_step() -> None:
    def recs(retain: list[float]) -> list[dict]:
        return [{"step": i, "retain": {"top1": r}} for i, r in enumerate(retain)]

    selective = recs([0.5, 0.48, 0.45])  # last step: 10% relative retain drop
    random = recs([0.5, 0.49, 0.46, 0.44, 0.40])  # drops 0, 2, 8, 12, 20%: 8% and 12% tie
    assert match_random_step(selective, random) == 2  # tie goes to the earlier step
    assert match_random_step(selective, random, selective_step=1) == 1  # 4% -> 2%
    with pytest.raises(SelpruneError, match="not among"):
        match_random_step(selective, random, selective_step=7)
    # no retain damage at all: the control is still a pruned model (step 1), not step 0
    assert match_random_step(recs([0.5, 0.51]), random) == 1


def test_record_at_finds_a_step_or_names_the_steps_there_are() -> None:
    recs = [{"step": s} for s in range(3)]
    assert record_at(recs, None) is recs[-1] and record_at(recs, 1) is recs[1]
    with pytest.raises(SelpruneError, match=r"pruning step 5 is not among the run's steps \[0, 1, 2\]"):
        record_at(recs, 5)


def test_reached_index_is_not_censored_and_says_steps_and_tokens() -> None:
    curve = curve_from({0: 0.0, 1: 0.1, 2: 0.3, 4: 0.9})
    t = anamnesia_index(curve, BASE, PRUNED)["thresholds"]["0.5"]
    assert t["censored"] is False and t["bound"] is None and t["text"].endswith(" tokens")
    assert t["text"].split()[0] == f"{t['step']:.0f}"


def test_censored_text_reads_thousands_of_tokens() -> None:
    assert censored_text({"steps": 64, "tokens": 16384}) == "> 64 steps, 16.4k tokens"
    assert censored_text({"steps": 2, "tokens": 512}) == "> 2 steps, 512 tokens"


def test_worst_case_is_over_the_whole_trajectory() -> None:
    curve = curve_from({0: 0.0, 1: 0.4, 2: 0.2, 4: 0.1})
    for r, loss in zip(curve, (3.0, 2.9, 2.5, 2.7), strict=True):
        r["forget"]["loss"] = loss
    w = worst_case(curve, BASE, PRUNED)
    assert w["max_forget_top1"] == curve[1]["forget"]["top1"] and w["max_forget_top1_step"] == 1
    assert w["min_forget_loss"] == 2.5 and w["min_forget_loss_step"] == 2
    assert w["max_recovered"] == pytest.approx(0.4)
    assert worst_case(curve, PRUNED, PRUNED)["max_recovered"] == 1.0  # nothing removed
