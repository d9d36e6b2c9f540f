"""The relearning experiment: retrain the pruned model and its controls, and index them.

Three arms see identical data, optimiser and schedule (`selprune.experiment.retrain`):
the unpruned model (how fast fine-tuning alone moves forget accuracy), the selectively
pruned one, and a randomly pruned one with matched retain damage
(`anamnesia.match_random_step`). Each arm's curve is indexed by `anamnesia.anamnesia_index`
(docs/method.md, "Retraining and the anamnesia index").
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from selprune.anamnesia import anamnesia_index, match_random_step, record_at
from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.config import Config
from selprune.experiment.retrain import Masks, retrain
from selprune.experiment.rundir import RunDir
from selprune.prune import Pruner
from selprune.selectivity import record_drop
from selprune.sites import find_sites

ARMS = ("unpruned", "selective", "random")
ANAMNESIA_SELECTIVE = ("ff", "attn", "attn_heads")  # the selective arm: the first of these a series has done
# prunes the given (unpruned) model in place to the state after `step` of a pruning run
Builder = Callable[[nn.Module, int], Masks]
RELEARN_FIELDS = ("retrain_steps", "retrain_lr", "retrain_batch", "retrain_window", "retrain_eval_tokens",
                  "retrain_mode", "retrain_hold_pruned", "lora_r", "lora_alpha", "seed", "batch_size")


def anamnesia_experiment(model: nn.Module, data: Data, cfg: Config, selective_records: list[dict[str, Any]],
                         random_records: list[dict[str, Any]], build_selective: Builder, build_random: Builder,
                         selective_step: int | None = None, fractions: Sequence[float] = (0.5, 0.9),
                         progress: bool = True) -> dict[str, Any]:
    """Retrain three arms with identical data, optimiser and schedule, and index them.

    - `unpruned`: `model` itself (how fast fine-tuning alone moves forget accuracy);
    - `selective`: `build_selective(copy, selective_step)` (default: the run's last step);
    - `random`: `build_random(copy, k)`, k = `match_random_step(...)`: random pruning with
      the retain top-1 damage closest to the selective model's.

    `model` must be **unpruned** (e.g. after `pruner.restore()`); it is not modified: each
    arm trains its own `copy.deepcopy` (memory: one extra model plus optimizer state at a
    time). A builder prunes the copy it is given in place to a pruning run's state after
    `step`, and returns the pruned-neuron masks (`replay_builder(run_dir)` makes one from a
    run directory). Each arm's index uses the unpruned arm's step-0 forget top-1 as base
    and its own step-0 forget top-1 as pruned. Returns a JSON-ready dict:
    `{config, fractions, base, matching, arms: {name: {pruned_step, curve, index,
    recovery_auc, ...}}}`.
    """
    sel_step = record_at(selective_records, selective_step)["step"]
    rand_step = match_random_step(selective_records, random_records, sel_step)
    plan: dict[str, tuple[Builder | None, int | None]] = {
        "unpruned": (None, None), "selective": (build_selective, sel_step), "random": (build_random, rand_step)}
    arms: dict[str, dict[str, Any]] = {}
    for name, (build, step) in plan.items():
        t0 = time.perf_counter()
        arm_model = copy.deepcopy(model)
        masks = None if build is None else build(arm_model, step)
        if isinstance(masks, Pruner):  # tolerate builders that return the pruner
            masks = masks.masks
        sites = find_sites(arm_model)
        curve = retrain(arm_model, masks, sites, data, cfg, progress)
        del arm_model
        arms[name] = {"pruned_step": step, "curve": curve,
                      "pruned_fraction": {k: float(m.float().mean()) for k, m in (masks or {}).items()},
                      "seconds": time.perf_counter() - t0}
    base = arms["unpruned"]["curve"][0]
    for arm in arms.values():
        _index_arm(arm, base, fractions)
    sel_rec, rand_rec = record_at(selective_records, sel_step), record_at(random_records, rand_step)
    return {
        "config": {k: getattr(cfg, k) for k in RELEARN_FIELDS},
        "fractions": list(fractions),
        "base": {"forget": base["forget"], "retain": base["retain"]},
        "matching": {"selective_step": sel_step, "random_step": rand_step,
                     "selective_retain_drop": record_drop(sel_rec, selective_records[0], "retain"),
                     "random_retain_drop": record_drop(rand_rec, random_records[0], "retain"),
                     "rule": "random step with the closest relative retain top-1 drop (pruning records)"},
        "arms": arms,
    }


def _index_arm(arm: dict[str, Any], base: dict[str, Any], fractions: Sequence[float]) -> None:
    """Add the anamnesia index of one arm's curve, against the unpruned arm's start `base`."""
    start = arm["curve"][0]
    idx = anamnesia_index(arm["curve"], base["forget"]["top1"], start["forget"]["top1"], fractions)
    arm.update(index=idx["thresholds"], recovery_auc=idx["recovery_auc"], note=idx["note"], removed_top1=idx["removed"],
               retain_drop=record_drop(start, base, "retain"), forget_drop=record_drop(start, base, "forget"))


def replay_builder(run_dir: str | Path) -> Builder:
    """A builder for `anamnesia_experiment` that replays the pruning run in `run_dir`."""
    return lambda model, step: RunDir(run_dir).replay(model, step).masks


def anamnesia_from_runs(
    model: nn.Module,
    data: Data,
    cfg: Config,
    selective_dir: str | Path,
    random_dir: str | Path,
    selective_step: int | None = None,
    fractions: Sequence[float] = (0.5, 0.9),
    progress: bool = True,
) -> dict[str, Any]:
    """`anamnesia_experiment` on two finished pruning run directories (e.g. `ff/` and
    `random/` of a series): their records pick the steps, replay rebuilds them.
    `model` must be the unpruned model the runs started from."""
    recs = {}
    for name, d in (("selective", selective_dir), ("random", random_dir)):
        recs[name] = RunDir(d).records()
        if not recs[name]:
            raise SelpruneError(f"the {name} run in {d} has no records; run the pruning first")
    return anamnesia_experiment(model, data, cfg, recs["selective"], recs["random"], replay_builder(selective_dir),
                                replay_builder(random_dir), selective_step, fractions, progress)
