"""The pruning loop: collect, score, prune, evaluate, step after step, into a run directory.

Modes (`PruneConfig.mode`):
- `iterative` (the paper's): every step re-collects statistics on the model as pruned so
  far, scores, and prunes `ff_frac` / `attn_frac` more of all neurons;
- `one-shot`: collects once on the unpruned model; step i holds the top `frac * i`;
- `random`: the baseline, the same fractions chosen uniformly among unpruned neurons.

Each finished step is recorded atomically: first `step_NNN.safetensors` (the neurons it
pruned and their ablation constants), then `records.json`. A rerun with the same
`run_dir` replays the finished steps and continues, so an interrupted run loses at most
the step in progress. A run directory made with other parameters is refused.

The same code runs data-parallel under torch.distributed (`selprune.distributed`, launched
by `torchrun ... selprune prune`): every rank holds the model and the same windows,
collection and evaluation split the windows and add the sums over ranks, so every rank
scores, selects and prunes identically (rank 0's selection is broadcast to make sure);
rank 0 alone reads and writes the run directory and hands what it read to the others.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune import distributed
from selprune.errors import SelpruneError
from selprune.evaluate import evaluate
from selprune.paths import atomic_write_bytes, atomic_write_json
from selprune.prune import ABLATIONS, Pruner, ablation_values, masks_summary
from selprune.scoring import DEFAULT_EPS, check_scoring, score
from selprune.select import HEAD_REDUCERS, select
from selprune.sites import KINDS, find_sites
from selprune.stats import collect_stats
from selprune.texts import load_texts, token_windows, top_tokens

MODES = ("iterative", "one-shot", "random")


@dataclass
class PruneConfig:
    """Everything that defines a pruning run (and so must match to resume one)."""

    model: str = "smollm2-135m"
    forget: str = "code"
    retain: str = "prose"
    ff_frac: float = 0.02
    attn_frac: float = 0.0
    steps: int = 10
    mode: str = "iterative"
    scoring: str = "abs"
    score: str = "ratio"
    eps_ff: float = DEFAULT_EPS["ff"]
    eps_attn: float = DEFAULT_EPS["attn"]
    ablation: str = "zero"
    per_layer: bool = False
    heads: str | None = None  # "mean" / "median": prune whole attention heads
    collect_tokens: int = 16384
    eval_tokens: int = 16384
    window: int = 256
    batch_size: int = 8
    skip_k: int = 50
    dtype: str = "auto"
    seed: int = 0
    stop_forget_top1: float | None = None  # stop once forget top-1 falls below this
    max_retain_drop: float | None = None  # stop once retain top-1 fell by more than this (relative)

    def validate(self) -> None:
        if self.forget == self.retain:
            raise SelpruneError(f"forget and retain are both {self.forget!r}; pick two different datasets")
        for name in ("ff_frac", "attn_frac"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise SelpruneError(f"{name}={v} is outside [0, 1); use e.g. 0.02 for 2% per step")
        if self.ff_frac == 0 and self.attn_frac == 0:
            raise SelpruneError("ff_frac and attn_frac are both 0: nothing to prune; set one above 0")
        for name in ("ff_frac", "attn_frac"):
            if getattr(self, name) * self.steps > 1 + 1e-9:
                raise SelpruneError(
                    f"{name}={getattr(self, name)} x steps={self.steps} prunes more than all neurons; lower either"
                )
        if self.steps < 1:
            raise SelpruneError(f"steps={self.steps}; need at least 1")
        if self.mode not in MODES:
            raise SelpruneError(f"unknown mode {self.mode!r}; use one of {MODES}")
        check_scoring(self.scoring, self.score)
        if self.ablation not in ABLATIONS:
            raise SelpruneError(f"unknown ablation {self.ablation!r}; use one of {sorted(ABLATIONS)}")
        if self.heads is not None and self.heads not in HEAD_REDUCERS:
            raise SelpruneError(f"heads={self.heads!r}; use None (single neurons) or one of {sorted(HEAD_REDUCERS)}")
        for name in ("collect_tokens", "eval_tokens"):
            if getattr(self, name) < self.window:
                raise SelpruneError(f"{name}={getattr(self, name)} is below one window ({self.window} tokens)")


@dataclass
class Data:
    """Token windows of both datasets: collection (train split) and evaluation (test split)."""

    forget_train: torch.Tensor
    retain_train: torch.Tensor
    forget_test: torch.Tensor
    retain_test: torch.Tensor
    skip: dict[str, torch.Tensor] = field(default_factory=dict)


EVAL_SEED = 0  # the test windows' order: one fixed evaluation set for every seed


def prepare_data(cfg: PruneConfig, tokenizer: PreTrainedTokenizerBase) -> Data:
    """Windows for collection (train) and evaluation (test), and each set's skip tokens
    (the `skip_k` most frequent in its collection windows).

    `cfg.seed` orders the collection documents only; the test windows are always drawn in
    the `EVAL_SEED` order, so that runs with different seeds are measured on the same text
    and their spread is the method's (which documents it learnt from), not the sampling
    noise of a small evaluation set."""
    def win(name: str, split: str, budget: int, seed: int) -> torch.Tensor:
        return token_windows(load_texts(name, split), tokenizer, cfg.window, budget, seed=seed)

    d = Data(
        win(cfg.forget, "train", cfg.collect_tokens, cfg.seed),
        win(cfg.retain, "train", cfg.collect_tokens, cfg.seed),
        win(cfg.forget, "test", cfg.eval_tokens, EVAL_SEED),
        win(cfg.retain, "test", cfg.eval_tokens, EVAL_SEED),
    )
    d.skip = {"forget": top_tokens(d.forget_train, cfg.skip_k), "retain": top_tokens(d.retain_train, cfg.skip_k)}
    return d


def evaluate_both(model: nn.Module, data: Data, batch_size: int, progress: bool) -> dict[str, dict[str, float]]:
    """Metrics of forget and retain on their test windows, each with its skip set."""
    return {
        # a hand-made Data without skip sets: the skip metrics equal the plain ones
        "forget": evaluate(model, data.forget_test, data.skip.get("forget"), batch_size, progress, "eval forget"),
        "retain": evaluate(model, data.retain_test, data.skip.get("retain"), batch_size, progress, "eval retain"),
    }


def _fracs(cfg: PruneConfig) -> dict[str, float]:
    return {"ff": cfg.ff_frac, "attn": cfg.attn_frac}


class RunDir:
    """A pruning run's folder: `config.json`, `step_NNN.safetensors`, `records.json`.

    Every parameter must match to reuse a folder, except `steps`: a rerun with more steps
    extends the run (with fewer, it returns the first `steps`)."""

    EXTENDABLE = ("steps",)

    def __init__(self, path: str | Path, cfg: PruneConfig) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        want = asdict(cfg)
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            have = self._read_json(cfg_file)
            if not isinstance(have, dict):
                raise SelpruneError(f"run file {cfg_file} is corrupt; delete the run directory and start again")
            diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
                    if k not in self.EXTENDABLE and have.get(k) != want.get(k)}
            if diff:
                raise SelpruneError(
                    f"run directory {self.path} was made with other parameters {diff} (was, now); "
                    "use a new run directory, or delete this one"
                )
            if want["steps"] > have.get("steps", 0):
                atomic_write_json(cfg_file, want)  # the run was extended
        else:
            atomic_write_json(cfg_file, want)

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SelpruneError(f"run file {path} is corrupt ({e}); delete the run directory and start again") from e

    def records(self) -> list[dict[str, Any]]:
        f = self.path / "records.json"
        if not f.exists():
            return []
        records = self._read_json(f)
        if not isinstance(records, list) or [r.get("step") if isinstance(r, dict) else None
                                             for r in records] != list(range(len(records))):
            raise SelpruneError(f"run file {f} is corrupt (not the records of steps 0, 1, ...); "
                                "delete the run directory and start again")
        return records

    def save_step(self, step: int, new: dict[str, torch.Tensor], values: dict[str, torch.Tensor | None]) -> None:
        tensors = {f"{k}.mask": m.to(torch.uint8).contiguous() for k, m in new.items()}
        tensors.update({f"{k}.values": v.contiguous() for k, v in values.items() if v is not None})
        atomic_write_bytes(self.path / f"step_{step:03d}.safetensors", save(tensors))

    def load_step(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        f = self.path / f"step_{step:03d}.safetensors"
        try:
            t = load_file(str(f))
            return ({k: t[f"{k}.mask"].bool() for k in KINDS}, {k: t.get(f"{k}.values") for k in KINDS})
        except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
            raise SelpruneError(f"run file {f} is missing or corrupt ({e}); delete the run directory and start again") from e

    def save_records(self, records: list[dict[str, Any]]) -> None:
        atomic_write_json(self.path / "records.json", records)


def run_pruning(
    cfg: PruneConfig,
    run_dir: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: Data | None = None,
    progress: bool = True,
    base: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], Pruner]:
    """Run (or resume) a pruning run; returns the step records and the pruner, whose
    model is left pruned as of the last step (call `pruner.restore()` to undo).

    Record 0 is the unpruned model (metrics from `base` if given: the same data and model
    give the same numbers, so a series evaluates the unpruned model once). Each record: step, fractions pruned per kind,
    per-layer counts, metrics of forget and retain, and seconds per phase.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    rd: RunDir | None = None  # rank 0's; the other ranks of a distributed run never touch the folder

    def open_run() -> tuple[list[dict[str, Any]], list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]]]:
        nonlocal rd
        rd = RunDir(run_dir, cfg)
        records = rd.records()[: cfg.steps + 1]  # a rerun with fewer steps: the first `steps`
        return records, [rd.load_step(i) for i in range(1, len(records))]

    def save(step: int, new: dict[str, torch.Tensor], values: dict[str, torch.Tensor | None]) -> None:
        assert rd is not None  # on_main runs this on rank 0, which opened the run
        if step:
            rd.save_step(step, new, values)
        rd.save_records(records)

    records, finished = distributed.on_main(open_run)
    data = data or prepare_data(cfg, tokenizer)
    meta = {"model": cfg.model, "window": cfg.window, "seed": cfg.seed}
    fixed_scores = None
    if cfg.mode == "one-shot":  # scores of the unpruned model, before any replay
        fixed_scores = _one_shot_scores(cfg, model, sites, data, meta, progress)
    for new, values in finished:  # replay finished steps
        for kind in KINDS:
            pruner.prune(kind, new[kind], values[kind])
    if not records:  # step 0: the unpruned model (`base`, if given, saves evaluating it again)
        t0 = time.perf_counter()
        metrics = {"forget": base["forget"], "retain": base["retain"]} if base else evaluate_both(model, data, cfg.batch_size, progress)
        records.append({"step": 0, "fraction": {k: 0.0 for k in KINDS}, "pruned_per_layer": masks_summary(pruner.masks),
                        **metrics, "seconds": {"eval": time.perf_counter() - t0}})
        distributed.on_main(functools.partial(save, 0, {}, {}))
    base = records[0]
    for step in range(len(records), cfg.steps + 1):
        if _should_stop(cfg, records[-1], base):
            break
        secs: dict[str, float] = {}
        t = time.perf_counter()
        retain_stats = None
        if cfg.mode == "iterative" or cfg.ablation != "zero":
            # mean/peak constants always come from the model as it is now
            forget_stats, retain_stats = _collect_both(cfg, model, sites, data, pruner.masks, meta, progress)
        secs["collect"] = time.perf_counter() - t
        t = time.perf_counter()
        if cfg.mode == "random":
            scores = {k: torch.rand(sites.shape(k), generator=torch.Generator().manual_seed(cfg.seed * 1000 + step),
                                    dtype=torch.float64) for k in KINDS}
        elif cfg.mode == "one-shot":
            scores = fixed_scores
        else:
            eps = {"ff": cfg.eps_ff, "attn": cfg.eps_attn}
            scores = score(forget_stats, retain_stats, cfg.scoring, cfg.score, eps, seed=cfg.seed * 1000 + step)
        new, values = {}, {}
        for kind in KINDS:
            frac = _fracs(cfg)[kind]
            heads = cfg.heads if kind == "attn" else None
            # broadcast: every rank computed the same from the same sums; this makes it certain
            new[kind] = distributed.broadcast_(select(scores[kind], frac, pruner.masks[kind], cfg.per_layer, heads))
            values[kind] = ablation_values(cfg.ablation, retain_stats, kind) if frac else None
            if values[kind] is not None:
                distributed.broadcast_(values[kind])
        secs["score"] = time.perf_counter() - t
        t = time.perf_counter()
        for kind in KINDS:
            pruner.prune(kind, new[kind], values[kind])
        secs["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics = evaluate_both(model, data, cfg.batch_size, progress)
        secs["eval"] = time.perf_counter() - t
        records.append({"step": step, "fraction": {k: pruner.fraction(k) for k in KINDS},
                        "pruned_per_layer": masks_summary(pruner.masks), **metrics, "seconds": secs})
        distributed.on_main(functools.partial(save, step, new, values))
    return records, pruner


def _collect_both(cfg: PruneConfig, model: nn.Module, sites, data: Data, removed, meta: dict, progress: bool):
    hist = 64 if cfg.ablation == "peak" else 0
    out = []
    for side, windows, name in (("forget", data.forget_train, cfg.forget), ("retain", data.retain_train, cfg.retain)):
        out.append(collect_stats(model, sites, windows, cfg.batch_size, removed, hist,
                                 meta={**meta, "dataset": name}, progress=progress, desc=f"collect {side}"))
    return out


def _one_shot_scores(cfg: PruneConfig, model: nn.Module, sites, data: Data, meta: dict, progress: bool):
    forget_stats, retain_stats = _collect_both(cfg, model, sites, data, None, meta, progress)
    eps = {"ff": cfg.eps_ff, "attn": cfg.eps_attn}
    return score(forget_stats, retain_stats, cfg.scoring, cfg.score, eps, seed=cfg.seed)


def _should_stop(cfg: PruneConfig, last: dict[str, Any], base: dict[str, Any]) -> bool:
    if cfg.stop_forget_top1 is not None and last["forget"]["top1"] < cfg.stop_forget_top1:
        return True
    if cfg.max_retain_drop is not None:
        drop = 1 - last["retain"]["top1"] / max(base["retain"]["top1"], 1e-12)
        return drop > cfg.max_retain_drop
    return False


# ------------------------------------------------------------------------ summaries
def relative_curves(records: list[dict[str, Any]], metric: str = "top1") -> dict[str, np.ndarray]:
    """Forget and retain `metric` relative to the unpruned model (record 0), per step."""
    base = records[0]
    return {
        side: np.array([r[side][metric] / max(base[side][metric], 1e-12) for r in records]) for side in ("forget", "retain")
    }


def selectivity_area(records: list[dict[str, Any]], metric: str = "top1") -> float:
    """Normalised area between the retain and forget curves, over the steps.

    Orientation (fixed): the mean over the pruning trajectory, by the trapezoid rule over
    step index, of (retain / retain_base) - (forget / forget_base). Positive means forget
    fell faster than retain (selective); 0 means no selectivity; 1 would mean forget gone
    at once while retain stayed whole.
    """
    if len(records) < 2:
        return 0.0
    c = relative_curves(records, metric)
    gap = c["retain"] - c["forget"]
    area = float(((gap[1:] + gap[:-1]) / 2).sum())  # trapezoid rule (np.trapezoid needs numpy >= 2)
    return area / (len(records) - 1)


def forget_drop_at_retain_drop(records: list[dict[str, Any]], retain_drop: float = 0.10, metric: str = "top1") -> float | None:
    """Relative drop of forget `metric` where retain's relative drop reaches `retain_drop`,
    linearly interpolated between steps; None if the run never reaches that retain drop."""
    c = relative_curves(records, metric)
    r_drop, f_drop = 1 - c["retain"], 1 - c["forget"]
    for i in range(1, len(records)):
        lo, hi = r_drop[i - 1], r_drop[i]
        if hi >= retain_drop > lo or (hi >= retain_drop and i == 1 and lo >= retain_drop):
            w = 0.0 if hi == lo else (retain_drop - lo) / (hi - lo)
            return float(f_drop[i - 1] + w * (f_drop[i] - f_drop[i - 1]))
    return None
