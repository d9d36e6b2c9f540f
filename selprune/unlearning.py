"""Gradient unlearning baselines: the losses of GA, GradDiff, NPO(+RT) and RMU, as data.

Method level only (no `Config`): each loss is a function of a model, token windows and
`Hyper`, and `METHODS` registers them with what they need (retain windows, a frozen
reference computed once before training) and the depth of their passes, so that the
orchestration (`selprune.experiment.baselines`) has no per-method branches. The exact
definitions, with citations, are in docs/method.md, "Gradient unlearning baselines".

Frozen quantities (NPO's reference log-probabilities, RMU's frozen retain activations and
its steering scale) are computed by `UnlearnMethod.prepare` from the *original* model
before its first update, forward only: the forget and retain windows are a fixed set, so
a frozen copy of the model would only ever recompute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from selprune.sites import decoder_blocks, find_sites

RMU_DEPTH = 7 / 32  # the paper steers layer 7 of zephyr-7b's 32: the same relative depth by default
RMU_COEFF_SCALE = 2.0  # auto steering coefficient: this many times the mean forget-token norm at the layer
RMU_SKIP_POSITIONS = 1  # RMU's losses leave out the first position of each window (the attention sink)
State = dict[str, torch.Tensor]  # what `prepare` computed once, indexed by window
Terms = dict[str, torch.Tensor]  # the loss's named terms (scalars), for the logs


@dataclass(frozen=True)
class Hyper:
    """The methods' hyperparameters; RMU's layer is resolved (see `rmu_layer_for`), its
    coefficient None until `prepare` measures it."""

    retain_weight: float = 1.0
    npo_beta: float = 0.1
    rmu_layer: int = 0
    rmu_coeff: float | None = None
    rmu_alpha: float = 100.0
    rmu_layers: int = 3
    seed: int = 0  # RMU's random direction


@dataclass(frozen=True)
class StepBatch:
    """One step's windows and their indices into the prepared state."""

    forget: torch.Tensor  # [batch, window] token ids
    forget_idx: torch.Tensor  # [batch] long: rows of the forget windows
    retain: torch.Tensor | None = None  # [batch, window]
    retain_idx: torch.Tensor | None = None  # [batch]


# ------------------------------------------------------------------------ building blocks
def token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every target position: `[batch, window-1]`, in float32."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [batch, window-1, vocab]
    return -nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all targets of the batch (a scalar)."""
    return -token_logprobs(model, ids).mean()


def sequence_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(window) = the sum of its next-token log-probabilities: `[batch]`."""
    return token_logprobs(model, ids).sum(1)


class _Stop(Exception):
    """Raised by the hook at RMU's layer: nothing above it is needed."""


def hidden_at(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after block `layer`: `[batch, window, d_model]`. The forward
    stops there (the blocks above and the LM head are never run)."""
    arch = find_sites(model).arch
    block = decoder_blocks(model, arch.ff_out if arch else None)[layer]
    box: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        box.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box[0]


def rmu_layer_for(n_layers: int) -> int:
    """The default RMU layer: the paper's relative depth (7 of 32), within the model."""
    return min(n_layers - 1, max(0, round(RMU_DEPTH * n_layers)))


def rmu_trained_layers(hp: Hyper) -> range:
    """Layers whose MLP output projection RMU updates: the `rmu_layers` up to its layer
    (fewer when the layer is near the bottom)."""
    return range(max(0, hp.rmu_layer - hp.rmu_layers + 1), hp.rmu_layer + 1)


def rmu_direction(d_model: int, seed: int) -> torch.Tensor:
    """The fixed unit vector u `[d_model]`: uniform [0, 1) coordinates, normalised (as the
    reference code draws it; it lies in the positive orthant, not a uniform direction)."""
    u = torch.rand(d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).float()


def _steered(h: torch.Tensor) -> torch.Tensor:
    """The positions RMU's losses see, in float32: `[batch, window-1, d_model]`."""
    return h[:, RMU_SKIP_POSITIONS:].float()


# ------------------------------------------------------------------------------- the losses
def ga_loss(model: nn.Module, b: StepBatch, state: State, hp: Hyper) -> tuple[torch.Tensor, Terms]:
    """Gradient ascent: minimise -NLL(forget)."""
    f = nll(model, b.forget)
    return -f, {"forget_nll": f}


def graddiff_loss(model: nn.Module, b: StepBatch, state: State, hp: Hyper) -> tuple[torch.Tensor, Terms]:
    """-NLL(forget) + retain_weight * NLL(retain)."""
    f, r = nll(model, b.forget), nll(model, b.retain)
    return -f + hp.retain_weight * r, {"forget_nll": f, "retain_nll": r}


def npo_loss(model: nn.Module, b: StepBatch, state: State, hp: Hyper) -> tuple[torch.Tensor, Terms]:
    """(2/beta) * mean over windows of log(1 + exp(beta * (log p(y) - log p_ref(y))))."""
    ratio = sequence_logprobs(model, b.forget) - state["ref_logp"][b.forget_idx]  # [batch]
    loss = (2 / hp.npo_beta) * nn.functional.softplus(hp.npo_beta * ratio).mean()
    return loss, {"npo": loss, "log_ratio": ratio.mean()}


def npo_rt_loss(model: nn.Module, b: StepBatch, state: State, hp: Hyper) -> tuple[torch.Tensor, Terms]:
    """NPO + retain_weight * NLL(retain)."""
    loss, terms = npo_loss(model, b, state, hp)
    r = nll(model, b.retain)
    return loss + hp.retain_weight * r, {**terms, "retain_nll": r}


def rmu_loss(model: nn.Module, b: StepBatch, state: State, hp: Hyper) -> tuple[torch.Tensor, Terms]:
    """mean((h(forget) - c u)^2) + alpha * mean((h(retain) - h_frozen(retain))^2) at the
    layer, means over positions (but the first) and coordinates."""
    target = state["coeff"] * state["direction"]  # [d_model]
    hf = _steered(hidden_at(model, b.forget, hp.rmu_layer))  # [batch, window-1, d_model]
    forget = (hf - target).pow(2).mean()
    hr = _steered(hidden_at(model, b.retain, hp.rmu_layer))
    retain = (hr - state["frozen_retain"][b.retain_idx]).pow(2).mean()
    return forget + hp.rmu_alpha * retain, {"forget_mse": forget, "retain_mse": retain}


# --------------------------------------------------------------------------- preparation
def _no_state(model: nn.Module, forget: torch.Tensor, retain: torch.Tensor, hp: Hyper, batch: int) -> State:
    return {}


@torch.no_grad()
def npo_prepare(model: nn.Module, forget: torch.Tensor, retain: torch.Tensor, hp: Hyper, batch: int) -> State:
    """The reference log-probability of every forget window, from the model as it is now."""
    device = next(model.parameters()).device
    ref = [sequence_logprobs(model, forget[i:i + batch].to(device)) for i in range(0, len(forget), batch)]
    return {"ref_logp": torch.cat(ref)}  # [n_forget] float32


@torch.no_grad()
def rmu_prepare(model: nn.Module, forget: torch.Tensor, retain: torch.Tensor, hp: Hyper, batch: int) -> State:
    """Frozen retain activations at the layer, the direction u and the coefficient c
    (given, or `RMU_COEFF_SCALE` x the mean forget-token norm at the layer)."""
    device = next(model.parameters()).device

    def acts(w: torch.Tensor) -> torch.Tensor:  # [n, window-1, d_model] float32
        return torch.cat([_steered(hidden_at(model, w[i:i + batch].to(device), hp.rmu_layer))
                          for i in range(0, len(w), batch)])

    frozen = acts(retain)
    coeff = hp.rmu_coeff
    if coeff is None:
        coeff = RMU_COEFF_SCALE * acts(forget).norm(dim=-1).mean().item()
    return {"frozen_retain": frozen, "direction": rmu_direction(frozen.shape[-1], hp.seed).to(device),
            "coeff": torch.tensor(float(coeff), device=device)}


def rmu_prepare_passes(hp: Hyper) -> tuple[bool, bool]:
    """(forget, retain) windows that `rmu_prepare` runs forward: forget only to measure c."""
    return hp.rmu_coeff is None, True


# ---------------------------------------------------------------------------- the registry
def _all_params(model: nn.Module, hp: Hyper) -> list[nn.Parameter]:
    return list(model.parameters())


def rmu_params(model: nn.Module, hp: Hyper) -> list[nn.Parameter]:
    """The weights of the MLP output projections of `rmu_trained_layers` (the reference
    code's choice: `param_ids=[6]`, the down projection, in zephyr's blocks)."""
    ff = find_sites(model).ff
    return [ff[layer].weight for layer in rmu_trained_layers(hp)]


def _full(hp: Hyper, n_layers: int) -> float:
    return 1.0


def rmu_forward_depth(hp: Hyper, n_layers: int) -> float:
    return (hp.rmu_layer + 1) / n_layers


def rmu_backward_depth(hp: Hyper, n_layers: int) -> float:
    return len(rmu_trained_layers(hp)) / n_layers


LossFn = Callable[[nn.Module, StepBatch, State, Hyper], tuple[torch.Tensor, Terms]]
PrepareFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Hyper, int], State]


@dataclass(frozen=True)
class UnlearnMethod:
    """A registered baseline. Depths are the fraction of the decoder blocks a pass runs
    through (forward) or back-propagates through (backward), for the compute count."""

    name: str
    loss: LossFn
    needs_retain: bool
    needs_reference: bool  # computes frozen quantities from the original model before training
    lr: float  # default learning rate (AdamW): measured on the embedded model (docs/method.md)
    description: str
    prepare: PrepareFn = _no_state
    prepare_passes: Callable[[Hyper], tuple[bool, bool]] = field(default=lambda hp: (False, False))
    params: Callable[[nn.Module, Hyper], list[nn.Parameter]] = _all_params
    uses_layer: bool = False  # reads `Hyper.rmu_layer` (checked against the model's layers)
    forward_depth: Callable[[Hyper, int], float] = _full
    backward_depth: Callable[[Hyper, int], float] = _full


METHODS: dict[str, UnlearnMethod] = {m.name: m for m in (
    UnlearnMethod("ga", ga_loss, False, False, 1e-4, "gradient ascent on forget text"),
    UnlearnMethod("graddiff", graddiff_loss, True, False, 1e-4,
                  "gradient ascent on forget plus retain_weight x the ordinary loss on retain"),
    UnlearnMethod("npo", npo_loss, False, True, 3e-4, "negative preference optimisation against the original model "
                  "(Zhang et al. 2024)", prepare=npo_prepare, prepare_passes=lambda hp: (True, False)),
    UnlearnMethod("npo_rt", npo_rt_loss, True, True, 3e-4, "NPO plus retain_weight x the ordinary loss on retain",
                  prepare=npo_prepare, prepare_passes=lambda hp: (True, False)),
    UnlearnMethod("rmu", rmu_loss, True, True, 5e-3, "steer forget activations at one layer to c x a random "
                  "direction, keep retain ones (Li et al. 2024)", prepare=rmu_prepare,
                  prepare_passes=rmu_prepare_passes, params=rmu_params, forward_depth=rmu_forward_depth,
                  backward_depth=rmu_backward_depth, uses_layer=True),
)}
