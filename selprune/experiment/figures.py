"""The sweep's figures: the leaderboard's headline bars and the forget-against-retain frontier."""

from __future__ import annotations

from typing import Any

from selprune.experiment.leaderboard import HEADLINE, floor_headline, row_label
from selprune.plots import themed
from selprune.selectivity import relative_curves


@themed
def plot_leaderboard(rows: list[dict[str, Any]]):
    """Horizontal bars of the headline per pruning run, in leaderboard order, the random
    floor as a dashed line. Runs without a headline get a label instead of a bar."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    labels = [row_label(r) for r in rows]
    df = pd.DataFrame({"label": labels, "headline": [r.get(HEADLINE) for r in rows],
                       "kind": ["floor (random)" if r.get("floor") else r["run"] for r in rows],
                       "ranked": [r.get("rank") is not None for r in rows]})
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(rows), 1)))
    drawn = df[df["ranked"]]
    if len(drawn):
        palette = dict(zip(sorted(set(df["kind"])), sns.color_palette("tab10", len(set(df["kind"]))), strict=True))
        palette["floor (random)"] = (0.55, 0.55, 0.55)
        sns.barplot(drawn, x="headline", y="label", hue="kind", order=labels, dodge=False, palette=palette, errorbar=None,
                    ax=ax)
    else:
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top, as barplot draws it
    for i, r in enumerate(rows):
        if r.get("rank") is None:
            text = "not reached" if r.get("status") == "done" else r.get("status", "")
            if r.get("status") == "done":
                text += f" (retain fell at most {r['retain_drop_max']:.0%})"
            ax.text(0.005, i, text, va="center", fontsize=8, color="dimgray", style="italic")
    floor = floor_headline(rows)
    if floor is not None:
        ax.axvline(floor, color="black", ls="--", lw=1, label="random floor")
    ax.set(xlabel="forget top-1 drop where retain top-1 has dropped 10% (higher: more selective)", ylabel="",
           title="Selectivity leaderboard")
    lo = min([0.0, *(v for v in df["headline"] if v is not None and not pd.isna(v))])
    ax.set_xlim(lo - 0.02, 1.0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return fig


@themed
def plot_frontier(curves: dict[str, list[dict[str, Any]]], floor: set[str] = frozenset(),
                  styles: dict[str, dict[str, Any]] | None = None):
    """Forget drop against retain drop along each run (relative top-1, step by step): the
    headline is where a curve crosses the 10% line; the whole curve shows whether a recipe
    that loses there wins at other amounts of collateral damage, and how far above the
    random floor (`floor`: the labels drawn dashed) each one runs. `styles`: matplotlib line
    options per label (e.g. one colour for a group of curves)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    right = 0.12
    for label, records in curves.items():
        c = relative_curves(records)
        retain_drop, forget_drop = 1 - c["retain"], 1 - c["forget"]
        right = max(right, float(retain_drop.max()))
        ax.plot(retain_drop, forget_drop, marker=".", lw=1.2, label=label,
                **({"ls": "--", "color": "0.45"} if label in floor else {}), **(styles or {}).get(label, {}))
    ax.axvline(0.10, color="black", lw=0.8, ls=":", label="headline: 10% retain drop")
    ax.set(xlabel="retain top-1 drop (relative to unpruned)", ylabel="forget top-1 drop (relative to unpruned)",
           xlim=(-0.01, min(right, 1.0) + 0.01), ylim=(-0.02, 1.0), title="Forget against retain damage, per run")
    ax.legend(fontsize=7, loc="lower right")
    return fig
