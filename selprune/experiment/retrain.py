"""Fine-tuning a (pruned) model on forget text, with its pruned neurons held removed.

The relearning protocol's engine (`selprune.experiment.relearning` runs it on each arm):
AdamW on forget-train windows in a seeded order, evaluations of forget and retain at the
steps of `anamnesia.log_schedule`. Full fine-tuning or LoRA (`retrain_mode`); pruned
neurons held at zero (`retrain_hold_pruned`, default) or free to regrow. Everything runs
in the model's own dtype: fp32 on the CPU is bit-for-bit deterministic for a given seed.
bf16 weights are trained as pure bf16 (AdamW state and updates in bf16, the loss in
fp32); an update smaller than bf16's resolution (about 0.4% of a weight) is rounded away,
so small learning rates under-state recovery in bf16. Use fp32 for retraining studies
when memory allows (docs/method.md, "Retraining and the anamnesia index").
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from selprune.anamnesia import Curve, log_schedule
from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.evaluate import evaluate_both
from selprune.experiment.config import Config
from selprune.masked import require_causal
from selprune.sites import KINDS, NeuronSites, find_sites

Masks = dict[str, torch.Tensor]  # kind -> bool mask of pruned neurons (ff [L, d_mlp], attn [L, H, d_head])
# Fixed choices of the protocol (not parameters: changing them changes what the index means)
WEIGHT_DECAY = 0.0  # AdamW's decoupled decay; 0 so the unpruned control only sees the data
MAX_GRAD_NORM = 1.0  # gradient clipping
LORA_TARGETS = "all-linear"  # peft's name for every attention and MLP projection
LORA_DROPOUT = 0.0


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
def _train_windows(w: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The training windows, cropped to `retrain_window` tokens: `[n, retrain_window]`."""
    if w.ndim != 2 or len(w) == 0:
        raise SelpruneError(f"retraining needs training windows [n, window]; got shape {tuple(w.shape)}")
    if cfg.retrain_window > w.shape[1]:
        raise SelpruneError(f"retrain_window={cfg.retrain_window} is longer than the data's windows ({w.shape[1]}); "
                            "lower it or make longer windows")
    w = w[:, : cfg.retrain_window]
    return w


def _batch_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """`[steps, batch_size]` window indices: the windows in a seeded random order, reshuffled
    each epoch and cycled; identical for every arm of an experiment."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n, generator=g) for _ in range(-(-need // n))]
    return torch.cat(perms)[:need].view(steps, batch_size)


def _attach_lora(model: nn.Module, cfg: Config):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=LORA_DROPOUT,
                      target_modules=LORA_TARGETS, bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5: noise for users
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lcfg)
    except ValueError as e:
        raise SelpruneError(f"could not attach LoRA adapters to {type(model).__name__} ({e}); "
                            "set lora_targets to the names of its projections") from e


def _adamw(params: list[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per device where torch has one (CPU, CUDA, MPS).

    The update is the same algorithm; on the CPU the fused kernel takes a third of the
    time of the default one over the 135M parameters of the embedded model, which is a
    quarter of a retraining step's time. Falls back to the default implementation where
    fusing is not supported (other devices or dtypes)."""
    kwargs = dict(lr=cfg.retrain_lr, weight_decay=WEIGHT_DECAY)
    if all(p.device.type in ("cpu", "cuda", "mps") and p.is_floating_point() for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kwargs)


def _evaluate_both(model: nn.Module, data: Data, cfg: Config, progress: bool) -> dict[str, dict[str, float]]:
    model.eval()
    return evaluate_both(model, data, cfg.batch_size, progress)


def retrain(model: nn.Module, masks: Masks | None, sites: NeuronSites | None, data: Data, cfg: Config,
            progress: bool = True, train: torch.Tensor | None = None) -> Curve:
    """Fine-tune `model` **in place** on `train` windows (default `data.forget_train`) with
    AdamW; evaluate forget and
    retain (on `data.forget_test` / `data.retain_test`, with the skip sets) at
    `log_schedule(cfg.retrain_steps)`. Returns one record per evaluation:
    `{step, tokens, forget: {...}, retain: {...}, train_loss, seconds: {train, eval}}`.

    `masks` (e.g. `pruner.masks`; None for an unpruned model) says which neurons are
    pruned, for `cfg.retrain_hold_pruned`: their output-projection columns are zeroed now, their
    gradients are zeroed by a hook, and they are zeroed again after every optimizer step,
    because AdamW's momentum or any other gradient path could otherwise move them. `tokens`
    counts every position of every training window fed so far; `train_loss` is the mean
    training loss over the steps since the previous record (None at step 0).

    LoRA mode attaches fresh adapters, trains only them, and merges them into the weights
    at the end, so `model` is again a plain transformers model (and `sites` stay valid).
    Each step runs in train mode (dropout on, if the model has any), each evaluation in
    eval mode; the model is left in eval mode. The caller's RNG state is left untouched.
    """
    require_causal(model, "relearning (the next-token loss)")
    windows = _train_windows(data.forget_train if train is None else train, cfg)  # [n, retrain_window]
    if masks is not None and sites is None:
        sites = find_sites(model)
    schedule = set(log_schedule(cfg.retrain_steps))
    order = _batch_order(len(windows), cfg.retrain_batch, cfg.retrain_steps, cfg.seed)  # [steps, batch]
    device = next(model.parameters()).device
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    lora = cfg.retrain_mode == "lora"
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
            held = _held_params(model, masks, sites, lora) if cfg.retrain_hold_pruned and masks is not None else []
            for h in held:
                h.zero()
                handles.append(h.param.register_hook(h.grad_hook))
            opt = _adamw(params, cfg)
            curve = _train_loop(model, windows, order, schedule, params, held, opt, data, cfg, progress)
            ok = True
        finally:
            for hd in handles:
                hd.remove()
            if peft_model is not None:  # merge the trained adapters into the weights; after a failure, drop them
                peft_model.merge_and_unload() if ok else peft_model.unload()
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)
            model.eval()
    return curve


def _train_loop(model: nn.Module, windows: torch.Tensor, order: torch.Tensor, schedule: set[int],
                params: list[nn.Parameter], held: list[_Held], opt: torch.optim.Optimizer, data: Data,
                cfg: Config, progress: bool) -> Curve:
    device = next(model.parameters()).device
    per_step = cfg.retrain_batch * windows.shape[1]  # tokens fed per step
    t = time.perf_counter()
    curve = [{"step": 0, "tokens": 0, **_evaluate_both(model, data, cfg, progress), "train_loss": None,
              "seconds": {"train": 0.0, "eval": time.perf_counter() - t}}]
    losses: list[float] = []
    t_train = 0.0
    for step in tqdm(range(1, cfg.retrain_steps + 1), desc="retrain", disable=not progress, leave=False):
        t = time.perf_counter()
        model.train()
        ids = windows[order[step - 1]].to(device)  # [batch, window]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [batch, window-1, vocab]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise SelpruneError(f"retrain loss became {loss.item()} at step {step}; lower retrain_lr (now {cfg.retrain_lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
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


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model's weights back as they were when the block ends (a snapshot of its
    state: one copy of the weights, on their device), in eval mode."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield model
    finally:
        with torch.no_grad():
            model.load_state_dict(snapshot)
        model.eval()
