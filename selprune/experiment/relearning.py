"""The relearning protocol: does a removed capability come back when the model is fine-tuned?

`relearn` is the protocol on one model, any model (a pruned one, a baseline method's
output, the unpruned control): fine-tune it on the relearning text with the schema's
`retrain_*` settings, evaluate forget and retain along the way, and return one record
(curve, anamnesia index or its censored bound, recovery AUC, worst case). The
experiment (`anamnesia_experiment`) runs it on three arms with identical data,
optimiser and schedule: the unpruned model (the control: fine-tuning alone must not
move it), the selectively pruned one, and a randomly pruned one with matched retain
damage (`anamnesia.match_random_step`). `control_check` says whether the control held
(docs/method.md, "Retraining and the anamnesia index").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune.anamnesia import anamnesia_index, match_random_step, record_at, worst_case
from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.evaluate import evaluate_both
from selprune.experiment.config import Config
from selprune.experiment.retrain import Masks, restored, retrain
from selprune.experiment.rundir import RunDir
from selprune.prune import Pruner
from selprune.selectivity import record_drop
from selprune.sites import find_sites
from selprune.texts import adds_bos, load_texts, token_windows

ARMS = ("unpruned", "selective", "random")
ANAMNESIA_SELECTIVE = ("ff", "attn", "attn_heads")  # the selective arm: the first of these a series has done
CONTROL_TOLERANCE = 0.02  # the control holds if forget top-1 falls by at most this and retain moves by at most this
# prunes the given (unpruned) model in place to the state after `step` of a pruning run
Builder = Callable[[nn.Module, int], Masks]
RELEARN_FIELDS = ("retrain_steps", "retrain_lr", "retrain_batch", "retrain_window", "retrain_tokens", "retrain_eval_tokens",
                  "retrain_mode", "retrain_hold_pruned", "retrain_data", "lora_r", "lora_alpha", "seed", "batch_size")


# ------------------------------------------------------------------ what it relearns from
def _text_windows(cfg: Config, tokenizer: PreTrainedTokenizerBase, dataset: str, after: int = 0) -> torch.Tensor:
    # a dataset with less train text than retrain_tokens gives what it has (the steps then cycle it)
    return token_windows(load_texts(dataset, "train"), tokenizer, cfg.retrain_window, cfg.retrain_tokens,
                         seed=cfg.seed, after_windows=after, strict=False)


def _seen_forget(cfg: Config, tokenizer: PreTrainedTokenizerBase, data: Data) -> torch.Tensor:
    # forget-train text in the collection's document order: it starts with the text pruning saw
    return _text_windows(cfg, tokenizer, cfg.forget)


def _unseen_forget(cfg: Config, tokenizer: PreTrainedTokenizerBase, data: Data) -> torch.Tensor:
    # forget-train documents the collection never touched: skip as many relearning windows
    # as hold the collection's text, and the document where they end
    bos = 1 if adds_bos(tokenizer) else 0
    seen = len(data.forget_train) * (data.forget_train.shape[1] - bos)  # text tokens the collection used
    return _text_windows(cfg, tokenizer, cfg.forget, after=-(-seen // (cfg.retrain_window - bos)))


def _retain_only(cfg: Config, tokenizer: PreTrainedTokenizerBase, data: Data) -> torch.Tensor:
    return _text_windows(cfg, tokenizer, cfg.retain)  # ordinary fine-tuning: does the capability come back?


RELEARN_DATA: dict[str, Callable[[Config, PreTrainedTokenizerBase, Data], torch.Tensor]] = {
    "forget": _seen_forget, "forget-unseen": _unseen_forget, "retain": _retain_only}


def relearn_windows(cfg: Config, tokenizer: PreTrainedTokenizerBase, data: Data) -> torch.Tensor:
    """The windows `cfg.retrain_data` names (`RELEARN_DATA`): `[n, window]`."""
    return RELEARN_DATA[cfg.retrain_data](cfg, tokenizer, data)


# ------------------------------------------------------------------------- one model
def relearn(model: nn.Module, masks: Masks | None, data: Data, cfg: Config, train: torch.Tensor,
            reference: dict[str, Any] | None = None, fractions: Sequence[float] = (0.5, 0.9),
            progress: bool = True) -> dict[str, Any]:
    """The protocol on one model, **in place**: fine-tune on `train`, index the curve.

    `masks`: the pruned neurons, held at zero if `retrain_hold_pruned` (None: nothing is
    pruned). `reference`: the unpruned model's starting metrics `{forget, retain}`, what
    recovery is measured against (None: this model's own start, for the control). The
    record: `curve`, `index` (per fraction: steps and tokens, or the censored bound),
    `recovery_auc`, `worst_case`, the start's damage against the reference, and seconds."""
    t0 = time.perf_counter()
    curve = retrain(model, masks, find_sites(model) if masks else None, data, cfg, progress, train=train)
    start = curve[0]
    reference = reference or {"forget": start["forget"], "retain": start["retain"]}
    base, pruned = reference["forget"]["top1"], start["forget"]["top1"]
    idx = anamnesia_index(curve, base, pruned, fractions)
    return {"curve": curve, "index": idx["thresholds"], "recovery_auc": idx["recovery_auc"], "note": idx["note"],
            "removed_top1": idx["removed"], "worst_case": worst_case(curve, base, pruned),
            "retain_drop": record_drop(start, reference, "retain"), "forget_drop": record_drop(start, reference, "forget"),
            "pruned_fraction": {k: float(m.float().mean()) for k, m in (masks or {}).items()},
            "seconds": time.perf_counter() - t0}


def control_check(curve: list[dict[str, Any]], tolerance: float = CONTROL_TOLERANCE) -> dict[str, Any]:
    """Whether the unpruned control held while fine-tuned: forget top-1 ended at most
    `tolerance` below its start (rising is fine) and retain top-1 within `tolerance`.
    A control that degrades means the curves measure fine-tuning damage, not relearning."""
    first, last = curve[0], curve[-1]
    change = {side: last[side]["top1"] - first[side]["top1"] for side in ("forget", "retain")}
    return {"forget_start": first["forget"]["top1"], "forget_end": last["forget"]["top1"],
            "retain_start": first["retain"]["top1"], "retain_end": last["retain"]["top1"],
            "forget_change": change["forget"], "retain_change": change["retain"], "tolerance": tolerance,
            "holds": change["forget"] >= -tolerance and abs(change["retain"]) <= tolerance}


# ----------------------------------------------------------------------- the experiment
def anamnesia_experiment(model: nn.Module, data: Data, cfg: Config, selective_records: list[dict[str, Any]],
                         random_records: list[dict[str, Any]], build_selective: Builder, build_random: Builder,
                         train: torch.Tensor, selective_step: int | None = None,
                         fractions: Sequence[float] = (0.5, 0.9), progress: bool = True,
                         arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """Relearn three arms (or the `arms` named) with identical data, optimiser and
    schedule, and index them.

    - `unpruned`: `model` itself (the control);
    - `selective`: `build_selective(copy, selective_step)` (default: the run's last step);
    - `random`: `build_random(copy, k)`, k = `match_random_step(...)`: random pruning with
      the retain top-1 damage closest to the selective model's.

    `model` must be **unpruned** (e.g. after `pruner.restore()`); it is left as it was:
    each arm prunes and trains the model itself, which is then put back from a snapshot of
    its weights (`retrain.restored`; memory: one copy of the weights plus the optimizer
    state, no second model). A builder prunes the copy it is given in place to a pruning run's state after
    `step`, and returns the pruned-neuron masks (`replay_builder(run_dir)` makes one).
    Without the unpruned arm, the reference is the unpruned model's evaluation and
    `control` is None. Returns a JSON-ready dict: `{config, fractions, base, matching,
    control, arms}`."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise SelpruneError(f"arms {list(arms)}: choose among {', '.join(ARMS)}")
    sel_step = record_at(selective_records, selective_step)["step"]
    rand_step = match_random_step(selective_records, random_records, sel_step)
    plan: dict[str, tuple[Builder | None, int | None]] = {
        "unpruned": (None, None), "selective": (build_selective, sel_step), "random": (build_random, rand_step)}
    out: dict[str, dict[str, Any]] = {}
    reference = None if "unpruned" in arms else evaluate_both(model, data, cfg.batch_size, progress)
    for name, (build, step) in ((n, plan[n]) for n in ARMS if n in arms):
        with restored(model):  # each arm trains the model itself, put back from one weight snapshot
            masks = None if build is None else build(model, step)
            if isinstance(masks, Pruner):  # tolerate builders that return the pruner
                masks = masks.masks
            out[name] = {"pruned_step": step, **relearn(model, masks, data, cfg, train, reference, fractions, progress)}
        reference = reference or {side: out[name]["curve"][0][side] for side in ("forget", "retain")}
    sel_rec, rand_rec = record_at(selective_records, sel_step), record_at(random_records, rand_step)
    return {
        "config": {k: getattr(cfg, k) for k in RELEARN_FIELDS},
        "fractions": list(fractions),
        "base": reference,
        "control": control_check(out["unpruned"]["curve"]) if "unpruned" in out else None,
        "matching": {"selective_step": sel_step, "random_step": rand_step,
                     "selective_retain_drop": record_drop(sel_rec, selective_records[0], "retain"),
                     "random_retain_drop": record_drop(rand_rec, random_records[0], "retain"),
                     "rule": "random step with the closest relative retain top-1 drop (pruning records)"},
        "arms": out,
    }


def replay_builder(run_dir: str | Path) -> Builder:
    """A builder for `anamnesia_experiment` that replays the pruning run in `run_dir`."""
    return lambda model, step: RunDir(run_dir).replay(model, step).masks


def anamnesia_from_runs(model: nn.Module, data: Data, cfg: Config, selective_dir: str | Path, random_dir: str | Path,
                        train: torch.Tensor, selective_step: int | None = None,
                        fractions: Sequence[float] = (0.5, 0.9), progress: bool = True,
                        arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """`anamnesia_experiment` on two finished pruning run directories (e.g. `ff/` and
    `random/` of a series): their records pick the steps, replay rebuilds them.
    `model` must be the unpruned model the runs started from."""
    recs = {}
    for name, d in (("selective", selective_dir), ("random", random_dir)):
        recs[name] = RunDir(d).records()
        if not recs[name]:
            raise SelpruneError(f"the {name} run in {d} has no records; run the pruning first")
    return anamnesia_experiment(model, data, cfg, recs["selective"], recs["random"], replay_builder(selective_dir),
                                replay_builder(random_dir), train, selective_step, fractions, progress, arms)
