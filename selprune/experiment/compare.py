"""Every method of a series side by side: baseline runs in their folders, and each
method's relearning under the one protocol (notebook 07).

A baseline run (a run kind with a `method`, `selprune.experiment.runs`) fine-tunes the
series' model with its gradient unlearning method (`selprune.experiment.baselines`)
into `run_dir/<run>/`, leaving step records like a pruning run's: record 0 is the
unmodified model, then one per checkpoint. The model is put back as it was afterwards,
from a snapshot of its weights (no second model in memory).

Relearning (`relearned`): the method's output goes through `relearning.relearn`, the
protocol notebook 06 runs on its arms, with the same relearning text, optimiser and
schedule, and recovery measured against the unmodified model. A pruning run is replayed
to its last step; a baseline is trained again (bit-identical on the same seed and device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.baselines import unlearn
from selprune.experiment.config import Config, stage_of
from selprune.experiment.loop import RERUN_SAFE
from selprune.experiment.relearning import relearn
from selprune.experiment.retrain import restored
from selprune.experiment.rundir import RunDir
from selprune.experiment.runs import RunKind, run_kind

BASELINE_STAGES = ("setup", "data", "unlearn")  # the parameters that define a baseline run's results
RELEARN_FILE = "relearn.json"  # a run's relearning record, in its folder
# (the model after the method[, its pruned-neuron masks]) -> the relearning record
After = Callable[..., dict[str, Any]]


def baseline_config(cfg: Config, kind: RunKind) -> dict[str, Any]:
    """What defines a baseline run (its config.json): the method and the parameters of
    the setup, data and unlearn stages."""
    out = {k: v for k, v in asdict(cfg).items() if stage_of(k) in BASELINE_STAGES and k not in RERUN_SAFE}
    return {**out, "run": kind.name, "method": kind.method}


def baseline_finished(records: list[dict[str, Any]], cfg: Config) -> bool:
    """Whether a baseline run is over: its last record is at `unlearn_steps`."""
    return bool(records) and records[-1].get("train_step") == cfg.unlearn_steps


def run_baseline(cfg: Config, run: str, run_dir: str | Path, model: nn.Module, data: Data, progress: bool = True,
                 after: After | None = None, base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the baseline `run` into `run_dir` (or read its finished records), and with
    `after` also its relearning record (`RELEARN_FILE`), computed on the trained model
    before it is put back. The model is left as it was. `base`: the unpruned model's
    metrics on `data` (record 0; see `baselines.unlearn`)."""
    kind = run_kind(run)
    if kind.method is None:
        raise SelpruneError(f"run {run!r} prunes neurons; it is no gradient unlearning baseline")
    rd = RunDir(run_dir)
    rd.lock(baseline_config(cfg, kind), file="config.json")
    records = rd.records()
    if baseline_finished(records, cfg) and (after is None or rd.has(RELEARN_FILE)):
        return records
    with restored(model):
        records = unlearn(model, data, cfg, kind.method, progress, base)
        rd.save_records(records)
        if after is not None:
            rd.write_json(RELEARN_FILE, after(model))
    return records


def reproduce_baseline(cfg: Config, run: str, model: nn.Module, data: Data, records: list[dict[str, Any]]) -> None:
    """Train `model` in place into the baseline `run`'s output again (its weights are not
    stored: the training is bit-for-bit reproducible on the same machine and threads), and
    check that the curve comes out as recorded; anything else refuses to go on."""
    again = unlearn(model, data, cfg, run_kind(run).method, progress=False)
    same = [(r["forget"], r["retain"]) for r in again] == [(r["forget"], r["retain"]) for r in records]
    if not same:
        raise SelpruneError(f"the baseline {run!r} trained again does not reproduce its records (another machine, "
                            "thread count or library version?); delete its folder and run it again")


def relearn_pruned(run_dir: str | Path, model: nn.Module, after: After) -> dict[str, Any]:
    """`after` on the pruning run in `run_dir` replayed to its last step (pruned neurons
    held as the protocol says); the record is also written there. The model is put back."""
    with restored(model):
        record = after(model, RunDir(run_dir).replay(model).masks)
    RunDir(run_dir).write_json(RELEARN_FILE, record)
    return record


def relearn_after(cfg: Config, small: Data, train: torch.Tensor, reference: dict[str, Any],
                  progress: bool = True) -> After:
    """The protocol on a method's output, in place (`masks`: the pruned neurons, if any):
    `small` holds the evaluation windows of the relearning curves, `reference` the
    unmodified model's metrics on them."""
    def run(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        return relearn(model, masks, small, cfg, train, reference, progress=progress)

    return run
