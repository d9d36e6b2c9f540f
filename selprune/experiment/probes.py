"""The probes beyond next-token accuracy, as one call for the series: the code probe,
membership inference on the forget windows and, only when asked with its opt-in, HumanEval.

`extra_metrics` runs on whatever model it is given (the series calls it on the unpruned
model and on the last step of its runs) and returns a JSON-ready dict; each part's wall
time is under its "seconds" key, which results.json moves into timings.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune import code_probe, harness, humaneval, membership
from selprune.data import Data
from selprune.masked import require_causal
from selprune.texts import load_texts


def _timed(fn: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return {**out, "seconds": time.perf_counter() - start}


def extra_metrics(model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: Data, *, code_dataset: str = "code",
                  code_prompts: int = code_probe.N_PROMPTS, code_tokens: int = code_probe.NEW_TOKENS,
                  membership_k: float = membership.K, humaneval_execute: bool = False,
                  humaneval_limit: int | None = 20, humaneval_network: bool = False, batch_size: int = 8,
                  lm_eval_tasks: str = "", lm_eval_limit: int | None = 50) -> dict:
    """{"code_probe": ..., "membership": ..., "lm_eval": ..., "humaneval": ...} of `model`.

    - code_probe: on the function headers of `code_dataset`'s test split (the series
      passes its forget set; a set without headers gives fraction None), `code_prompts`
      prompts of `code_tokens` greedy tokens (`selprune.code_probe`);
    - membership: AUCs of `data.forget_train` (the windows a method saw) against
      `data.forget_test` (`selprune.membership`), Min-K% at `membership_k`;
    - lm_eval: accuracies on `lm_eval_tasks` (comma-separated; `selprune.harness`),
      `lm_eval_limit` documents each; {"skipped": why} when none are named;
    - humaneval: pass@1 on the first `humaneval_limit` problems, run only with
      `humaneval_execute=True` (it executes model-written code, `selprune.humaneval`);
      otherwise {"skipped": why}. `humaneval_network=True` accepts running it on a
      system that cannot cut the programs off the network.
    """
    require_causal(model, "the probes (generation and next-token likelihoods)")
    out: dict[str, Any] = {}
    texts = _documents(load_texts(code_dataset, "test"))  # read only as far as the prompts need
    out["code_probe"] = _timed(code_probe.code_probe, model, tokenizer, texts, code_prompts,
                               code_tokens, batch_size)
    out["membership"] = _timed(membership.membership, model, tokenizer, data.forget_train, data.forget_test,
                               membership_k, batch_size)
    if harness.parse_tasks(lm_eval_tasks):
        out["lm_eval"] = _timed(harness.run_tasks, model, tokenizer, lm_eval_tasks, lm_eval_limit, batch_size)
    else:
        out["lm_eval"] = {"skipped": "no lm-eval task named; set lm_eval_tasks (e.g. selprune_code_next_line)"}
    if humaneval_execute:
        out["humaneval"] = _timed(humaneval.pass_at_1, model, tokenizer, allow_execution=True,
                                  allow_network=humaneval_network, limit=humaneval_limit, batch_size=batch_size)
    else:
        out["humaneval"] = {"skipped": "runs model-written code; set humaneval_execute=true to run it"}
    return out


def _documents(texts: Iterable[Any]) -> Iterator[str]:
    """The documents' strings, lazily, from a datasets object (rows of {"text": ...}) or strings."""
    for row in texts:
        yield row["text"] if isinstance(row, dict) else row
