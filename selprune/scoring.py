"""Importance I(D, n) of each neuron on a dataset, and the score that compares forget to retain.

`score(n) = I(forget, n) / (I(retain, n) + eps)`: a neuron that fires much more on the
forget set than on the retain set scores high. The importance functions and score
functions are registries (`IMPORTANCE`, `SCORES`) that users extend with a decorator.
`std` is the true standard deviation (the reference code used the variance), and
`rms` is sqrt(mean x^2).

Definitions: docs/method.md, "Importance functions" and "Scoring functions".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from selprune.errors import SelpruneError
from selprune.sites import KINDS
from selprune.stats import ActivationStats

ImportanceFn = Callable[[ActivationStats, str, torch.Generator], torch.Tensor]
ScoreFn = Callable[[ActivationStats, ActivationStats, str, float, str, torch.Generator], torch.Tensor]

IMPORTANCE: dict[str, ImportanceFn] = {}
SCORES: dict[str, ScoreFn] = {}
DEFAULT_EPS = {"ff": 1e-3, "attn": 1e-4}  # the reference values


def importance(name: str) -> Callable[[ImportanceFn], ImportanceFn]:
    """Register an importance function `f(stats, kind, generator) -> tensor of the neuron shape`."""

    def add(fn: ImportanceFn) -> ImportanceFn:
        IMPORTANCE[name] = fn
        return fn

    return add


def score_function(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score `f(forget, retain, kind, eps, importance, generator) -> tensor`."""

    def add(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = fn
        return fn

    return add


@importance("freq")
def _freq(s: ActivationStats, kind: str, g: torch.Generator) -> torch.Tensor:
    return s.moment(kind, "count_pos")  # fraction of tokens with x > 0


@importance("abs")
def _abs(s: ActivationStats, kind: str, g: torch.Generator) -> torch.Tensor:
    return s.moment(kind, "sum_abs")  # mean |x|


@importance("rms")
def _rms(s: ActivationStats, kind: str, g: torch.Generator) -> torch.Tensor:
    return s.moment(kind, "sum_sq").sqrt()  # sqrt(mean x^2)


@importance("std")
def _std(s: ActivationStats, kind: str, g: torch.Generator) -> torch.Tensor:
    var = s.moment(kind, "sum_sq") - s.mean(kind).square()
    return var.clamp_min(0).sqrt()  # clamp: rounding can make a zero variance slightly negative


@importance("sqrt")
def _sqrt(s: ActivationStats, kind: str, g: torch.Generator) -> torch.Tensor:
    return s.moment(kind, "sum_sqrt")  # mean sqrt|x|


@importance("rand")
def _rand(s: ActivationStats, kind: str, g: torch.Generator) -> torch.Tensor:
    return torch.rand(s.shape(kind), generator=g, dtype=torch.float64)


@score_function("ratio")
def _ratio(f: ActivationStats, r: ActivationStats, kind: str, eps: float, imp: str, g: torch.Generator) -> torch.Tensor:
    return IMPORTANCE[imp](f, kind, g) / (IMPORTANCE[imp](r, kind, g) + eps)


@score_function("mean_diff")
def _mean_diff(f: ActivationStats, r: ActivationStats, kind: str, eps: float, imp: str, g: torch.Generator) -> torch.Tensor:
    return (f.mean(kind) - r.mean(kind)).abs()


def check_scoring(importance_name: str, score_name: str = "ratio") -> None:
    if importance_name not in IMPORTANCE:
        raise SelpruneError(f"unknown scoring function {importance_name!r}; valid ones: {', '.join(sorted(IMPORTANCE))}")
    if score_name not in SCORES:
        raise SelpruneError(f"unknown score {score_name!r}; valid ones: {', '.join(sorted(SCORES))}")


def score(
    forget: ActivationStats,
    retain: ActivationStats,
    importance: str = "abs",
    score_name: str = "ratio",
    eps: dict[str, float] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Scores of every neuron, per kind: ff `[n_layers, d_mlp]`, attn `[n_layers, n_heads, d_head]`.

    `seed` drives `rand` (the random baseline), so a random run is reproducible."""
    check_scoring(importance, score_name)
    eps = {**DEFAULT_EPS, **(eps or {})}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind in KINDS:
        if forget.shape(kind) != retain.shape(kind):
            raise SelpruneError("forget and retain statistics come from different models; collect both on one model")
        out[kind] = SCORES[score_name](forget, retain, kind, eps[kind], importance, g)
    return out
