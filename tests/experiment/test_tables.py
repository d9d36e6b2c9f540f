"""The notebooks' tables (selprune/experiment/tables.py): the results table, the anamnesia
table and the agreement of importance functions, each checked against numbers worked out
by hand from made-up results."""

from __future__ import annotations

import pytest
import torch

from selprune.experiment.tables import TABLE_METRICS, agreement, anamnesia_table, control_line, results_table


def record(step: int, ff: float, attn: float, forget: dict[str, float], retain: dict[str, float]) -> dict:
    return {"step": step, "fraction": {"ff": ff, "attn": attn}, "forget": forget, "retain": retain}


def metrics(top1: float, skip: float, loss: float) -> dict[str, float]:
    return {"top1": top1, "top10": top1 + 0.2, "top1_skip": skip, "top10_skip": skip + 0.2, "loss": loss}


RUNS = {
    "ff": [record(0, 0.0, 0.0, metrics(0.50, 0.40, 2.0), metrics(0.30, 0.20, 3.0)),
           record(1, 0.02, 0.0, metrics(0.30, 0.25, 2.5), metrics(0.29, 0.19, 3.1)),
           record(2, 0.04, 0.0, metrics(0.10, 0.05, 4.0), metrics(0.27, 0.18, 3.2))],
    "attn": [record(0, 0.0, 0.0, metrics(0.50, 0.40, 2.0), metrics(0.30, 0.20, 3.0)),
             record(1, 0.0, 0.03, metrics(0.45, 0.36, 2.1), metrics(0.33, 0.22, 2.9))],
}


# ---------------------------------------------------------------- results table
@pytest.fixture
def table():
    return results_table(RUNS, {"forget": "code", "retain": "prose"}).set_index(["run", "dataset"])


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("side, name", [("forget", "forget (code)"), ("retain", "retain (prose)")])
def test_results_table_drops_are_relative_to_the_unpruned_model(table, run, side, name):
    base, final = RUNS[run][0][side], RUNS[run][-1][side]
    row = table.loc[(run, name)]
    assert row["top1 drop %"] == pytest.approx(100 * (1 - final["top1"] / base["top1"]))
    assert row["top1_skip drop %"] == pytest.approx(100 * (1 - final["top1_skip"] / base["top1_skip"]))
    for m in TABLE_METRICS:
        assert row[f"base {m}"] == base[m] and row[m] == final[m], m


def test_results_table_gives_the_fraction_on_each_runs_axis(table):
    assert table.loc[("ff", "forget (code)"), "pruned"] == 0.04
    assert table.loc[("attn", "retain (prose)"), "pruned"] == 0.03, "an attention run reads its attn fraction"


def test_results_table_has_a_row_per_run_and_side(table):
    assert len(table) == 2 * len(RUNS)
    assert table.loc[("attn", "retain (prose)"), "top1 drop %"] < 0, "a metric that rose has a negative drop"


# --------------------------------------------------------------- anamnesia table
def test_anamnesia_table_shows_steps_and_tokens_or_the_censored_bound():
    def arm(step, top1, index):
        return {"pruned_step": step, "curve": [{"forget": {"top1": top1}}], "retain_drop": 0.1, "forget_drop": 0.8,
                "index": index, "recovery_auc": 0.3, "worst_case": {"max_forget_top1": top1 + 0.2}}

    reached = {"step": 3.4, "text": "3 steps, 870 tokens", "recovered_final": 0.7}
    bound = {"step": None, "text": "> 64 steps, 16.4k tokens", "recovered_final": 0.7}
    nothing = {"step": 0, "text": "0 steps (nothing removed)", "recovered_final": 1.0}
    table = anamnesia_table({"arms": {"selective": arm(5, 0.1, {"0.5": reached, "0.9": bound}),
                                      "unpruned": arm(None, 0.5, {"0.5": nothing, "0.9": nothing})}})
    sel = table.set_index("arm").loc["selective"]
    assert sel["to 50%"] == "3 steps, 870 tokens" and sel["to 90%"] == "> 64 steps, 16.4k tokens"
    assert sel["recovered at end"] == 0.7 and sel["best forget top1"] == pytest.approx(0.3)
    assert sel["retain drop %"] == pytest.approx(10) and sel["forget top1 at start"] == 0.1
    assert sel["forget drop %"] == pytest.approx(80) and sel["recovery AUC"] == 0.3 and sel["pruned step"] == "5"
    assert list(table["arm"]) == ["selective", "unpruned"]
    assert table.set_index("arm").loc["unpruned", "pruned step"] == "-", "the control prunes nothing: no NaN, no 5.0"


def test_control_line_says_whether_the_control_held():
    ok = {"forget_start": 0.5, "forget_end": 0.51, "retain_start": 0.3, "retain_end": 0.3, "holds": True,
          "tolerance": 0.02}
    assert control_line({"control": ok}).endswith("holds") and "0.50 -> 0.51" in control_line({"control": ok})
    assert "DRIFTS" in control_line({"control": {**ok, "holds": False}})


# --------------------------------------------------------------------- agreement
@pytest.fixture
def top() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sets = {name: torch.rand(2, 40, generator=g) < 0.3 for name in ("abs", "rms", "std", "rand")}
    sets["none"] = torch.zeros(2, 40, dtype=torch.bool)
    return sets


def test_agreement_is_one_on_the_diagonal_and_symmetric(top):
    a = agreement(top)
    assert list(a.index) == list(top) == list(a.columns)
    nonempty = [n for n in top if top[n].any()]
    assert all(a.loc[n, n] == 1 for n in nonempty)
    assert (a.values == a.values.T).all()


def test_agreement_is_the_jaccard_overlap(top):
    a = agreement(top)
    x, y = top["abs"], top["rms"]
    assert a.loc["abs", "rms"] == pytest.approx(float((x & y).sum()) / float((x | y).sum()))
    assert a.loc["abs", "none"] == 0 and a.loc["none", "none"] == 0, "an empty set overlaps nothing (no 0/0)"
