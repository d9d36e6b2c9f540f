"""lm-evaluation-harness on a model held in memory: benchmark accuracy of any model selprune
has (unpruned, after a pruning step, an exported `pruned-model/`, a baseline's output).

The model goes to lm-eval's Hugging Face wrapper as an object (`HFLM(pretrained=model)`), so
a pruned model is evaluated as it is, hooks and masks included, without a save and reload.

Tasks are named two ways:
- the offline tasks shipped in `data/lm_eval/` (`LOCAL_TASKS`): multiple-choice cloze built
  from the bundled corpora's test splits by `data/build_lm_eval_tasks.py`; their YAML is
  read here and its `data_files` pointed at that folder, then handed to lm-eval as a dict;
- any task name lm-eval knows (hellaswag, arc_easy, piqa, mmlu, wmdp_cyber, ...): these
  download their data from the hub, so they need a network.

lm-eval is an optional dependency (`pip install lm-eval`, in selprune's `dev` and `harness`
extras); a missing install is a clear error, raised before any work.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune.errors import SelpruneError
from selprune.paths import data_dir

LOCAL_TASKS = ("selprune_code_next_line", "selprune_prose_next_sentence")
HUB_TASKS = ("hellaswag", "arc_easy", "piqa", "mmlu", "wmdp_cyber")  # documented; need a network
METRICS = ("acc", "acc_norm")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SelpruneError("lm-eval tasks need lm-evaluation-harness: pip install lm-eval "
                            "(or selprune's extra: pip install 'selprune[harness]')") from e
    return lm_eval, HFLM, TaskManager


def local_task(name: str) -> dict[str, Any]:
    """The lm-eval config of a shipped task, its data file given by absolute path."""
    folder = data_dir() / "lm_eval"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise SelpruneError(f"shipped lm-eval task {name!r} has no definition at {path}; "
                            "rebuild the tasks with `python data/build_lm_eval_tasks.py`")
    cfg = yaml.safe_load(path.read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    for split, rel in files.items():
        data = folder / rel
        if not data.is_file():
            raise SelpruneError(f"shipped lm-eval task {name!r}: its data file {data} is missing; "
                                "rebuild with `python data/build_lm_eval_tasks.py`")
        files[split] = str(data)
    return cfg


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a sequence; empty entries dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t.strip() for t in names if t and t.strip()]


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """lm-eval logs every request batch at INFO and WARNING; keep that out of notebooks."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    try:
        if on:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_tasks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: str | Sequence[str],
              limit: int | None = None, batch_size: int = 8, num_fewshot: int = 0, seed: int = 0,
              quiet: bool = True) -> dict[str, Any]:
    """{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}}, ...}
    of `model` on lm-eval `tasks`, `limit` documents each (None: all), zero-shot by default.

    Deterministic for a seed: lm-eval's own seeds (python, numpy, torch, few-shot) are all set
    to `seed`. The model is evaluated in eval mode and left in the mode it was in."""
    names = parse_tasks(tasks)
    if not names:
        raise SelpruneError("no lm-eval task given: name shipped tasks "
                            f"({', '.join(LOCAL_TASKS)}) or lm-eval's own (e.g. {', '.join(HUB_TASKS)})")
    if limit is not None and limit < 1:
        raise SelpruneError(f"lm-eval limit must be a positive number of documents or None (all); got {limit}")
    lm_eval, HFLM, TaskManager = _lm_eval()
    specs = [local_task(n) if n in LOCAL_TASKS else n for n in names]  # local ones checked before any work
    was_training = model.training
    try:
        with _quiet(quiet), torch.inference_mode():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=TaskManager(), log_samples=False,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed, verbosity="ERROR")
    finally:
        model.train(was_training)
    return {"tasks": {name: _metrics(out, name) for name in names}, "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}


def _metrics(out: dict[str, Any], name: str) -> dict[str, Any]:
    """One task's accuracies from lm-eval's results ("acc,none" -> "acc"), and its sample count."""
    res = out["results"].get(name)
    if res is None:  # a group task (mmlu): its aggregate sits under the group's name, else nothing to report
        raise SelpruneError(f"lm-eval returned no result for task {name!r}")
    got: dict[str, Any] = {}
    for key, value in res.items():
        metric, _, _filter = key.partition(",")
        base = metric.removesuffix("_stderr")
        if base in METRICS and isinstance(value, int | float):
            got[metric] = float(value)
    samples = out.get("n-samples", {}).get(name, {})
    got["samples"] = samples.get("effective")
    return got
