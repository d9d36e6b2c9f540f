"""extra_metrics: the probes as one JSON-ready dict with each part's seconds, HumanEval
skipped without its opt-in and run with it, reproducible on the CPU in fp32."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import small_datasets  # (importing it sets torch to one thread)

from selprune.data import Data
from selprune.experiment.probes import extra_metrics
from selprune.experiment.results import split_timings


def _data(vocab: int) -> Data:
    g = torch.Generator().manual_seed(0)
    return Data(*(torch.randint(3, vocab, (3, 16), generator=g) for _ in range(4)))


def _without_seconds(out: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "seconds"} for k, v in out.items()}


def test_extra_metrics_without_humaneval(tmp_path, tiny_llama, smollm_tokenizer) -> None:
    code = str(small_datasets(tmp_path) / "code")
    model = tiny_llama(seed=0)
    kw = dict(code_dataset=code, code_prompts=3, code_tokens=8, batch_size=2)
    out = extra_metrics(model, smollm_tokenizer, _data(len(smollm_tokenizer)), **kw)
    assert set(out) == {"code_probe", "membership", "lm_eval", "humaneval"}
    assert "lm_eval_tasks" in out["lm_eval"]["skipped"]  # none named: nothing run
    assert out["code_probe"]["n"] == 3 and 0 <= out["code_probe"]["fraction"] <= 1
    assert set(out["membership"]["auc"]) == {"loss", "zlib", "mink", "mink++"}
    assert "humaneval_execute=true" in out["humaneval"]["skipped"]
    assert out["code_probe"]["seconds"] > 0 and out["membership"]["seconds"] > 0
    json.dumps(out)  # JSON-ready
    again = extra_metrics(model, smollm_tokenizer, _data(len(smollm_tokenizer)), **kw)
    assert _without_seconds(again) == _without_seconds(out)


def test_seconds_move_to_timings(tmp_path, tiny_llama, smollm_tokenizer) -> None:
    out = extra_metrics(tiny_llama(seed=0), smollm_tokenizer, _data(len(smollm_tokenizer)),
                        code_dataset=str(small_datasets(tmp_path) / "code"), code_prompts=2, code_tokens=4)
    results, timings = split_timings({"probes": out})
    assert timings["/probes/code_probe"] > 0 and timings["/probes/membership"] > 0
    assert "seconds" not in results["probes"]["code_probe"] and "seconds" not in results["probes"]["membership"]


def test_humaneval_runs_with_the_opt_in(tmp_path, tiny_llama, smollm_tokenizer) -> None:
    out = extra_metrics(tiny_llama(seed=0), smollm_tokenizer, _data(len(smollm_tokenizer)),
                        code_dataset=str(small_datasets(tmp_path) / "code"), code_prompts=2, code_tokens=4,
                        humaneval_execute=True, humaneval_limit=2)
    he = out["humaneval"]
    assert he["n"] == 2 and he["pass_at_1"] == 0.0  # a random tiny model solves nothing
    assert set(he["status"]) == {"HumanEval/0", "HumanEval/1"} and he["seconds"] > 0


def test_lm_eval_tasks_join_the_probes(tmp_path, tiny_llama, smollm_tokenizer) -> None:
    pytest.importorskip("lm_eval")
    out = extra_metrics(tiny_llama(seed=0, max_position_embeddings=512), smollm_tokenizer,
                        _data(len(smollm_tokenizer)), code_dataset=str(small_datasets(tmp_path) / "code"),
                        code_prompts=2, code_tokens=4, lm_eval_tasks="selprune_prose_next_sentence", lm_eval_limit=2)
    task = out["lm_eval"]["tasks"]["selprune_prose_next_sentence"]
    assert task["samples"] == 2 and 0 <= task["acc"] <= 1 and out["lm_eval"]["seconds"] > 0
