"""Retraining a pruned model, and the anamnesia index (method.md, "Retraining and the
anamnesia index").

Pruning that merely *hides* a capability is undone by a little fine-tuning; pruning that
removes it should need about as much fine-tuning as learning it afresh. So we fine-tune
the pruned model on forget-train text and record forget (and retain) accuracy at
log-spaced steps. The **anamnesia index** at fraction q is the first step at which forget
top-1 has regained q of what pruning removed (`anamnesia_index`); `recovery_auc`
summarises the whole recovery curve in one number. The same optimiser, data order and
schedule are run on two controls (`anamnesia_experiment`): the unpruned model, and a
randomly pruned model with matched retain damage.

Variants (`RetrainConfig`): full fine-tuning or LoRA; pruned neurons held at zero
(default) or free to regrow. Everything runs in the model's own dtype: fp32 on the CPU is
bit-for-bit deterministic for a given seed. bf16 weights are trained as pure bf16 (AdamW
state and updates in bf16, the loss in fp32); an update smaller than bf16's resolution
(about 0.4% of a weight) is rounded away, so small learning rates under-state recovery
in bf16. Use fp32 for retraining studies when memory allows.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from selprune.errors import SelpruneError
from selprune.loop import Data, PruneConfig, RunDir, evaluate_both
from selprune.prune import Pruner
from selprune.sites import KINDS, NeuronSites, find_sites

MODES = ("full", "lora")
ARMS = ("unpruned", "selective", "random")

Masks = dict[str, torch.Tensor]  # kind -> bool mask of pruned neurons (ff [L, d_mlp], attn [L, H, d_head])
Curve = list[dict[str, Any]]  # retrain records, one per scheduled evaluation
# prunes the given (unpruned) model in place to the state after `step` of a pruning run
Builder = Callable[[nn.Module, int], Masks]


@dataclass
class RetrainConfig:
    """Everything that defines a retraining run; every arm of an experiment shares it."""

    lr: float = 1e-4
    batch_size: int = 4  # windows per optimizer step
    steps: int = 64  # optimizer steps ("retrain_steps")
    window: int | None = None  # tokens per training window; None: the data's window width
    seed: int = 0  # data order, LoRA init, dropout
    weight_decay: float = 0.0  # AdamW's decoupled decay; 0 so the unpruned control only sees the data
    mode: str = "full"  # "full": every parameter; "lora": low-rank adapters, base frozen
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"  # peft's name for every attention and MLP projection
    hold_pruned: bool = True  # pruned neurons stay exactly zero; False lets them regrow
    max_grad_norm: float | None = 1.0  # gradient clipping (None: off)
    eval_batch_size: int = 8

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SelpruneError(f"retrain steps={self.steps!r}; need an integer of at least 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise SelpruneError(f"retrain lr={self.lr!r}; the learning rate must be a positive number, e.g. 1e-4")
        if self.mode not in MODES:
            raise SelpruneError(f"unknown retrain mode {self.mode!r}; use one of {MODES}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise SelpruneError(f"retrain {name}={getattr(self, name)}; need at least 1")
        if self.window is not None and self.window < 2:
            raise SelpruneError(f"retrain window={self.window}; need at least 2 tokens (one input, one target)")
        if self.weight_decay < 0:
            raise SelpruneError(f"retrain weight_decay={self.weight_decay}; must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise SelpruneError(f"retrain max_grad_norm={self.max_grad_norm}; use a positive number or None")
        if self.mode == "lora":
            if self.lora_r < 1 or not self.lora_alpha > 0:
                raise SelpruneError(f"LoRA needs lora_r >= 1 and lora_alpha > 0 (got {self.lora_r}, {self.lora_alpha})")
            if not 0 <= self.lora_dropout < 1:
                raise SelpruneError(f"lora_dropout={self.lora_dropout} is outside [0, 1)")


def log_schedule(steps: int) -> list[int]:
    """Evaluation steps: 0, 1, 2, 4, 8, ... below `steps`, then `steps` itself.

    Recovery is usually fast at first and slow later, so log spacing resolves the early
    part of the curve at a cost of only ~log2(steps) evaluations.
    """
    if not isinstance(steps, int) or steps < 1:
        raise SelpruneError(f"retrain steps={steps!r}; need an integer of at least 1")
    out, s = [0], 1
    while s < steps:
        out.append(s)
        s *= 2
    out.append(steps)
    return out


# --------------------------------------------------------------------- holding pruned neurons
@dataclass
class _Held:
    """Slices `idx` along `dim` of `param` that must stay zero (the pruned neurons' inputs)."""

    param: nn.Parameter
    idx: torch.Tensor  # [n_pruned] long, on param's device
    dim: int

    def grad_hook(self, g: torch.Tensor) -> torch.Tensor:
        return g.index_fill(self.dim, self.idx, 0)

    @torch.no_grad()
    def zero(self) -> None:
        self.param.data.index_fill_(self.dim, self.idx, 0)


def _pruned_columns(masks: Masks, sites: NeuronSites) -> list[tuple[nn.Module, torch.Tensor]]:
    """(output projection, indices of its pruned input channels) for every layer with any."""
    out = []
    for kind in KINDS:
        if kind not in masks:
            continue
        mask = masks[kind]
        if tuple(mask.shape) != sites.shape(kind):
            raise SelpruneError(f"{kind} mask has shape {tuple(mask.shape)}, but the model's is {sites.shape(kind)}")
        for layer, module in enumerate(sites.modules(kind)):
            idx = mask[layer].reshape(-1).nonzero().squeeze(1)  # [n_pruned]
            if idx.numel():
                out.append((module, idx.to(module.weight.device)))
    return out


def _held_params(model: nn.Module, masks: Masks, sites: NeuronSites, lora: bool) -> list[_Held]:
    """What must stay zero so that pruned neurons stay removed.

    Full fine-tuning: the pruned input columns of each output projection (rows for
    GPT-2's transposed Conv1D). LoRA: the base weight is frozen, but the adapter's delta
    B @ A would write into the pruned columns, so the matching input columns of A
    (`[r, in]`) are held instead; then (B @ A)[:, j] = B @ A[:, j] = 0.
    Mean/peak ablation constants live in the projection's bias, which is shared by all
    its neurons and so is left to train like any bias.
    """
    cols = _pruned_columns(masks, sites)
    if not lora:
        return [_Held(m.weight, idx, 0 if isinstance(m, Conv1D) else 1) for m, idx in cols]
    from peft.tuners.lora import LoraLayer

    wrappers = {id(m.get_base_layer()): m for m in model.modules() if isinstance(m, LoraLayer)}
    held = []
    for m, idx in cols:
        wrapper = wrappers.get(id(m))
        if wrapper is None:  # not an adapter target: its frozen base weight cannot change
            continue
        held += [_Held(a.weight, idx, 1) for a in wrapper.lora_A.values()]  # A: [r, in]
    return held


# ------------------------------------------------------------------------------ training
def _train_windows(data: Data, cfg: RetrainConfig) -> torch.Tensor:
    """The forget-train windows, cropped to `cfg.window` tokens if set: `[n, window]`."""
    w = data.forget_train
    if w.ndim != 2 or len(w) == 0:
        raise SelpruneError(f"retraining needs forget-train windows [n, window]; got shape {tuple(w.shape)}")
    if cfg.window is not None:
        if cfg.window > w.shape[1]:
            raise SelpruneError(f"retrain window={cfg.window} is longer than the data's windows ({w.shape[1]}); "
                                "lower it or make longer windows")
        w = w[:, : cfg.window]
    return w


def _batch_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """`[steps, batch_size]` window indices: the windows in a seeded random order, reshuffled
    each epoch and cycled; identical for every arm of an experiment."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n, generator=g) for _ in range(-(-need // n))]
    return torch.cat(perms)[:need].view(steps, batch_size)


def _attach_lora(model: nn.Module, cfg: RetrainConfig):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5: noise for users
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lcfg)
    except ValueError as e:
        raise SelpruneError(f"could not attach LoRA adapters to {type(model).__name__} ({e}); "
                            "set lora_targets to the names of its projections") from e


def _adamw(params: list[nn.Parameter], cfg: RetrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per device where torch has one (CPU, CUDA, MPS).

    The update is the same algorithm; on the CPU the fused kernel takes a third of the
    time of the default one over the 135M parameters of the embedded model, which is a
    quarter of a retraining step's time. Falls back to the default implementation where
    fusing is not supported (other devices or dtypes)."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if all(p.device.type in ("cpu", "cuda", "mps") and p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kwargs)


def _evaluate_both(model: nn.Module, data: Data, cfg: RetrainConfig, progress: bool) -> dict[str, dict[str, float]]:
    model.eval()
    return evaluate_both(model, data, cfg.eval_batch_size, progress)


def retrain(
    model: nn.Module,
    masks: Masks | None,
    sites: NeuronSites | None,
    data: Data,
    cfg: RetrainConfig,
    progress: bool = True,
) -> Curve:
    """Fine-tune `model` **in place** on `data.forget_train` with AdamW; evaluate forget and
    retain (on `data.forget_test` / `data.retain_test`, with the skip sets) at
    `log_schedule(cfg.steps)`. Returns one record per evaluation:
    `{step, tokens, forget: {...}, retain: {...}, train_loss, seconds: {train, eval}}`.

    `masks` (e.g. `pruner.masks`; None for an unpruned model) says which neurons are
    pruned, for `cfg.hold_pruned`: their output-projection columns are zeroed now, their
    gradients are zeroed by a hook, and they are zeroed again after every optimizer step,
    because AdamW's momentum or any other gradient path could otherwise move them. `tokens`
    counts every position of every training window fed so far; `train_loss` is the mean
    training loss over the steps since the previous record (None at step 0).

    LoRA mode attaches fresh adapters, trains only them, and merges them into the weights
    at the end, so `model` is again a plain transformers model (and `sites` stay valid).
    Each step runs in train mode (dropout on, if the model has any), each evaluation in
    eval mode; the model is left in eval mode. The caller's RNG state is left untouched.
    """
    cfg.validate()
    windows = _train_windows(data, cfg)  # [n, window]
    if masks is not None and sites is None:
        sites = find_sites(model)
    schedule = set(log_schedule(cfg.steps))
    order = _batch_order(len(windows), cfg.batch_size, cfg.steps, cfg.seed)  # [steps, batch]
    device = next(model.parameters()).device
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    lora = cfg.mode == "lora"
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        peft_model = _attach_lora(model, cfg) if lora else None
        handles = []
        ok = False
        try:
            if not lora:
                for p in model.parameters():
                    p.requires_grad_(True)
            params = [p for p in model.parameters() if p.requires_grad]
            held = _held_params(model, masks, sites, lora) if cfg.hold_pruned and masks is not None else []
            for h in held:
                h.zero()
                handles.append(h.param.register_hook(h.grad_hook))
            opt = _adamw(params, cfg)
            curve = _train_loop(model, windows, order, schedule, params, held, opt, data, cfg, progress)
            ok = True
        finally:
            for hd in handles:
                hd.remove()
            if peft_model is not None:
                if ok:  # merge the trained adapters into the weights
                    peft_model.merge_and_unload()
                else:  # after a failure, drop them
                    peft_model.unload()
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)
            model.eval()
    return curve


def _train_loop(model: nn.Module, windows: torch.Tensor, order: torch.Tensor, schedule: set[int],
                params: list[nn.Parameter], held: list[_Held], opt: torch.optim.Optimizer, data: Data,
                cfg: RetrainConfig, progress: bool) -> Curve:
    device = next(model.parameters()).device
    per_step = cfg.batch_size * windows.shape[1]  # tokens fed per step
    t = time.perf_counter()
    curve = [{"step": 0, "tokens": 0, **_evaluate_both(model, data, cfg, progress), "train_loss": None,
              "seconds": {"train": 0.0, "eval": time.perf_counter() - t}}]
    losses: list[float] = []
    t_train = 0.0
    for step in tqdm(range(1, cfg.steps + 1), desc="retrain", disable=not progress, leave=False):
        t = time.perf_counter()
        model.train()
        ids = windows[order[step - 1]].to(device)  # [batch, window]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [batch, window-1, vocab]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise SelpruneError(f"retrain loss became {loss.item()} at step {step}; lower lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        for h in held:
            h.zero()
        losses.append(loss.item())
        t_train += time.perf_counter() - t
        if step in schedule:
            t = time.perf_counter()
            metrics = _evaluate_both(model, data, cfg, progress)
            curve.append({"step": step, "tokens": step * per_step, **metrics,
                          "train_loss": sum(losses) / len(losses),
                          "seconds": {"train": t_train, "eval": time.perf_counter() - t}})
            losses, t_train = [], 0.0
    return curve


# ------------------------------------------------------------------------------ the index
def _recovered(curve: Curve, base: float, pruned: float, metric: str) -> list[float]:
    """Per record, the fraction of the pruning loss regained, clipped to [0, 1]."""
    return [min(max((r["forget"][metric] - pruned) / (base - pruned), 0.0), 1.0) for r in curve]


def _check_curve(curve: Curve) -> None:
    if not curve:
        raise SelpruneError("empty retrain curve: nothing to compute an index from")
    steps = [r["step"] for r in curve]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise SelpruneError(f"retrain curve steps must increase strictly; got {steps}")


def recovery_auc(curve: Curve, base_top1: float, pruned_top1: float, metric: str = "top1") -> float:
    """Area under the recovered-fraction curve, normalised to [0, 1].

    Recovered fraction = (forget metric - pruned) / (base - pruned), clipped to [0, 1];
    the area is taken by the trapezoid rule over the actual step numbers (not the
    evaluation index, which is log-spaced) and divided by the span of steps. 1: all of it
    back at once; 0: nothing back by the last step; linear recovery to 1 at the last step
    gives 0.5. When pruning removed nothing (base <= pruned) it is 1 by convention,
    matching an anamnesia index of 0.
    """
    _check_curve(curve)
    if base_top1 - pruned_top1 <= 0:
        return 1.0
    r = _recovered(curve, base_top1, pruned_top1, metric)
    s = [float(x["step"]) for x in curve]
    span = s[-1] - s[0]
    if span == 0:
        return r[0]
    area = sum((s[i] - s[i - 1]) * (r[i] + r[i - 1]) / 2 for i in range(1, len(s)))
    return area / span


def anamnesia_index(
    curve: Curve,
    base_top1: float,
    pruned_top1: float,
    fractions: Sequence[float] = (0.5, 0.9),
    metric: str = "top1",
) -> dict[str, Any]:
    """Steps (and tokens) of retraining until forget top-1 has regained each fraction q of
    what pruning removed: the first step where top1 >= pruned + q * (base - pruned).

    Evaluations are sparse (log-spaced), so the crossing is linearly interpolated in step
    count (and tokens) between the two evaluations that bracket it: the last one below
    the threshold and the first one at or above it. "First" is literal: a noisy curve
    that touches the threshold once counts from then. A threshold met at the first
    evaluation gives that evaluation's step (0). Not reached: step None, with a note
    "not reached within N steps". If pruning removed nothing (base <= pruned, e.g. the
    unpruned control) the index is 0 for every q and `note` says so, instead of dividing
    by zero. Keys of `thresholds` are the fractions as strings ("0.5"), for JSON.
    """
    _check_curve(curve)
    for q in fractions:
        if not 0 < q <= 1:
            raise SelpruneError(f"anamnesia fraction {q} is outside (0, 1]; use e.g. 0.5 and 0.9")
    removed = base_top1 - pruned_top1
    n = curve[-1]["step"]
    out: dict[str, Any] = {"metric": metric, "base": base_top1, "pruned": pruned_top1, "removed": removed,
                           "total_steps": n, "total_tokens": curve[-1]["tokens"], "thresholds": {},
                           "recovery_auc": recovery_auc(curve, base_top1, pruned_top1, metric), "note": None}
    if removed <= 0:
        out["note"] = (f"pruning removed no forget {metric} (base {base_top1:.4f} <= pruned {pruned_top1:.4f}): "
                       "nothing to recover; index 0 and recovery_auc 1 by convention")
        for q in fractions:
            out["thresholds"][f"{q:g}"] = {"fraction": q, "target": base_top1, "step": 0, "tokens": 0,
                                           "note": "nothing removed"}
        return out
    ys = [r["forget"][metric] for r in curve]
    best = max(_recovered(curve, base_top1, pruned_top1, metric))
    for q in fractions:
        target = pruned_top1 + q * removed
        hit: dict[str, Any] = {"fraction": q, "target": target, "step": None, "tokens": None,
                               "note": f"not reached within {n} steps (best recovered fraction {best:.3f})"}
        for i, y in enumerate(ys):
            if y < target:
                continue
            if i == 0:
                hit.update(step=curve[0]["step"], tokens=curve[0]["tokens"], note=None)
            else:
                w = (target - ys[i - 1]) / (y - ys[i - 1])  # y > ys[i-1] since ys[i-1] < target <= y
                a, b = curve[i - 1], curve[i]
                hit.update(step=a["step"] + w * (b["step"] - a["step"]),
                           tokens=a["tokens"] + w * (b["tokens"] - a["tokens"]), note=None)
            break
        out["thresholds"][f"{q:g}"] = hit
    return out


# ------------------------------------------------------------------------- the experiment
def _relative_drop(record: dict[str, Any], base: dict[str, Any], side: str, metric: str = "top1") -> float:
    return 1 - record[side][metric] / max(base[side][metric], 1e-12)


def match_random_step(selective_records: list[dict[str, Any]], random_records: list[dict[str, Any]],
                      selective_step: int | None = None) -> int:
    """The step of the random-pruning run whose relative retain top-1 drop (against its own
    step 0) is closest to the selective run's at `selective_step` (default: its last);
    ties go to the earlier step. Only pruned steps (>= 1) compete when the run has any: a
    selective run with no retain damage would otherwise be "matched" by the unpruned model,
    and the random control would prune nothing. Both runs come from `run_pruning` records."""
    if not selective_records or not random_records:
        raise SelpruneError("matching needs the records of both pruning runs (selective and random)")
    sel = _record_at(selective_records, selective_step)
    want = _relative_drop(sel, selective_records[0], "retain")
    candidates = [r for r in random_records if r["step"] >= 1] or random_records
    return min(candidates, key=lambda r: (abs(_relative_drop(r, random_records[0], "retain") - want),
                                          r["step"]))["step"]


def _record_at(records: list[dict[str, Any]], step: int | None) -> dict[str, Any]:
    if step is None:
        return records[-1]
    for r in records:
        if r["step"] == step:
            return r
    raise SelpruneError(f"pruning step {step} is not among the run's steps {[r['step'] for r in records]}")


def anamnesia_experiment(
    model: nn.Module,
    data: Data,
    cfg: RetrainConfig,
    selective_records: list[dict[str, Any]],
    random_records: list[dict[str, Any]],
    build_selective: Builder,
    build_random: Builder,
    selective_step: int | None = None,
    fractions: Sequence[float] = (0.5, 0.9),
    progress: bool = True,
) -> dict[str, Any]:
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
    cfg.validate()
    sel_step = _record_at(selective_records, selective_step)["step"]
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
        start = arm["curve"][0]
        idx = anamnesia_index(arm["curve"], base["forget"]["top1"], start["forget"]["top1"], fractions)
        arm.update(index=idx["thresholds"], recovery_auc=idx["recovery_auc"], note=idx["note"],
                   removed_top1=idx["removed"],
                   retain_drop=_relative_drop(start, base, "retain"), forget_drop=_relative_drop(start, base, "forget"))
    sel_rec, rand_rec = _record_at(selective_records, sel_step), _record_at(random_records, rand_step)
    return {
        "config": asdict(cfg),
        "fractions": list(fractions),
        "base": {"forget": base["forget"], "retain": base["retain"]},
        "matching": {"selective_step": sel_step, "random_step": rand_step,
                     "selective_retain_drop": _relative_drop(sel_rec, selective_records[0], "retain"),
                     "random_retain_drop": _relative_drop(rand_rec, random_records[0], "retain"),
                     "rule": "random step with the closest relative retain top-1 drop (pruning records)"},
        "arms": arms,
    }


# ------------------------------------------------------------------- replaying pruning runs
def replay_run(model: nn.Module, run_dir: str | Path, step: int, sites: NeuronSites | None = None) -> Pruner:
    """Prune `model` (unpruned) in place to the state of the run in `run_dir` after `step`,
    from its saved `step_NNN.safetensors` files, exactly as `run_pruning` resumes."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise SelpruneError(f"{run_dir} is not a pruning run directory (no config.json)")
    try:
        cfg = PruneConfig(**json.loads(cfg_file.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise SelpruneError(f"cannot read {cfg_file} ({e}); is it a selprune run directory?") from e
    rd = RunDir(run_dir, cfg)
    done = len(rd.records()) - 1
    if not 0 <= step <= done:
        raise SelpruneError(f"run {run_dir} has finished steps 0..{done}; cannot replay step {step}")
    pruner = Pruner(model, sites)
    for i in range(1, step + 1):
        new, values = rd.load_step(i)
        for kind in KINDS:
            pruner.prune(kind, new[kind], values[kind])
    return pruner


def replay_builder(run_dir: str | Path) -> Builder:
    """A builder for `anamnesia_experiment` that replays the run in `run_dir`."""
    return lambda model, step: replay_run(model, run_dir, step).masks


def anamnesia_from_runs(
    model: nn.Module,
    data: Data,
    cfg: RetrainConfig,
    selective_dir: str | Path,
    random_dir: str | Path,
    selective_step: int | None = None,
    fractions: Sequence[float] = (0.5, 0.9),
    progress: bool = True,
) -> dict[str, Any]:
    """`anamnesia_experiment` on two finished pruning run directories (e.g. `ff/` and
    `random/` of a pipeline run): their records pick the steps, replay rebuilds them.
    `model` must be the unpruned model the runs started from."""
    recs = {}
    for name, d in (("selective", selective_dir), ("random", random_dir)):
        f = Path(d) / "records.json"
        try:
            recs[name] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SelpruneError(f"cannot read the {name} run's records {f} ({e}); run the pruning first") from e
    out = anamnesia_experiment(model, data, cfg, recs["selective"], recs["random"], replay_builder(selective_dir),
                               replay_builder(random_dir), selective_step, fractions, progress)
    out["matching"].update(selective_run=str(selective_dir), random_run=str(random_dir))
    return out
