"""The token windows of an experiment (selprune/data.py): collection vs evaluation
windows, the seed's reach, skip sets, and data without skip sets."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import random_windows, tiny_model

from selprune.data import Data, prepare_data
from selprune.experiment.config import Config
from selprune.experiment.loop import run_pruning
from selprune.texts import top_tokens


def _prepare(tok, seed: int = 0, **kw) -> Data:
    args = {"forget": "code", "retain": "prose", "window": 128, "collect_tokens": 512, "eval_tokens": 512,
            "skip_k": 50, "seed": seed, **kw}
    return prepare_data(tok, **args)


def test_seed_orders_collection_windows_not_evaluation_windows(smollm_tokenizer) -> None:
    a, b = _prepare(smollm_tokenizer), _prepare(smollm_tokenizer, seed=1)
    assert torch.equal(a.forget_test, b.forget_test) and torch.equal(a.retain_test, b.retain_test)
    assert not torch.equal(a.forget_train, b.forget_train) and not torch.equal(a.retain_train, b.retain_train)


def test_windows_have_the_asked_shape_and_skip_sets(smollm_tokenizer) -> None:
    d = _prepare(smollm_tokenizer, window=64, collect_tokens=256, eval_tokens=128, skip_k=5)
    assert d.forget_train.shape == d.retain_train.shape == (4, 64)
    assert d.forget_test.shape == d.retain_test.shape == (2, 64)
    assert torch.equal(d.skip["forget"], top_tokens(d.forget_train, 5))  # from the collection windows
    assert torch.equal(d.skip["retain"], top_tokens(d.retain_train, 5))
    assert not torch.equal(d.forget_train, d.retain_train)


def test_with_eval_windows_keeps_the_first_test_windows() -> None:
    w = [random_windows(4, 8, seed=s) for s in range(4)]
    d = Data(*w, skip={"forget": torch.tensor([3])})
    short = d.with_eval_windows(2)
    assert torch.equal(short.forget_train, w[0]) and torch.equal(short.retain_train, w[1])
    assert torch.equal(short.forget_test, w[2][:2]) and torch.equal(short.retain_test, w[3][:2])
    assert short.skip is d.skip


def test_data_without_skip_sets(tmp_path: Path) -> None:
    """A hand-made Data without skip sets runs through the loop: the skip metrics equal the plain ones."""
    w = [random_windows(2, 16, seed=s) for s in range(4)]
    cfg = Config(ff_frac=0.1, attn_frac=0.05, steps=1, window=16, collect_tokens=32, eval_tokens=32, batch_size=2,
                 skip_k=5, retrain_window=16)
    records, _ = run_pruning(cfg, "both", tmp_path, tiny_model("llama"), None, Data(*w), progress=False)
    assert len(records) == 2
    for r in records:
        for side in ("forget", "retain"):
            assert r[side]["top1_skip"] == r[side]["top1"] and r[side]["tokens_skip"] == r[side]["tokens"]
            assert r[side]["top10_skip"] == r[side]["top10"]
