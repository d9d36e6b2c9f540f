"""The pruning loop: collect, score, prune, evaluate, step after step, into a run directory.

Schedules (`prune_mode`, docs/method.md, "The pruning schedule"):
- `iterative` (the paper's): every step re-collects statistics on the model as pruned so
  far, scores, and prunes `ff_frac` / `attn_frac` more of all neurons;
- `one-shot`: collects once on the unpruned model; step i holds the top `frac * i`;
- a run kind with `random` (the floor): the same fractions chosen uniformly among the
  unpruned neurons.

Each finished step is recorded atomically in the run directory (`RunDir`), so a rerun
with the same folder replays the finished steps and continues: an interrupted run loses
at most the step in progress. A folder made with other parameters is refused.

The same code runs data-parallel under torch.distributed (`selprune.distributed`, launched
by `torchrun ... selprune prune`): every rank holds the model and the same windows,
collection and evaluation split the windows and add the sums over ranks, so every rank
scores, selects and prunes identically (rank 0's selection is broadcast to make sure);
rank 0 alone reads and writes the run directory and hands what it read to the others.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune import distributed
from selprune.data import Data, prepare_data
from selprune.errors import SelpruneError
from selprune.evaluate import evaluate_both
from selprune.experiment.baselines import ComputeMeter, compute_record
from selprune.experiment.config import Config, stage_of, validate
from selprune.experiment.rundir import RunDir, Step
from selprune.experiment.runs import RunKind, run_kind
from selprune.experiment.tracking import for_pruning
from selprune.models import check_window
from selprune.prune import Pruner, ablation_values, masks_summary
from selprune.scoring import score
from selprune.select import select
from selprune.selectivity import should_stop
from selprune.sites import KINDS, NeuronSites, find_sites
from selprune.stats import ActivationStats, collect_stats
from selprune.vision import is_image_spec, prepare_image_data

RUN_STAGES = ("setup", "data", "score", "prune")  # the parameters that define a pruning run's results
RERUN_SAFE = ("batch_size", "device")  # they change speed, not results
RUN_FORMAT = 2  # config.json layout: 2 = the parameter schema's names
PROGRESS_ADDR_ENV = "SELPRUNE_PROGRESS_ADDR"  # set by `selprune run` for its kernels (announce_step)


def data_for(cfg: Config, tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> Data:
    """The collection and evaluation windows that `cfg` asks for: token windows, or the
    images of an image experiment (`tokenizer` is then the model's image processor)."""
    if is_image_spec(cfg.forget):
        if model is None:
            raise SelpruneError("an image experiment needs the model (its image size and channels) to prepare images")
        return prepare_image_data(tokenizer, model.config, forget=cfg.forget, retain=cfg.retain,
                                  collect_tokens=cfg.collect_tokens, eval_tokens=cfg.eval_tokens, seed=cfg.seed)
    return prepare_data(tokenizer, forget=cfg.forget, retain=cfg.retain, window=cfg.window,
                        collect_tokens=cfg.collect_tokens, eval_tokens=cfg.eval_tokens, skip_k=cfg.skip_k,
                        seed=cfg.seed)


def run_config(cfg: Config, kind: RunKind) -> dict[str, Any]:
    """What defines one pruning run (its config.json): the run kind and the parameters of
    the stages that shape its results, with the run kind's effective values (a fraction
    of a neuron kind it does not prune is 0; `heads` only where heads are scored whole)."""
    out = {k: v for k, v in asdict(cfg).items() if stage_of(k) in RUN_STAGES and k not in RERUN_SAFE}
    for k in KINDS:
        if k not in kind.kinds:
            out[f"{k}_frac"] = 0.0
    out["heads"] = cfg.heads if kind.whole_heads else None
    return {**out, "run": kind.name, "format": RUN_FORMAT}


def lock_run(path: str | Path, cfg: Config, kind: RunKind) -> RunDir:
    """The run's folder, locked to its configuration; `steps` may grow (extends the run)."""
    rd = RunDir(path)
    want = run_config(cfg, kind)
    if rd.has("config.json") and rd.read_json("config.json").get("format") != RUN_FORMAT:
        raise SelpruneError(f"run directory {rd.path} was written by an older selprune (before the parameter "
                            "schema); use a new run directory, or delete this one")
    rd.lock(want, file="config.json", extendable=("steps",))
    return rd


# long: open the run, replay its finished steps, step until done or stopped, saving each: one
# sequence read top to bottom (collection, scoring, pruning and evaluation are helpers already)
def run_pruning(cfg: Config, run: str, run_dir: str | Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                data: Data | None = None, progress: bool = True, base: dict[str, Any] | None = None,
                unpruned: tuple[ActivationStats, ActivationStats] | None = None,
                ) -> tuple[list[dict[str, Any]], Pruner]:
    """Run (or resume) the pruning run `run` (a run kind) of `cfg` in `run_dir`; returns
    the step records and the pruner, whose model is left pruned as of the last step
    (call `pruner.restore()` to undo).

    Record 0 is the unpruned model (metrics from `base` if given: the same data and model
    give the same numbers, so a series evaluates the unpruned model once). Each record:
    step, fractions pruned per kind, per-layer counts, metrics of forget and retain, and
    seconds per phase. `unpruned`: the unpruned model's (forget, retain) statistics on
    `data`'s collection windows, if the caller has them (notebook 01's), used for the first
    (or the one-shot) collection: the same sums, so the same run; its tokens still count."""
    kind = run_kind(run)
    validate(cfg, runs=[run], require_runs=False)
    if not is_image_spec(cfg.forget):  # before the run directory; an image's tokens are the model's own
        check_window(model, cfg.window if data is None else data.forget_test.shape[-1])
    torch.manual_seed(cfg.seed)
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    box: dict[str, RunDir] = {}  # rank 0's folder; the other ranks of a distributed run never touch it

    def open_run() -> tuple[list[dict[str, Any]], list[Step]]:
        rd = box["rd"] = lock_run(run_dir, cfg, kind)
        records = rd.records()[: cfg.steps + 1]  # a rerun with fewer steps: the first `steps`
        return records, [rd.load_step(i) for i in range(1, len(records))]

    def save(step: int, new: dict[str, torch.Tensor], values: dict[str, torch.Tensor | None]) -> None:
        if step:
            box["rd"].save_step(step, new, values)
        box["rd"].save_records(records)

    records, finished = distributed.on_main(open_run)
    track = for_pruning(cfg, run, run_dir)  # experiment tracking (#17): nothing with tracker=none
    data = data or data_for(cfg, tokenizer, model)
    fixed = None  # one-shot: the scores of the unpruned model, collected before any replay
    first = ComputeMeter(next(model.parameters()).device)  # the one-shot collection: step 1's compute
    if cfg.prune_mode == "one-shot" and not kind.random:
        with first.measure():
            fixed = _collect_and_score(cfg, model, sites, data, None, progress, stats=unpruned)[0]
        first.forward(_collected_tokens(data))
    for new, values in finished:  # replay the finished steps
        for k in KINDS:
            pruner.prune(k, new[k], values[k])
    if not records:  # step 0: the unpruned model (`base`, if given, saves evaluating it again)
        t0 = time.perf_counter()
        metrics = {"forget": base["forget"], "retain": base["retain"]} if base else \
            evaluate_both(model, data, cfg.batch_size, progress)
        records.append({"step": 0, "fraction": {k: 0.0 for k in KINDS}, "pruned_per_layer": masks_summary(pruner.masks),
                        **metrics, "seconds": {"eval": time.perf_counter() - t0}})
        distributed.on_main(functools.partial(save, 0, {}, {}))
        track.record(records[0])  # tracking (#17)
    for step in range(len(records), cfg.steps + 1):
        if should_stop(records, cfg.max_retain_drop, cfg.stop_forget_top1):
            break
        record, new, values = _step(cfg, kind, step, model, sites, pruner, data, fixed, progress,
                                    unpruned if step == 1 else None)
        record["compute"] = _add_compute(records[-1].get("compute"), record.pop("meter"), first if step == 1 else None)
        records.append(record)
        distributed.on_main(functools.partial(save, step, new, values))
        announce_step(run, record, cfg.steps)
        track.record(record)  # tracking (#17)
    track.finish()  # tracking (#17)
    return records, pruner


def announce_step(run: str, record: dict[str, Any], steps: int) -> None:
    """Under `selprune run` with progress on, one line per finished step for its stderr,
    sent to the loopback address in $SELPRUNE_PROGRESS_ADDR, which the parent relays (a
    kernel's own output would go into the notebook). Silent anywhere else."""
    addr = os.environ.get(PROGRESS_ADDR_ENV)
    if not addr or os.environ.get("SELPRUNE_PROGRESS", "1") == "0" or not distributed.is_main():
        return
    f, secs = record["fraction"], sum(record.get("seconds", {}).values())
    line = (f"selprune:   {run} step {record['step']}/{steps}: pruned ff {100 * f['ff']:.2f}% attn "
            f"{100 * f['attn']:.2f}%, top-1 forget {record['forget']['top1']:.3f} retain "
            f"{record['retain']['top1']:.3f} ({secs:.0f} s)")
    host, _, port = addr.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(line.encode(), (host, int(port)))
    except (OSError, ValueError):  # progress is a courtesy; it never fails a run
        pass


def _step(cfg: Config, kind: RunKind, step: int, model: nn.Module, sites: NeuronSites, pruner: Pruner, data: Data,
          fixed: dict[str, torch.Tensor] | None, progress: bool,
          unpruned: tuple[ActivationStats, ActivationStats] | None = None):
    """One pruning step: (its record, the new masks, their ablation values). `unpruned`:
    the statistics of the model as it is, when it is still unpruned (step 1), else None."""
    secs: dict[str, float] = {}
    meter = ComputeMeter(next(model.parameters()).device)  # the method's own work: collection, scoring, pruning
    t = time.perf_counter()
    scores, retain_stats = fixed, None
    iterative = fixed is None and not kind.random
    if iterative or cfg.ablation != "zero":  # mean/peak constants always come from the model as it is now
        with meter.measure():
            fresh, retain_stats = _collect_and_score(cfg, model, sites, data, pruner.masks, progress, step, unpruned)
        meter.forward(_collected_tokens(data))
        scores = fresh if iterative else scores
    secs["collect"] = time.perf_counter() - t
    t = time.perf_counter()
    if kind.random:
        scores = {k: torch.rand(sites.shape(k), generator=torch.Generator().manual_seed(cfg.seed * 1000 + step),
                                dtype=torch.float64) for k in KINDS}
    new, values = {}, {}
    for k in KINDS:
        frac = getattr(cfg, f"{k}_frac") if k in kind.kinds else 0.0
        heads = cfg.heads if k == "attn" and kind.whole_heads else None
        # broadcast: every rank computed the same from the same sums; this makes it certain
        new[k] = distributed.broadcast_(select(scores[k], frac, pruner.masks[k], cfg.selection == "per_layer", heads))
        values[k] = ablation_values(cfg.ablation, retain_stats, k) if frac else None
        if values[k] is not None:
            distributed.broadcast_(values[k])
    secs["score"] = time.perf_counter() - t
    t = time.perf_counter()
    for k in KINDS:
        pruner.prune(k, new[k], values[k])
    secs["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = evaluate_both(model, data, cfg.batch_size, progress)
    secs["eval"] = time.perf_counter() - t
    meter.seconds = secs["collect"] + secs["score"] + secs["prune"]
    record = {"meter": meter, "step": step, "fraction": {k: pruner.fraction(k) for k in KINDS},
              "pruned_per_layer": masks_summary(pruner.masks), **metrics, "seconds": secs}
    return record, new, values


def _check_reusable(stats: tuple[ActivationStats, ActivationStats], data: Data, hist: int) -> None:
    """Given statistics must be of the collection windows the run would collect on (their
    token counts tell), with a histogram where peak ablation needs one: anything else is a
    caller's mistake that would silently score other text."""
    for st, windows, side in zip(stats, (data.forget_train, data.retain_train), ("forget", "retain"), strict=True):
        if st.n_tokens != data.tokens(windows):
            raise SelpruneError(f"the given unpruned {side} statistics count {st.n_tokens} tokens, the run's "
                                f"collection windows {data.tokens(windows)}: pass statistics of the same data, or none")
        if hist and not st.hist:
            raise SelpruneError("peak ablation needs statistics with a histogram: collect them with hist_bins > 0")


def _collected_tokens(data: Data) -> int:
    """Tokens through one collection: every position of both datasets' collection windows
    (the transformer body only, no LM head: counted as full-depth forward passes)."""
    return data.tokens(data.forget_train) + data.tokens(data.retain_train)


def _add_compute(before: dict[str, Any] | None, *meters: ComputeMeter | None) -> dict[str, Any]:
    """The run's cumulative compute after a step: the previous record's plus the step's
    meters (forward passes only: pruning never runs a backward pass)."""
    before = before or compute_record(0, 0)
    used = [m for m in meters if m is not None]
    peaks = [p for p in [before["peak_memory_mb"], *(m.peak_bytes and m.peak_bytes / (1 << 20) for m in used)]
             if p is not None]
    tokens = before["forward_tokens"] + sum(m.forward_tokens for m in used)
    out = compute_record(tokens, 0, before["forward_equiv_tokens"] + sum(m.forward_equiv for m in used), None,
                         before["seconds"] + sum(m.seconds for m in used))
    out["peak_memory_mb"] = round(max(peaks), 1) if peaks else None
    return out


def _collect_and_score(cfg: Config, model: nn.Module, sites: NeuronSites, data: Data,
                       removed: dict[str, torch.Tensor] | None, progress: bool, step: int = 0,
                       stats: tuple[ActivationStats, ActivationStats] | None = None):
    """Statistics of forget and retain on the model as it is (`stats`, when the caller
    already has them), and the scores from them: (scores per kind, the retain statistics
    for mean/peak ablation)."""
    hist = 64 if cfg.ablation == "peak" else 0
    meta = {"model": cfg.model, "window": cfg.window, "seed": cfg.seed}
    if stats is not None:
        _check_reusable(stats, data, hist)
        forget, retain = stats
    else:
        forget, retain = (collect_stats(model, sites, windows, cfg.batch_size, removed, hist,
                                        meta={**meta, "dataset": name}, progress=progress, desc=f"collect {side}")
                          for side, windows, name in (("forget", data.forget_train, cfg.forget),
                                                      ("retain", data.retain_train, cfg.retain)))
    eps = {"ff": cfg.eps_ff, "attn": cfg.eps_attn}
    return score(forget, retain, cfg.importance, cfg.score, eps, seed=cfg.seed * 1000 + step if step else cfg.seed), \
        retain
