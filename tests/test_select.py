"""Selection: global top-k, per-layer quotas, whole heads, pruned neurons excluded,
deterministic ties, and bad fractions refused."""

from __future__ import annotations

import pytest
import torch

from selprune.errors import SelpruneError
from selprune.select import select


def brute_top(scores: torch.Tensor, k: int, pruned: torch.Tensor | None = None) -> set[int]:
    """Flat indices of the k best available scores (ties: lower index), by plain Python."""
    flat = scores.reshape(-1).tolist()
    banned = set() if pruned is None else set(pruned.reshape(-1).nonzero().squeeze(1).tolist())
    cand = sorted((i for i in range(len(flat)) if i not in banned), key=lambda i: (-flat[i], i))
    return set(cand[:k])


def as_set(mask: torch.Tensor) -> set[int]:
    return set(mask.reshape(-1).nonzero().squeeze(1).tolist())


def test_global_topk_not_per_layer() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 20, generator=g, dtype=torch.float64)
    scores[1] += 1.0  # layer 1 dominates
    chosen = select(scores, 0.25)  # 15 of 60
    assert chosen.shape == scores.shape and chosen.dtype == torch.bool
    assert int(chosen.sum()) == 15
    assert as_set(chosen) == brute_top(scores, 15)
    assert chosen[1].sum() == 15 and chosen[0].sum() == 0  # no per-layer quota


def test_per_layer_quota() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 20, generator=g)
    scores[1] += 1.0
    chosen = select(scores, 0.25, per_layer=True)
    for layer in range(3):
        assert int(chosen[layer].sum()) == 5
        assert as_set(chosen[layer]) == brute_top(scores[layer], 5)


def test_multidim_attention_scores_global() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(2, 4, 6, generator=g)
    chosen = select(scores, 0.1)  # round(4.8) = 5
    assert int(chosen.sum()) == 5 and as_set(chosen) == brute_top(scores, 5)


@pytest.mark.parametrize("reducer", ["mean", "median"])
def test_heads(reducer: str) -> None:
    # layer 0 head 0: one huge neuron (high mean, low median); head 1: uniformly good (high median)
    scores = torch.full((2, 3, 5), 0.1)
    scores[0, 0] = torch.tensor([100.0, 0.0, 0.0, 0.0, 0.0])
    scores[0, 1] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.9])
    scores[1, 2] = torch.tensor([0.5, 0.6, 0.4, 0.5, 0.5])
    chosen = select(scores, 2 / 6, heads=reducer)  # 2 of 6 heads
    per_head = chosen.all(-1)
    assert torch.equal(chosen.any(-1), per_head)  # whole heads only
    assert int(per_head.sum()) == 2
    head_scores = scores.mean(-1) if reducer == "mean" else scores.median(-1).values
    assert as_set(per_head) == brute_top(head_scores, 2)
    if reducer == "mean":
        assert per_head[0, 0] and per_head[0, 1]
    else:
        assert per_head[0, 1] and per_head[1, 2] and not per_head[0, 0]


def test_heads_skip_pruned_heads_and_neurons() -> None:
    scores = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)  # last head best
    pruned = torch.zeros(2, 3, 4, dtype=torch.bool)
    pruned[1, 2] = True  # best head fully pruned
    pruned[1, 1, 0] = True  # next head partly pruned
    chosen = select(scores, 1 / 6, pruned, heads="mean")
    assert not (chosen & pruned).any()
    assert torch.equal(chosen.nonzero()[:, :2].unique(dim=0), torch.tensor([[1, 1]]))
    assert int(chosen.sum()) == 3  # the rest of head (1, 1)


def test_bad_heads_option() -> None:
    with pytest.raises(SelpruneError, match="head"):
        select(torch.rand(2, 3, 4), 0.5, heads="max")
    with pytest.raises(SelpruneError, match="head"):
        select(torch.rand(2, 12), 0.5, heads="mean")


def test_already_pruned_excluded() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 10, generator=g)
    pruned = torch.zeros(2, 10, dtype=torch.bool)
    top = brute_top(scores, 4)
    pruned.view(-1)[list(top)] = True
    chosen = select(scores, 0.2, pruned)
    assert int(chosen.sum()) == 4
    assert not (chosen & pruned).any()
    assert as_set(chosen) == brute_top(scores, 4, pruned)
    # per layer too
    chosen = select(scores, 0.2, pruned, per_layer=True)
    assert not (chosen & pruned).any() and chosen.sum(1).tolist() == [2, 2]


def test_pruned_never_revived_even_with_minus_inf_scores() -> None:
    scores = torch.tensor([[-float("inf"), -float("inf"), 1.0, -float("inf")]])
    pruned = torch.tensor([[True, False, False, False]])
    chosen = select(scores, 0.75, pruned)
    assert not (chosen & pruned).any()
    assert as_set(chosen) == {1, 2, 3}


def test_capped_by_available() -> None:
    scores = torch.rand(2, 5)
    pruned = torch.ones(2, 5, dtype=torch.bool)
    pruned[0, 3] = pruned[1, 1] = False
    chosen = select(scores, 0.5, pruned)
    assert as_set(chosen) == {3, 6}
    assert not select(scores, 0.0).any()
    assert select(scores, 1.0).all()


def test_deterministic_ties_lower_index_first() -> None:
    scores = torch.zeros(3, 7)
    chosen = select(scores, 5 / 21)
    assert as_set(chosen) == {0, 1, 2, 3, 4}
    scores = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.5, 0.5]])
    assert as_set(select(scores, 3 / 6)) == {1, 3, 0}
    pruned = torch.tensor([[True, False, False], [False, False, False]])
    assert as_set(select(scores, 3 / 6, pruned)) == {1, 3, 2}
    big = torch.zeros(10000)
    big[::3] = 1.0
    chosen = select(big[None], 0.5)
    assert as_set(chosen) == brute_top(big, 5000)


@pytest.mark.parametrize("frac", [-0.01, 1.01, float("nan")])
def test_fraction_outside_unit_interval(frac: float) -> None:
    with pytest.raises(SelpruneError, match="outside"):
        select(torch.rand(2, 5), frac)


def test_nan_scores_rejected() -> None:
    scores = torch.rand(2, 5)
    scores[1, 2] = float("nan")
    with pytest.raises(SelpruneError, match="NaN"):
        select(scores, 0.2)
