"""Importance functions and scores against direct formulas on known activations."""

from __future__ import annotations

import pytest
import torch

from selprune import scoring
from selprune.errors import SelpruneError
from selprune.scoring import DEFAULT_EPS, IMPORTANCE, SCORES, check_scoring, score
from selprune.sites import KINDS
from selprune.stats import ActivationStats

SHAPES = {"ff": (2, 5), "attn": (2, 3, 2)}


def activations(seed: int, n: int = 200, shift: float = 0.7, scale: float = 1.5) -> dict[str, torch.Tensor]:
    """Per kind `[n, *neuron shape]` float64 activations with non-zero means, so that std,
    variance and rms all differ."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind, shape in SHAPES.items():
        x = torch.randn((n, *shape), generator=g, dtype=torch.float64) * scale + shift
        x[: n // 4] = 0.0  # some exact zeros (count_pos, sqrt)
        out[kind] = x
    return out


def stats_of(xs: dict[str, torch.Tensor]) -> ActivationStats:
    """Statistics from raw activations, through the documented sums."""
    n = next(iter(xs.values())).shape[0]
    sums = {
        k: {
            "sum": x.sum(0),
            "sum_sq": (x**2).sum(0),
            "sum_abs": x.abs().sum(0),
            "count_pos": (x > 0).double().sum(0),
            "sum_sqrt": x.abs().sqrt().sum(0),
        }
        for k, x in xs.items()
    }
    return ActivationStats(n, sums)


def direct(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "freq":
        return (x > 0).double().mean(0)
    if name == "abs":
        return x.abs().mean(0)
    if name == "rms":
        return x.pow(2).mean(0).sqrt()
    if name == "std":
        return x.std(0, unbiased=False)
    if name == "sqrt":
        return x.abs().sqrt().mean(0)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["freq", "abs", "rms", "std", "sqrt"])
def test_importance_against_formula(name: str) -> None:
    xs = activations(0)
    s = stats_of(xs)
    g = torch.Generator().manual_seed(0)
    for kind in KINDS:
        got = IMPORTANCE[name](s, kind, g)
        assert got.shape == SHAPES[kind]
        torch.testing.assert_close(got, direct(name, xs[kind]), rtol=1e-10, atol=1e-12)


def test_std_is_standard_deviation_not_variance() -> None:
    xs = activations(1, scale=3.0)
    s = stats_of(xs)
    std = IMPORTANCE["std"](s, "ff", torch.Generator())
    var = xs["ff"].var(0, unbiased=False)
    assert (var > 2).all()  # so std and var differ clearly
    torch.testing.assert_close(std**2, var, rtol=1e-10, atol=1e-12)
    rms = IMPORTANCE["rms"](s, "ff", torch.Generator())
    torch.testing.assert_close(rms**2, var + xs["ff"].mean(0) ** 2, rtol=1e-10, atol=1e-12)


def test_std_of_constant_neuron_is_zero_not_nan() -> None:
    xs = activations(2)
    xs["ff"][:, 0, 0] = 0.1  # constant: rounding may make the variance slightly negative
    s = stats_of(xs)
    std = IMPORTANCE["std"](s, "ff", torch.Generator())
    assert torch.isfinite(std).all() and std[0, 0] < 1e-6


@pytest.mark.parametrize("name", ["freq", "abs", "rms", "std", "sqrt"])
def test_ratio_score_with_separate_eps(name: str) -> None:
    xf, xr = activations(3, shift=1.0), activations(4, shift=0.2)
    f, r = stats_of(xf), stats_of(xr)
    eps = {"ff": 0.5, "attn": 0.03}
    got = score(f, r, name, "ratio", eps)
    for kind in KINDS:
        want = direct(name, xf[kind]) / (direct(name, xr[kind]) + eps[kind])
        torch.testing.assert_close(got[kind], want, rtol=1e-10, atol=1e-12)


def test_default_eps_per_kind() -> None:
    xf = activations(5)
    zero = {k: torch.zeros_like(x) for k, x in xf.items()}  # retain importance 0: score = I_f / eps
    got = score(stats_of(xf), stats_of(zero), "abs")
    assert DEFAULT_EPS == {"ff": 1e-3, "attn": 1e-4}
    for kind in KINDS:
        torch.testing.assert_close(got[kind], direct("abs", xf[kind]) / DEFAULT_EPS[kind], rtol=1e-10, atol=0.0)
    only_ff = score(stats_of(xf), stats_of(zero), "abs", eps={"ff": 2.0})  # attn keeps its default
    torch.testing.assert_close(only_ff["ff"], direct("abs", xf["ff"]) / 2.0)
    torch.testing.assert_close(only_ff["attn"], got["attn"])


def test_mean_diff() -> None:
    xf, xr = activations(6, shift=0.9), activations(7, shift=-0.4)
    got = score(stats_of(xf), stats_of(xr), "abs", "mean_diff")
    for kind in KINDS:
        torch.testing.assert_close(got[kind], (xf[kind].mean(0) - xr[kind].mean(0)).abs(), rtol=1e-10, atol=1e-12)


def test_registry_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "IMPORTANCE", dict(IMPORTANCE))
    monkeypatch.setattr(scoring, "SCORES", dict(SCORES))

    @scoring.importance("mean_sq")
    def _mean_sq(s, kind, g):
        return s.moment(kind, "sum_sq")

    @scoring.score_function("difference")
    def _difference(f, r, kind, eps, imp, g):
        return scoring.IMPORTANCE[imp](f, kind, g) - scoring.IMPORTANCE[imp](r, kind, g)

    xf, xr = activations(8), activations(9)
    got = score(stats_of(xf), stats_of(xr), "mean_sq", "difference")
    for kind in KINDS:
        torch.testing.assert_close(got[kind], (xf[kind] ** 2).mean(0) - (xr[kind] ** 2).mean(0))
    check_scoring("mean_sq", "difference")
    assert "mean_sq" not in IMPORTANCE  # the module's registry was patched, not the original


def test_unknown_scoring_lists_valid_ones() -> None:
    s = stats_of(activations(0))
    with pytest.raises(SelpruneError) as e:
        score(s, s, "entropy")
    assert "entropy" in str(e.value)
    for name in ("abs", "freq", "rms", "std", "sqrt", "rand"):
        assert name in str(e.value)
    with pytest.raises(SelpruneError) as e:
        score(s, s, "abs", "quotient")
    assert "ratio" in str(e.value) and "mean_diff" in str(e.value)


def test_mismatched_shapes_rejected() -> None:
    a = stats_of(activations(0))
    xs = activations(1)
    xs["ff"] = torch.zeros(10, 2, 6, dtype=torch.float64)
    with pytest.raises(SelpruneError, match="different models"):
        score(a, stats_of(xs), "abs")


def test_rand_reproducible_by_seed() -> None:
    s = stats_of(activations(0))
    torch.manual_seed(1)
    a = score(s, s, "rand", seed=11)
    torch.manual_seed(2)  # the global RNG does not matter
    b = score(s, s, "rand", seed=11)
    c = score(s, s, "rand", seed=12)
    for kind in KINDS:
        assert a[kind].shape == SHAPES[kind]
        assert torch.equal(a[kind], b[kind])
        assert not torch.equal(a[kind], c[kind])
        assert torch.isfinite(a[kind]).all() and (a[kind] >= 0).all()
    assert not torch.equal(a["ff"][0], a["ff"][1])  # not one constant
