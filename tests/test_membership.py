"""Membership inference: the AUC on hand-made scores, Min-K%++ against a brute-force
per-token computation, and an overfitted tiny model whose seen windows are told apart."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from tiny_models import random_windows, tiny_llama

from selprune.errors import SelpruneError
from selprune.membership import membership, roc_auc, token_stats, window_scores


class IdsTokenizer:
    """Decodes token ids as their decimal numbers (all membership needs of a tokenizer)."""

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(map(str, r)) for r in rows]


def test_auc_on_hand_made_scores() -> None:
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5
    assert roc_auc([3, 1], [2, 0]) == 0.75  # 3 of the 4 pairs in order
    assert roc_auc([1], [1, 0]) == 0.75  # a tie counts half
    assert roc_auc([2, 2, 0], [2, 1]) == pytest.approx((0.5 + 1 + 0.5 + 1 + 0 + 0) / 6)


def test_auc_needs_both_classes_and_finite_scores() -> None:
    with pytest.raises(SelpruneError, match="both classes"):
        roc_auc([1.0], [])
    with pytest.raises(SelpruneError, match="NaN"):
        roc_auc([math.nan], [1.0])


def brute_force(model, windows: torch.Tensor, k: float) -> list[float]:
    """Min-K%++ by the definition: per token, (log p(x_t) - mu) / sigma with mu and sigma
    summed over the vocabulary one entry at a time, then the mean of the lowest k."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()  # [n, pos, vocab]
    out = []
    for w in range(len(windows)):
        z = []
        for t in range(windows.shape[1] - 1):
            p = torch.softmax(logits[w, t], -1).tolist()
            mu = sum(pi * math.log(pi) for pi in p)
            var = sum(pi * (math.log(pi) - mu) ** 2 for pi in p)
            z.append((math.log(p[int(windows[w, t + 1])]) - mu) / math.sqrt(var))
        lowest = sorted(z)[: max(1, int(len(z) * k))]
        out.append(sum(lowest) / len(lowest))
    return out


def test_min_k_plus_plus_matches_brute_force() -> None:
    model, windows = tiny_llama(seed=0), random_windows(3, 16, seed=5)
    stats = token_stats(model, windows, batch_size=2)
    assert stats["logp"].shape == (3, 15)
    got = window_scores(stats, ["x"] * 3, k=0.2)["mink++"]  # 3 lowest of 15 tokens
    assert got == pytest.approx(brute_force(model, windows, 0.2), rel=1e-5)
    assert window_scores(stats, ["x"] * 3, k=1.0)["mink++"] == pytest.approx(brute_force(model, windows, 1.0),
                                                                            rel=1e-5)


def test_scores_from_token_stats() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0, -6.0, -8.0]], dtype=torch.float64)
    stats = {"logp": logp, "mu": torch.full_like(logp, -2.0), "sigma": torch.full_like(logp, 2.0)}
    text = "abcabcabc"
    s = window_scores(stats, [text], k=0.4)
    assert s["loss"] == [-4.0]
    assert s["zlib"] == [pytest.approx(-4.0 / len(zlib.compress(text.encode())))]
    assert s["mink"] == [-7.0]  # the 2 lowest of 5
    assert s["mink++"] == [pytest.approx((-2.0 - 3.0) / 2)]


def test_batch_size_does_not_change_stats() -> None:
    model, windows = tiny_llama(seed=1), random_windows(5, 12, seed=2)
    a, b = token_stats(model, windows, batch_size=1), token_stats(model, windows, batch_size=4)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_overfitted_windows_are_told_apart() -> None:
    torch.manual_seed(0)
    model = tiny_llama(seed=0).train()
    seen, unseen = random_windows(4, 16, seed=10), random_windows(4, 16, seed=11)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=seen, labels=seen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = model(input_ids=unseen, labels=unseen).loss.item()
    r = membership(model.eval(), IdsTokenizer(), seen, unseen, batch_size=3)
    assert loss.item() < 0.5 * before  # the model did learn the seen windows
    assert min(r["auc"].values()) >= 0.9  # (0.62-0.75 before training)
    assert r["n_seen"] == 4 and r["n_unseen"] == 4 and set(r["auc"]) == {"loss", "zlib", "mink", "mink++"}
    assert r["mean_score"]["seen"]["loss"] > r["mean_score"]["unseen"]["loss"]


def test_k_must_be_a_fraction() -> None:
    with pytest.raises(SelpruneError, match="k=0"):
        membership(tiny_llama(seed=2), IdsTokenizer(), random_windows(2, 8), random_windows(2, 8, seed=1), k=0)
