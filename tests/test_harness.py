"""The lm-evaluation-harness bridge (selprune/harness.py), offline: a tiny random-init model
held in memory, the embedded tokenizer, the shipped tasks. lm-eval's accuracies must equal a
brute-force count of the same choices scored by summed log-likelihood."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from tiny_models import tiny_model

from selprune import harness
from selprune.errors import SelpruneError
from selprune.paths import data_dir

pytest.importorskip("lm_eval")
LIMIT = 3


@pytest.fixture(scope="module")
def model(smollm_tokenizer):
    return tiny_model("llama", seed=1, vocab_size=len(smollm_tokenizer), max_position_embeddings=512)


def _loglik(model, tok, context: str, choice: str) -> float:
    """Summed log-probability of `choice` after `context`, split as lm-eval splits a pair
    (trailing whitespace of the context moves to the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, choice = context[:-n], context[-n:] + choice
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)[0]  # [pos, vocab]
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _brute_acc(model, tok, task: str) -> tuple[float, float]:
    name = task.removeprefix("selprune_")
    items = [json.loads(x) for x in (data_dir() / "lm_eval" / f"{name}.jsonl").read_text().splitlines()][:LIMIT]
    acc = norm = 0
    for it in items:
        ll = [_loglik(model, tok, it["context"], c) for c in it["choices"]]
        acc += max(range(4), key=lambda k: ll[k]) == it["label"]
        norm += max(range(4), key=lambda k: ll[k] / len(it["choices"][k].encode())) == it["label"]
    return acc / len(items), norm / len(items)


def test_shipped_tasks_match_a_brute_force_count_and_repeat(model, smollm_tokenizer) -> None:
    out = harness.run_tasks(model, smollm_tokenizer, ",".join(harness.LOCAL_TASKS), limit=LIMIT, batch_size=2)
    assert set(out["tasks"]) == set(harness.LOCAL_TASKS) and out["limit"] == LIMIT
    for task, got in out["tasks"].items():
        assert got["samples"] == LIMIT
        assert (got["acc"], got["acc_norm"]) == pytest.approx(_brute_acc(model, smollm_tokenizer, task))
        assert 0 <= got["acc_stderr"] <= 1
    again = harness.run_tasks(model, smollm_tokenizer, list(harness.LOCAL_TASKS), limit=LIMIT, batch_size=3)
    assert again["tasks"] == out["tasks"]  # and the batch size changes nothing
    assert not model.training


def test_the_model_is_evaluated_as_it_is_in_memory(model, smollm_tokenizer) -> None:
    """A pruned model is passed as an object: a hook on it (what a pruning mask or a
    baseline's weights change) changes what lm-eval measures, with no save and reload."""
    task = harness.LOCAL_TASKS[0]
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: out * 0 + 5.0)
    try:
        got = harness.run_tasks(model, smollm_tokenizer, task, limit=LIMIT)["tasks"][task]
        want = _brute_acc(model, smollm_tokenizer, task)
    finally:
        handle.remove()
    assert (got["acc"], got["acc_norm"]) == pytest.approx(want)


def test_bad_requests_are_refused_before_any_work(model, smollm_tokenizer, monkeypatch, tmp_path) -> None:
    with pytest.raises(SelpruneError, match="no lm-eval task"):
        harness.run_tasks(model, smollm_tokenizer, " , ")
    with pytest.raises(SelpruneError, match="limit"):
        harness.run_tasks(model, smollm_tokenizer, harness.LOCAL_TASKS[0], limit=0)
    monkeypatch.setenv("SELPRUNE_DATA", str(tmp_path))
    with pytest.raises(SelpruneError, match="build_lm_eval_tasks"):
        harness.run_tasks(model, smollm_tokenizer, harness.LOCAL_TASKS[0])
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(SelpruneError, match="pip install lm-eval"):
        harness.run_tasks(model, smollm_tokenizer, "hellaswag")
