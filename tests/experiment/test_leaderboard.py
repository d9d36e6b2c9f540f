"""The selectivity leaderboard (selprune/experiment/leaderboard.py): rows, ranking, CSV.

Pure functions checked on hand-made step records; `leaderboard` itself on a sweep whose
run files are written by hand (a real sweep: tests/experiment/test_sweep.py).
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from selprune.experiment.leaderboard import (
    floor_headline,
    format_top,
    frontier_curves,
    leaderboard,
    leaderboard_csv,
    rank,
    relearn_row,
    run_row,
)
from selprune.experiment.notebooks import kernel_params
from selprune.experiment.sweepfile import expand


def _records(retain: list[float], forget: list[float]) -> list[dict]:
    """Step records with the given top-1 curves (step 0 first)."""
    return [{"step": i, "fraction": {"ff": 0.01 * i, "attn": 0.0},
             "forget": {"top1": f}, "retain": {"top1": r}, "seconds": {"eval": 1.0}}
            for i, (r, f) in enumerate(zip(retain, forget, strict=True))]


# ----------------------------------------------------------- headline, rows, ranking
def test_headline_never_reached_is_none_and_flagged():
    # retain falls at most 5% (0.40 -> 0.38): the 10% read-out does not exist
    row = run_row(_records(retain=[0.40, 0.39, 0.38], forget=[0.50, 0.30, 0.20]))
    assert row["forget_drop_at_10"] is None and row["forget_drop_at_20"] is None and row["reached"] is False
    assert row["retain_drop_max"] == pytest.approx(0.05) and row["forget_drop_final"] == pytest.approx(0.6)
    assert "not reached" in row["note"] and "5.0%" in row["note"] and "60.0%" in row["note"]


def test_headline_is_interpolated_where_retain_reaches_10_percent():
    # retain falls 20% in one step, forget 80%: at 10% retain damage, forget has lost 40%
    row = run_row(_records(retain=[0.40, 0.32], forget=[0.50, 0.10]))
    assert row["forget_drop_at_10"] == pytest.approx(0.4) and row["reached"] is True and "note" not in row
    assert row["steps"] == 1 and row["seconds"] == pytest.approx(2.0)


def test_a_run_without_headline_is_unranked_and_an_empty_csv_cell():
    low = run_row(_records(retain=[0.40, 0.39, 0.38], forget=[0.50, 0.30, 0.20]))
    high = run_row(_records(retain=[0.40, 0.32], forget=[0.50, 0.10]))
    rows = rank([{"point": "low", "run": "ff", "status": "done", **low},
                 {"point": "high", "run": "ff", "status": "done", **high}])
    assert [(r["point"], r["rank"]) for r in rows] == [("high", 1), ("low", None)]
    parsed = next(r for r in csv.DictReader(io.StringIO(leaderboard_csv(rows))) if r["point"] == "low")
    assert parsed["forget_drop_at_10"] == "" and parsed["rank"] == "" and parsed["reached"] == "False"
    table = format_top(rows).splitlines()
    assert table[1].split()[:4] == ["1", "high", "/", "ff"] and "40.0%" in table[1]
    assert table[2].split()[:4] == ["-", "low", "/", "ff"] and "not reached" in table[2]


def _row(point, headline, status="done", area=0.0, floor=False):
    return {"point": point, "run": "random" if floor else "ff", "floor": floor, "status": status,
            "forget_drop_at_10": headline, "selectivity_area": area}


def test_ranking_by_hand():
    rows = rank([_row("a", 0.30, area=0.1), _row("b", 0.70, area=0.1), _row("floor", 0.50, floor=True),
                 _row("c", None), _row("d", None, status="failed"), _row("e", 0.70, area=0.2),
                 _row("f", 0.90, status="incomplete")])
    # e and b tie on the headline; e has the larger area. The floor's headline is 0.5.
    assert [r["point"] for r in rows] == ["e", "b", "floor", "a", "c", "d", "f"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, None, None, None]
    assert [r["above_floor"] for r in rows[:4]] == pytest.approx([0.2, 0.2, 0.0, -0.2])
    assert all(r["above_floor"] is None for r in rows[4:])
    assert floor_headline(rows) == pytest.approx(0.5)


def test_without_a_floor_nothing_is_compared_to_it():
    rows = rank([_row("a", 0.3)])
    assert all(r["above_floor"] is None for r in rows) and floor_headline(rows) is None


# --------------------------------------------------------- the leaderboard of a sweep
def _finished_point(tmp_path, records: list[dict], run: str = "ff", relearn: dict | None = None, **base):
    """A one-point sweep (one run) whose results.json and records.json are written by hand."""
    sw = expand({"base": {"runs": run, **base}}, "s.yaml", tmp_path)
    pt = sw.points[0]
    (pt.run_dir / run).mkdir(parents=True)
    params = {k: v for k, v in kernel_params(pt.params).items() if k != "run_dir"}
    result = {"params": params, "runs": {run: {"records": records, "relearn": relearn}}}
    (pt.run_dir / "results.json").write_text(json.dumps(result))
    (pt.run_dir / run / "records.json").write_text(json.dumps(records))
    return sw


def test_a_baseline_row_carries_its_compute_and_its_own_relearning(tmp_path):
    """GA (notebook 07) relearns its own output: the row takes that record's index, and
    the cumulative tokens of the last checkpoint with the largest peak memory of any."""
    records = _records(retain=[0.40, 0.38, 0.32], forget=[0.50, 0.30, 0.10])
    for r, (fwd, peak) in zip(records, [(0, None), (1024, 900.0), (2048, 700.0)], strict=True):
        r.update(train_step=2 * r["step"], compute={"forward_tokens": fwd, "backward_tokens": fwd,
                                                    "forward_equiv_tokens": 3.0 * fwd, "peak_memory_mb": peak})
    sw = _finished_point(tmp_path, records, run="ga", relearn=_arm(4.0, "4 steps", 0.6),
                         unlearn_steps=4, unlearn_checkpoints=2)
    [row] = leaderboard(sw)
    assert row["status"] == "done" and row["rank"] == 1
    assert (row["forward_tokens"], row["backward_tokens"], row["forward_equiv_tokens"]) == (2048, 2048, 6144.0)
    assert row["peak_memory_mb"] == 900.0, "the largest peak of any checkpoint, not the last"
    assert (row["relearn_50"], row["relearn_50_steps"], row["relearn_recovered_final"]) == ("4 steps", 4.0, 0.6)
    assert row["relearn_control_holds"] is None, "a run's own relearning has no unpruned control"
    header = leaderboard_csv([row]).splitlines()[0].split(",")
    assert header.index("forward_equiv_tokens") < header.index("seconds") < header.index("note")


def test_records_without_compute_leave_the_compute_columns_empty():
    row = run_row(_records(retain=[0.40, 0.32], forget=[0.50, 0.10]))
    assert [row[k] for k in ("forward_tokens", "backward_tokens", "forward_equiv_tokens", "peak_memory_mb")] == \
        [None] * 4


def test_a_run_stopped_by_the_forget_rule_is_done_not_incomplete(tmp_path):
    """Stopped after 1 of 5 steps because forget top-1 fell below stop_forget_top1: the
    run is over and ranked (the sweep's copy of the stop rule once ignored this one)."""
    records = _records(retain=[0.40, 0.32], forget=[0.50, 0.10])
    [row] = leaderboard(_finished_point(tmp_path / "stopped", records, steps=5, stop_forget_top1=0.2))
    assert row["status"] == "done" and row["rank"] == 1 and "note" not in row
    [row] = leaderboard(_finished_point(tmp_path / "cut", records, steps=5))
    assert row["status"] == "incomplete" and row["rank"] is None and row["note"] == "incomplete: 1 of 5 steps"


def _arm(step50, text50, recovered):
    return {"index": {"0.5": {"step": step50, "text": text50, "recovered_final": recovered},
                      "0.9": {"step": None, "text": "> 16 steps, 4.1k tokens", "recovered_final": recovered}},
            "worst_case": {"max_forget_top1": 0.3}}


def test_relearning_columns_go_to_the_runs_the_arms_came_from():
    result = {"selective_run": "attn", "control": {"holds": True},
              "arms": {"selective": _arm(None, "> 16 steps, 4.1k tokens", 0.2), "random": _arm(7.5, "7.5 steps", 1.0)}}
    sel, floor = relearn_row(result, "attn"), relearn_row(result, "random")
    assert sel == {"relearn_50": "> 16 steps, 4.1k tokens", "relearn_90": "> 16 steps, 4.1k tokens",
                   "relearn_50_steps": None, "relearn_90_steps": None, "relearn_recovered_final": 0.2,
                   "relearn_best_forget_top1": 0.3, "relearn_control_holds": True}
    assert floor["relearn_50_steps"] == 7.5 and floor["relearn_recovered_final"] == 1.0
    assert relearn_row(result, "ff") == {}, "a run no arm came from"
    assert relearn_row(None, "attn") == {}, "not relearned (yet)"
    header = leaderboard_csv([{"point": "p", "run": "attn", "note": "n", **sel}]).splitlines()[0].split(",")
    assert header.index("relearn_50") < header.index("note"), "relearning columns sit before the notes"
    assert "relearn_50" not in leaderboard_csv([{"point": "p", "run": "attn"}]), "no empty relearning columns"


def test_the_frontier_draws_the_best_runs_and_each_other_kinds_best_even_unranked(tmp_path):
    """RMU-like: a baseline too gentle ever to cost 10% of retain has no rank, yet its
    curve belongs on the frontier beside the ranked runs; its kind's largest area is drawn."""
    curves = {"ff-a": ("ff", [0.40, 0.32], [0.50, 0.10]), "ff-b": ("ff", [0.40, 0.32], [0.50, 0.30]),
              "gentle-1": ("ga", [0.40, 0.39], [0.50, 0.40]), "gentle-2": ("ga", [0.40, 0.39], [0.50, 0.05]),
              "blip": ("ga", [0.40, 0.30], [0.50, 0.35]),  # ranked (it crossed 10%), but its area is small
              "floor": ("random", [0.40, 0.30], [0.50, 0.45])}
    sw = expand({"base": {"steps": 1, "unlearn_steps": 1, "unlearn_checkpoints": 1},
                 "variants": [{"name": n, "runs": run} for n, (run, _, _) in curves.items()]}, "s.yaml", tmp_path)
    for pt in sw.points:
        run, retain, forget = curves[pt.name]
        records = _records(retain, forget)
        if run == "ga":
            records = [{**r, "train_step": r["step"]} for r in records]
        (pt.run_dir / run).mkdir(parents=True)
        params = {k: v for k, v in kernel_params(pt.params).items() if k != "run_dir"}
        (pt.run_dir / "results.json").write_text(json.dumps({"params": params, "runs": {run: {"records": records}}}))
        (pt.run_dir / run / "records.json").write_text(json.dumps(records))
    rows = leaderboard(sw)
    assert [r["point"] for r in rows if r["rank"]] == ["ff-a", "ff-b", "blip", "floor"]
    assert list(frontier_curves(sw, rows)) == ["ff-a / ff", "ff-b / ff", "blip / ga", "floor / random"], \
        "ga is among the six best-ranked already"
    assert list(frontier_curves(sw, rows, top=2)) == ["ff-a / ff", "ff-b / ff", "gentle-2 / ga", "floor / random"], \
        "ga's largest area, not its ranked blip"
