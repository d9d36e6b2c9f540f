"""Evaluation metrics against a direct per-token computation on a tiny model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import random_windows, tiny_model  # noqa: E402

from selprune.evaluate import METRICS, evaluate  # noqa: E402


def direct_metrics(model, windows: torch.Tensor, skip: set[int]) -> dict[str, float]:
    """Per target, in float64, by ranks: top-k hit iff fewer than k logits beat the target's."""
    with torch.no_grad():
        lg = model(input_ids=windows).logits.double()
    hits1, hits10, ces, kept1, kept10 = [], [], [], [], []
    for b in range(windows.shape[0]):
        for p in range(windows.shape[1] - 1):
            row, t = lg[b, p], int(windows[b, p + 1])
            rank = int((row > row[t]).sum())
            ce = float(torch.logsumexp(row, 0) - row[t])
            hits1.append(rank < 1)
            hits10.append(rank < 10)
            ces.append(ce)
            if t not in skip:
                kept1.append(rank < 1)
                kept10.append(rank < 10)
    n = len(ces)
    loss = sum(ces) / n
    return {
        "top1": sum(hits1) / n, "top10": sum(hits10) / n,
        "top1_skip": sum(kept1) / max(len(kept1), 1), "top10_skip": sum(kept10) / max(len(kept10), 1),
        "loss": loss, "perplexity": math.exp(loss), "tokens": n, "tokens_skip": len(kept1),
    }


@pytest.fixture(scope="module")
def model():
    # a small vocabulary (40) so that top-1 and top-10 hits happen often enough to be tested
    return tiny_model("llama", seed=3, vocab_size=40, std=0.5)


@pytest.fixture(scope="module")
def windows():
    w = random_windows(5, 14, seed=9, vocab=40)
    w[:, 1::2] = w[:, 0::2][:, : w[:, 1::2].shape[1]]  # some repetition: a little predictable
    return w


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_metrics_equal_direct_computation(model, windows, batch_size: int) -> None:
    skip_ids = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23])
    got = evaluate(model, windows, skip_ids, batch_size=batch_size, progress=False)
    want = direct_metrics(model, windows, set(skip_ids.tolist()))
    assert set(METRICS) <= set(got)
    assert got["tokens"] == want["tokens"] == 5 * 13
    assert got["tokens_skip"] == want["tokens_skip"]
    assert 0 < want["tokens_skip"] < want["tokens"]  # the skip set does matter here
    for m in ("top1", "top10", "top1_skip", "top10_skip"):
        assert got[m] == pytest.approx(want[m], abs=1e-12), m
    assert 0 < want["top10"] < 1 and want["top1"] > 0
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_perplexity_is_exp_of_mean_loss(model, windows) -> None:
    got = evaluate(model, windows, progress=False)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    # and not the mean of per-token exponentials (which is larger: Jensen)
    with torch.no_grad():
        lg = model(input_ids=windows).logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
    assert got["perplexity"] < float(ce.exp().mean()) - 1e-6


def test_skip_excludes_targets_and_budget_counts_all(model, windows) -> None:
    plain = evaluate(model, windows, progress=False)
    assert plain["top1_skip"] == plain["top1"] and plain["tokens_skip"] == plain["tokens"]
    # skipping every target that the model gets right: skip top-1 must be 0
    with torch.no_grad():
        pred = model(input_ids=windows).logits[:, :-1].argmax(-1)
    target = windows[:, 1:]
    right = target[pred == target].unique()
    assert right.numel() > 0
    skipped = evaluate(model, windows, right, progress=False)
    assert skipped["top1_skip"] == 0.0
    assert skipped["tokens"] == plain["tokens"] == target.numel()  # budget: every target
    assert skipped["tokens_skip"] == int((~torch.isin(target, right)).sum())
    for m in ("top1", "top10", "loss"):
        assert skipped[m] == plain[m]  # skip ids change only the skip metrics


def test_evaluation_in_eval_mode_even_for_a_training_model() -> None:
    model = tiny_model("opt", vocab_size=40)
    assert model.config.dropout > 0
    w = random_windows(3, 12, vocab=40)
    ref = evaluate(model, w, progress=False)
    model.train()
    torch.manual_seed(0)
    got = evaluate(model, w, progress=False)
    assert model.training
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_vocabulary_smaller_than_ten() -> None:
    model = tiny_model("gpt2", vocab_size=6)
    w = random_windows(2, 9, vocab=6, low=0)
    got = evaluate(model, w, progress=False)
    assert got["top10"] == 1.0  # every target is within the top 10 of 6 tokens
    assert got["top1"] == pytest.approx(direct_metrics(model, w, set())["top1"])
