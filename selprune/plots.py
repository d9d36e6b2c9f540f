"""Figures for the notebooks: each function takes results and returns a matplotlib Figure.

Kept here, not in the notebooks, so that pytest reaches them and every notebook draws the
same way. `save_figure` writes a PNG atomically into the run directory's `figures/`.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from selprune.paths import atomic_write_bytes
from selprune.selectivity import relative_curves
from selprune.stats import ActivationStats

SIDE_COLORS = {"forget": "tab:red", "retain": "tab:blue"}
F = TypeVar("F", bound=Callable[..., Any])


def themed(fn: F) -> F:
    """Draw in seaborn's whitegrid/notebook theme without setting it for the session:
    every figure looks the same whoever calls, and importing selprune changes nothing."""
    @functools.wraps(fn)
    def draw(*args: Any, **kwargs: Any) -> Any:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), sns.color_palette("deep"):
            return fn(*args, **kwargs)
    return draw  # type: ignore[return-value]


def save_figure(fig: plt.Figure, run_dir: str | Path, name: str) -> Path:
    """Write `fig` as `run_dir/figures/<name>.png` (atomic, fixed DPI, no timestamp metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    path = Path(run_dir) / "figures" / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


@themed
def activation_profile(forget: ActivationStats, retain: ActivationStats, kind: str = "ff") -> plt.Figure:
    """Per layer: the distribution over neurons of mean |activation|, forget beside retain."""
    rows = []
    for side, st in (("forget", forget), ("retain", retain)):
        imp = st.moment(kind, "sum_abs").reshape(st.shape(kind)[0], -1)  # [layers, neurons]
        for layer in range(imp.shape[0]):
            q = torch.quantile(imp[layer].float(), torch.tensor([0.1, 0.5, 0.9]))
            rows.append({"side": side, "layer": layer, "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for side, g in df.groupby("side"):
        ax.plot(g["layer"], g["median"], label=f"{side} median", color=SIDE_COLORS[side])
        ax.fill_between(g["layer"], g["p10"], g["p90"], alpha=0.2, color=SIDE_COLORS[side])
    ax.set(xlabel="layer", ylabel="mean |activation| per neuron", yscale="log",
           title=f"{kind.upper()} neurons: how strongly they fire (10th-90th percentile band)")
    ax.legend()
    return fig


@themed
def score_distributions(scores: dict[str, dict[str, torch.Tensor]], kind: str = "ff") -> plt.Figure:
    """Histogram of log10(score) for each importance function."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, s in scores.items():
        v = s[kind].reshape(-1).double().clamp_min(1e-12).log10().numpy()
        sns.kdeplot(v, ax=ax, label=name, bw_adjust=0.5)
    ax.set(xlabel="log10 score (forget / retain)", ylabel="density", title=f"{kind.upper()} score distributions")
    ax.legend()
    return fig


@themed
def top_by_layer(selected: dict[str, torch.Tensor], kind: str = "ff") -> plt.Figure:
    """How many of the top-scoring neurons sit in each layer, per importance function."""
    rows = [{"importance": name, "layer": layer, "count": int(c)}
            for name, m in selected.items() for layer, c in enumerate(m.reshape(m.shape[0], -1).sum(1))]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.lineplot(pd.DataFrame(rows), x="layer", y="count", hue="importance", marker="o", ax=ax)
    ax.set(title=f"Where the top {kind.upper()} neurons sit", ylabel="neurons in the top set")
    return fig


@themed
def agreement_heatmap(agreement: pd.DataFrame, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    sns.heatmap(agreement, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax)
    ax.set(title=title)
    return fig


@themed
def pruning_curves(runs: dict[str, list[dict[str, Any]]], axis: str, metric: str = "top1") -> plt.Figure:
    """Forget and retain `metric` against the fraction of `axis` ("ff" or "attn") neurons
    pruned, one line style per run."""
    rows = []
    for name, records in runs.items():
        for r in records:
            for side in ("forget", "retain"):
                rows.append({"run": name, "side": side, "fraction pruned": r["fraction"][axis],
                             metric: r[side][metric]})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(df, x="fraction pruned", y=metric, hue="side", style="run", markers=True, palette=SIDE_COLORS, ax=ax)
    ax.set(title=f"{metric} as neurons are pruned", ylim=(0, None))
    return fig


@themed
def tradeoff(runs: dict[str, list[dict[str, Any]]], metric: str = "top1") -> plt.Figure:
    """Forget against retain, relative to the unpruned model: the lower-right is selective."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, records in runs.items():
        c = relative_curves(records, metric)
        f, t = c["forget"], c["retain"]
        ax.plot(t, f, marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="no selectivity")
    ax.set(xlabel=f"retain {metric} / unpruned", ylabel=f"forget {metric} / unpruned", xlim=(0, 1.05), ylim=(0, 1.05),
           title="Forget against retain")
    ax.legend()
    return fig


@themed
def recovery_curves(arms: dict[str, dict[str, Any]], metric: str = "top1") -> plt.Figure:
    """Forget and retain `metric` against retraining steps, per arm (anamnesia)."""
    rows = [{"arm": arm, "side": side, "step": r["step"], metric: r[side][metric]}
            for arm, a in arms.items() for r in a["curve"] for side in ("forget", "retain")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, side in zip(axes, ("forget", "retain"), strict=True):
        d = pd.DataFrame([r for r in rows if r["side"] == side], columns=["arm", "side", "step", metric])
        if d.empty:  # nothing was relearned (e.g. a series without those runs): empty axes, not an error
            ax.text(0.5, 0.5, "nothing relearned", ha="center", va="center", transform=ax.transAxes)
        else:
            sns.lineplot(d, x="step", y=metric, hue="arm", marker="o", ax=ax)
        ax.set(xscale="symlog", title=f"{side} {metric} while retraining on forget text", xlabel="retraining step")
    return fig


@themed
def recovery_side_by_side(results: dict[str, dict[str, Any]], metric: str = "top1") -> plt.Figure:
    """Forget `metric` against retraining steps, per arm, one panel per relearning setting
    (e.g. the default and a variant), on shared axes."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items(), strict=True):
        rows = [{"arm": arm, "step": r["step"], metric: r["forget"][metric]}
                for arm, a in result["arms"].items() for r in a["curve"]]
        sns.lineplot(pd.DataFrame(rows), x="step", y=metric, hue="arm", marker="o", ax=ax)
        ax.set(xscale="symlog", title=f"forget {metric}: {label}", xlabel="retraining step")
    return fig
