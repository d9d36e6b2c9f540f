"""The sweep's figures (selprune/experiment/figures.py): the frontier and the leaderboard bars."""

from __future__ import annotations

import matplotlib
import pytest

from selprune.experiment.figures import plot_frontier, plot_leaderboard
from selprune.experiment.leaderboard import rank, run_row

matplotlib.use("Agg")


def _records(retain: list[float], forget: list[float]) -> list[dict]:
    """Step records with the given top-1 curves (step 0 first)."""
    return [{"step": i, "fraction": {"ff": 0.01 * i, "attn": 0.0},
             "forget": {"top1": f}, "retain": {"top1": r}, "seconds": {"eval": 1.0}}
            for i, (r, f) in enumerate(zip(retain, forget, strict=True))]


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_frontier_plot_draws_each_curve_and_the_floor_dashed():
    curves = {"p / ff": _records([0.4, 0.38, 0.3], [0.5, 0.2, 0.1]), "p / random": _records([0.4, 0.3], [0.5, 0.45])}
    fig = plot_frontier(curves, floor={"p / random"})
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert set(lines) == {"p / ff", "p / random", "headline: 10% retain drop"}
    x, y = lines["p / ff"].get_data()
    assert x == pytest.approx([0, 0.05, 0.25]) and y == pytest.approx([0, 0.6, 0.8]), "drops, not ratios"
    assert lines["p / random"].get_linestyle() == "--" and lines["p / ff"].get_linestyle() == "-"
    assert fig.axes[0].get_xlim()[1] == pytest.approx(0.26)


def _rows() -> list[dict]:
    return rank([
        {"point": "p", "run": "ff", "floor": False, "status": "done", **run_row(_records([0.4, 0.3], [0.5, 0.1]))},
        {"point": "p", "run": "random", "floor": True, "status": "done", **run_row(_records([0.4, 0.3], [0.5, 0.45]))},
        {"point": "q", "run": "attn", "floor": False, "status": "done", **run_row(_records([0.4, 0.39], [0.5, 0.4]))},
        {"point": "r", "run": "ff", "floor": False, "status": "failed", "error": "boom"},
    ])


def test_leaderboard_plot_draws_every_kind_of_row():
    fig = plot_leaderboard(_rows())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["p / ff", "p / random", "q / attn", "r / ff"]
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("not reached") for t in texts) and "failed" in texts
    assert any(line.get_linestyle() == "--" for line in ax.lines), "the random floor"


def test_leaderboard_plot_with_nothing_ranked_draws_labels_only():
    fig = plot_leaderboard(_rows()[2:])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q / attn", "r / ff"]
    assert not ax.patches and not ax.lines, "no bars and no floor line"
