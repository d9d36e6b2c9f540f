"""Removing neurons: zero, mean or peak ablation, reversible, and exportable.

Removing neuron j of a projection y = W x + b means its contribution W[:, j] x_j goes:
- zero ablation: zero column j of W (the reference behaviour);
- mean / peak ablation: replace x_j by a constant c (its mean or mode on the retain set):
  zero column j and add c * W[:, j] to the bias. A projection without a bias (Llama,
  Gemma, SmolLM) gets one.
The original columns and biases are kept, so `restore()` gives bit-identical weights.
The bias offset is accumulated in float64 and written as original + offset, so many
small steps in bf16 do not pile up rounding error.

A model sharded by accelerate's `device_map` is pruned in place on each projection's own
device. A model whose weights accelerate *offloads* (to the CPU or disk, loaded only for
the duration of each forward pass) is refused: between passes its weights are on the meta
device, so there is nothing to write into, and a write into accelerate's offload store
would depend on its internals (lost outright for disk offload).

Definitions: docs/method.md, "Pruning (ablation)".
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune.errors import SelpruneError
from selprune.models import float64_device
from selprune.paths import atomic_write_bytes, atomic_write_json
from selprune.sites import KINDS, NeuronSites, find_sites, out_features, weight_out_in
from selprune.stats import ActivationStats

# ablation name -> the constant each removed neuron is replaced by (None: zero)
ABLATIONS: dict[str, Callable[[ActivationStats, str], torch.Tensor] | None] = {
    "zero": None,
    "mean": lambda stats, kind: stats.mean(kind),
    "peak": lambda stats, kind: stats.peak(kind),
}


def ablation_values(ablation: str, stats: ActivationStats | None, kind: str) -> torch.Tensor | None:
    """The constants for `ablation` from the (retain) statistics, or None for zero ablation."""
    if ablation not in ABLATIONS:
        raise SelpruneError(f"unknown ablation {ablation!r}; use one of {sorted(ABLATIONS)}")
    fn = ABLATIONS[ablation]
    if fn is None:
        return None
    if stats is None:
        raise SelpruneError(f"{ablation} ablation needs statistics of the retain set")
    return fn(stats, kind)


class Pruner:
    """Prunes neurons of a model in place, remembering how to undo it.

    `masks[kind]` is the bool mask of pruned neurons (ff `[n_layers, d_mlp]`,
    attn `[n_layers, n_heads, d_head]`).
    """

    def __init__(self, model: nn.Module, sites: NeuronSites | None = None) -> None:
        self.model = model
        self.sites = sites or find_sites(model)
        for kind in KINDS:
            _check_resident(self.sites.modules(kind), kind)
        self.masks = {k: torch.zeros(self.sites.shape(k), dtype=torch.bool) for k in KINDS}
        self._columns: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (module, idx, original cols)
        self._bias: dict[nn.Module, tuple[torch.Tensor | None, torch.Tensor]] = {}  # module -> (orig, offset f64)

    @property
    def added_bias(self) -> dict[str, bool]:
        """Per kind: whether pruning gave a bias to a projection that had none."""
        out = {k: False for k in KINDS}
        for k in KINDS:
            for m in self.sites.modules(k):
                if m in self._bias and self._bias[m][0] is None:
                    out[k] = True
        return out

    def fraction(self, kind: str) -> float:
        m = self.masks[kind]
        return int(m.sum()) / m.numel()  # exact (a float32 mean gives 0.1458333283... for 14/96)

    def prune(self, kind: str, new: torch.Tensor, values: torch.Tensor | None = None) -> int:
        """Prune the neurons in `new` (bool, neuron shape). `values` (neuron shape): the
        constants of mean/peak ablation; None zero-ablates. Returns how many were pruned."""
        if tuple(new.shape) != tuple(self.masks[kind].shape):  # before `&`, which would broadcast
            raise SelpruneError(f"{kind} mask has shape {tuple(new.shape)}, expected {tuple(self.masks[kind].shape)}")
        if values is not None and tuple(values.shape) != tuple(self.masks[kind].shape):
            raise SelpruneError(f"{kind} ablation values have shape {tuple(values.shape)}, expected {tuple(self.masks[kind].shape)}")
        new = new.bool().cpu() & ~self.masks[kind]
        _check_resident(self.sites.modules(kind), kind)  # before any write: all or nothing
        with torch.no_grad():
            for layer, module in enumerate(self.sites.modules(kind)):
                idx = new[layer].reshape(-1).nonzero().squeeze(1)  # [n_new]
                if idx.numel() == 0:
                    continue
                w = weight_out_in(module)  # [out, in] view
                idx = idx.to(w.device)
                cols = w[:, idx].clone()  # [out, n_new]
                self._columns.append((module, idx, cols))
                if values is not None:
                    f64 = float64_device(w.device)  # w.device itself, except on MPS (no float64)
                    c = values[layer].reshape(-1)[idx.cpu()].to(f64, torch.float64)  # [n_new]
                    self._add_bias(module, cols.to(f64).double() @ c)
                w[:, idx] = 0
        self.masks[kind] |= new
        return int(new.sum())

    def _add_bias(self, module: nn.Module, delta: torch.Tensor) -> None:
        w = module.weight
        if module not in self._bias:
            orig = None if module.bias is None else module.bias.data.clone()
            offset = torch.zeros(out_features(module), dtype=torch.float64, device=float64_device(w.device))
            self._bias[module] = (orig, offset)
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros(out_features(module), dtype=w.dtype, device=w.device))
        orig, offset = self._bias[module]
        offset += delta
        base = torch.zeros_like(offset) if orig is None else orig.to(offset.device).double()
        module.bias.data.copy_((base + offset).to(module.bias.dtype))

    def restore(self) -> None:
        """Undo every pruning step: weights and biases return bit-identical."""
        with torch.no_grad():
            for module, idx, cols in reversed(self._columns):
                weight_out_in(module)[:, idx] = cols
            for module, (orig, _) in self._bias.items():
                if orig is None:
                    module.bias = None
                else:
                    module.bias.data.copy_(orig)
        self._columns.clear()
        self._bias.clear()
        self.masks = {k: torch.zeros_like(m) for k, m in self.masks.items()}

    def save_masks(self, path: str | Path) -> None:
        atomic_write_bytes(path, save({k: m.to(torch.uint8) for k, m in self.masks.items()}))


def _check_resident(modules: list[nn.Module], kind: str) -> None:
    """Refuse projections whose weights accelerate has offloaded (meta between passes)."""
    for layer, module in enumerate(modules):
        if module.weight.device.type == "meta":
            raise SelpruneError(
                f"the {kind} output projection of layer {layer} has its weights offloaded by accelerate "
                "(a device_map entry 'disk', or 'cpu' on a machine with a GPU, or cpu_offload/disk_offload): "
                "they live on the meta device between forward passes, so pruning cannot write into them. "
                "Load the model with every layer resident: device_map='auto' over enough GPUs (check "
                "model.hf_device_map for 'cpu'/'disk' entries; max_memory sets each GPU's share), or "
                "device='cuda'/'cpu' without device_map"
            )


# ------------------------------------------------------------------------------ export
def _bias_params_expected(model: nn.Module, config) -> set[str]:
    """Parameter names a fresh model of this class would have under `config` (built on
    the meta device: no memory, no weights)."""
    with torch.device("meta"):
        fresh = type(model)(config)
    return {n for n, _ in fresh.named_parameters()}


def export_pruned(model: nn.Module, pruner: Pruner, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Save the pruned model as a complete Hugging Face model directory: weights, config,
    generation config and `tokenizer`, so that plain transformers (`from_pretrained`,
    `pipeline`) and selprune itself (`load_model`, to prune further or retrain) load it.
    Written to a temporary sibling folder and renamed into place when complete.

    Zero ablation needs nothing special. Mean/peak ablation on a bias-less architecture
    turns on the config flag that gives its projections biases (e.g. Llama's
    `attention_bias`, `mlp_bias`) and writes zero biases for the sibling projections the
    flag also creates.
    """
    out_dir = Path(out_dir)
    flags = {}
    for kind, added in pruner.added_bias.items():
        if not added:
            continue
        arch = pruner.sites.arch
        flag = arch.bias_flags.get(kind) if arch else None
        if flag is None:
            raise SelpruneError(
                f"mean/peak ablation gave the {kind} output projections of {pruner.sites.model_type!r} a bias, "
                "but transformers' class for this architecture has no config flag to load one; export with "
                "ablation='zero', or register the flag in selprune.sites.ARCHITECTURES"
            )
        flags[flag] = True
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export: start clean
    try:
        with _flags_set(model, flags) as state:
            model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        pruner.save_masks(tmp / "selprune_masks.safetensors")
        atomic_write_json(tmp / "selprune_pruning.json", {k: int(m.sum()) for k, m in pruner.masks.items()})
    except BaseException:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


@contextmanager
def _flags_set(model: nn.Module, flags: dict[str, bool]) -> Iterator[dict[str, torch.Tensor]]:
    """The model's state to save, with zero biases for the sibling projections that the
    bias `flags` add; the flags are set in its config meanwhile, then put back."""
    config = model.config
    state = dict(model.state_dict())
    old = {f: getattr(config, f, None) for f in flags}
    try:
        for f in flags:
            setattr(config, f, True)
        if flags:
            for name in sorted(_bias_params_expected(model, config) - set(state)):
                if not name.endswith(".bias"):
                    raise SelpruneError(f"export: the flags {sorted(flags)} also add {name}, which cannot be zero-filled")
                weight = state[name[: -len("bias")] + "weight"]
                state[name] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        yield state
    finally:
        for f, v in old.items():
            setattr(config, f, v)


def masks_summary(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Pruned neurons per layer, per kind (for the step records)."""
    return {k: m.reshape(m.shape[0], -1).sum(1).tolist() for k, m in masks.items()}


