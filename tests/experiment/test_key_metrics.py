"""The regression check on the stored notebooks' key figures (selprune/experiment/key_metrics.py)."""

import copy

import pytest

from selprune.errors import SelpruneError
from selprune.experiment.key_metrics import TOLERANCE, check, compare, key_metrics, record


def _results() -> dict:
    def rec(f: float, r: float) -> dict:
        return {"forget": {"top1": f}, "retain": {"top1": r}}

    return {
        "base": rec(0.5, 0.3),
        "runs": {
            "ff": {"records": [rec(0.5, 0.3), rec(0.1, 0.25)], "forget_drop_at_retain_drop": {"0.10": 0.7}},
            "attn": {"records": [rec(0.5, 0.3), rec(0.4, 0.29)], "forget_drop_at_retain_drop": {"0.10": None}},
        },
        "anamnesia": {"arms": {"selective": {"curve": [rec(0.1, 0.25), rec(0.3, 0.26)], "recovery_auc": 0.4,
                                             "worst_case": {"max_forget_top1": 0.35}}},
                      "control": {"forget_end": 0.52, "retain_end": 0.31}},
        "anamnesia_variants": {"retrain_data-retain": {"arms": {"selective": {
            "curve": [rec(0.1, 0.25), rec(0.12, 0.26)], "recovery_auc": 0.05, "worst_case": {"max_forget_top1": 0.13}}}}},
    }


def test_key_metrics_picks_the_figures_a_reader_takes():
    m = key_metrics(_results())
    assert m["base/forget/top1"] == {"value": 0.5, "kind": "accuracy"}
    assert m["ff/final/forget/top1"]["value"] == 0.1 and m["ff/final/retain/top1"]["value"] == 0.25
    assert m["ff/forget_drop_at_retain_drop/0.10"] == {"value": 0.7, "kind": "derived"}
    assert m["attn/forget_drop_at_retain_drop/0.10"]["value"] is None
    assert m["anamnesia/selective/final/forget/top1"]["value"] == 0.3
    assert m["anamnesia/selective/recovery_auc"] == {"value": 0.4, "kind": "derived"}
    assert m["anamnesia/selective/best/forget/top1"] == {"value": 0.35, "kind": "accuracy"}  # the worst case
    assert m["anamnesia/control/forget_end"]["value"] == 0.52 and m["anamnesia/control/retain_end"]["value"] == 0.31
    assert m["anamnesia[retrain_data-retain]/selective/best/forget/top1"]["value"] == 0.13  # a variant too
    assert "anamnesia[retrain_data-retain]/control/forget_end" not in m  # a variant without the control arm
    assert len(m) == 2 + 2 * 3 + 3 + 2 + 3


def test_compare_accepts_moves_within_tolerance_and_flags_the_rest():
    stored = key_metrics(_results())
    assert compare(stored, stored) == []
    moved = _results()
    moved["runs"]["ff"]["records"][-1]["forget"]["top1"] += TOLERANCE["accuracy"] * 0.9  # within
    assert compare(stored, key_metrics(moved)) == []
    moved["base"]["retain"]["top1"] += TOLERANCE["accuracy"] * 1.5  # beyond
    moved["runs"]["ff"]["forget_drop_at_retain_drop"]["0.10"] -= TOLERANCE["derived"] * 1.5  # beyond
    moved["runs"]["attn"]["forget_drop_at_retain_drop"]["0.10"] = 0.2  # None -> a number
    del moved["anamnesia"], moved["anamnesia_variants"]
    problems = compare(stored, key_metrics(moved))
    assert any(p.startswith("base/retain/top1") and "tolerance 0.02" in p for p in problems)
    assert any(p.startswith("ff/forget_drop_at_retain_drop/0.10") for p in problems)
    assert any(p.startswith("attn/forget_drop_at_retain_drop/0.10: stored None") for p in problems)
    assert sum("missing now" in p for p in problems) == 8  # every anamnesia figure, the variant's too
    assert len(problems) == 11


def test_record_then_check_round_trip(tmp_path):
    import json

    results, stored = tmp_path / "results.json", tmp_path / "key_metrics.json"
    results.write_text(json.dumps(_results()))
    record(results, stored)
    check(results, stored)  # the same run passes
    moved = copy.deepcopy(_results())
    moved["runs"]["ff"]["records"][-1]["retain"]["top1"] = 0.2
    results.write_text(json.dumps(moved))
    with pytest.raises(SelpruneError, match="ff/final/retain/top1: stored 0.2500, now 0.2000"):
        check(results, stored)


def test_check_names_the_missing_file(tmp_path):
    with pytest.raises(SelpruneError, match="make notebooks"):
        check(tmp_path / "results.json", tmp_path / "nothing.json")
    (tmp_path / "k.json").write_text("{}")
    with pytest.raises(SelpruneError, match="execute the notebook series first"):
        check(tmp_path / "results.json", tmp_path / "k.json")
