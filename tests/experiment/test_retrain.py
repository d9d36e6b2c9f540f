"""Fine-tuning a pruned model on forget text (selprune/experiment/retrain.py).

On tiny random-init Llamas and GPT-2s (no downloads; GPT-2 has transposed Conv1D
projections and dropout), where the claims that matter are exact: held neurons stay
bit-for-bit zero, LoRA touches nothing but low-rank deltas on its targets, and a seeded
run repeats bit-for-bit on the CPU. The retraining parameters are the schema's
(`retrain_*`, `lora_*`); a bad value is refused by `validate`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import pattern_data, random_masks, tiny_model  # sets torch to one thread

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment import retrain as retrain_module
from selprune.experiment.config import Config, validate
from selprune.experiment.retrain import retrain
from selprune.prune import Pruner
from selprune.sites import find_sites, weight_out_in

WINDOW = 16


def config(**retrain_params) -> Config:
    """A valid Config for the tiny data: windows of WINDOW tokens, 4 windows per step."""
    cfg = Config(window=WINDOW, retrain_window=WINDOW, retrain_batch=4, batch_size=8, **retrain_params)
    validate(cfg)
    return cfg


def make_data(n: int = 8) -> Data:
    return pattern_data(WINDOW, n)


def pruned_tiny(ablation_values: bool = True, arch: str = "llama") -> tuple[torch.nn.Module, Pruner]:
    """A tiny model with a quarter of FF and attention neurons pruned (FF mean-ablated:
    the pruner gives Llama's down_proj a bias)."""
    model = tiny_model(arch)
    pruner = Pruner(model)
    masks = random_masks(pruner.sites)
    values = torch.randn(pruner.sites.shape("ff")) if ablation_values else None
    pruner.prune("ff", masks["ff"], values)
    pruner.prune("attn", masks["attn"])
    return model, pruner


def pruned_columns(pruner: Pruner) -> list[torch.Tensor]:
    """The pruned input columns of every output projection, `[out, n_pruned]` each."""
    out = []
    for kind in ("ff", "attn"):
        for layer, m in enumerate(pruner.sites.modules(kind)):
            idx = pruner.masks[kind][layer].reshape(-1).nonzero().squeeze(1)
            out.append(weight_out_in(m)[:, idx])
    return out


def strip_seconds(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in curve]


# --------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize("change, message", [
    ({"retrain_steps": 0}, r"retrain_steps=0 is below 1"),
    ({"retrain_lr": 0.0}, r"retrain_lr=0.0 must be a positive number; e.g. 1e-5"),
    ({"retrain_lr": -1e-3}, r"retrain_lr=-0.001 must be a positive number"),
    ({"retrain_lr": math.nan}, r"retrain_lr=nan must be a positive number"),
    ({"retrain_batch": 0}, r"retrain_batch=0 is below 1"),
    ({"retrain_window": 1}, r"retrain_window=1 is below 2 \(one input and one target token\)"),
    ({"retrain_window": WINDOW + 1}, rf"retrain_window={WINDOW + 1} is longer than window \({WINDOW}\); lower it"),
    ({"retrain_mode": "qlora"}, r"retrain_mode='qlora' is not one of full, lora; pick one of those"),
    ({"lora_r": 0}, r"lora_r=0 is below 1"),
    ({"lora_alpha": 0.0}, r"lora_alpha=0.0 must be a positive number"),
])
def test_bad_retraining_parameters_are_refused(change: dict, message: str) -> None:
    cfg = Config(window=WINDOW, retrain_window=WINDOW).replace(**change)
    with pytest.raises(SelpruneError, match=message):
        validate(cfg, relearn=True)  # work that retrains: every retraining rule applies


def test_a_window_longer_than_the_data_is_refused() -> None:
    """The schema allows retrain_window up to `window`; data made with shorter windows
    cannot feed it."""
    cfg = Config(window=2 * WINDOW, retrain_window=2 * WINDOW, retrain_steps=1)
    validate(cfg)
    with pytest.raises(SelpruneError, match=rf"retrain_window={2 * WINDOW} is longer than the data's windows "
                                            rf"\({WINDOW}\); lower it"):
        retrain(tiny_model("llama"), None, None, make_data(), cfg, progress=False)


# ------------------------------------------------------------------- held or regrown
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("hold", [True, False])
def test_hold_pruned_keeps_columns_zero_under_adamw_weight_decay(hold: bool, arch: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the strongest pull on the pruned weights: decoupled decay and no gradient clipping
    monkeypatch.setattr(retrain_module, "WEIGHT_DECAY", 0.1)
    monkeypatch.setattr(retrain_module, "MAX_GRAD_NORM", math.inf)
    model, pruner = pruned_tiny(arch=arch)
    bias_before = pruner.sites.ff[0].bias.detach().clone()
    cfg = config(retrain_steps=4, retrain_lr=1e-2, retrain_hold_pruned=hold)
    retrain(model, pruner.masks, pruner.sites, make_data(), cfg, progress=False)
    cols = pruned_columns(pruner)
    if hold:
        assert all(bool((c == 0).all()) for c in cols)
    else:
        assert all(bool((c != 0).any()) for c in cols)
    # the mean-ablation bias trains like any bias (it is shared by the projection's neurons)
    assert not torch.equal(pruner.sites.ff[0].bias, bias_before)


def test_hold_pruned_is_the_default_and_holds_with_the_protocol_constants() -> None:
    model, pruner = pruned_tiny()
    cfg = config(retrain_steps=4, retrain_lr=1e-2)
    assert cfg.retrain_hold_pruned is True and cfg.retrain_mode == "full"
    retrain(model, pruner.masks, pruner.sites, make_data(), cfg, progress=False)
    assert all(bool((c == 0).all()) for c in pruned_columns(pruner))


# ----------------------------------------------------------------------------- LoRA
def test_lora_changes_only_low_rank_deltas_and_holds_pruned() -> None:
    model, pruner = pruned_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(retrain_steps=3, retrain_lr=1e-2, retrain_mode="lora", lora_r=2, lora_alpha=4.0)
    curve = retrain(model, pruner.masks, pruner.sites, make_data(), cfg, progress=False)
    assert [r["step"] for r in curve] == [0, 1, 2, 3]
    after = dict(model.named_parameters())
    assert set(after) == set(before), "adapters were not merged away"
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    assert all(p.requires_grad for p in after.values()), "requires_grad flags not restored"
    changed = set()
    for name, p in after.items():
        delta = (p.detach() - before[name]).double()
        if torch.equal(p, before[name]):
            continue
        changed.add(name)
        assert name.endswith("proj.weight"), f"{name} changed, but only adapter targets may"
        assert torch.linalg.matrix_rank(delta, rtol=1e-5) <= 2  # rtol: fp32 rounding of W + B @ A
    assert any("o_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert all(bool((c == 0).all()) for c in pruned_columns(pruner))
    # the pruner's modules are still the model's: merging put the original layers back
    assert pruner.sites.ff[0] is model.model.layers[0].mlp.down_proj


def test_full_fine_tuning_changes_more_than_low_rank_deltas() -> None:
    """retrain_mode is read: the default (full) trains every weight, at full rank."""
    model, pruner = pruned_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    retrain(model, pruner.masks, pruner.sites, make_data(), config(retrain_steps=3, retrain_lr=1e-2), progress=False)
    after = dict(model.named_parameters())
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    delta = (after["model.layers.0.mlp.up_proj.weight"].detach() - before["model.layers.0.mlp.up_proj.weight"]).double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-5) > 2


def test_lora_without_hold_lets_pruned_neurons_regrow() -> None:
    model, pruner = pruned_tiny()
    cfg = config(retrain_steps=2, retrain_lr=1e-2, retrain_mode="lora", lora_r=2, retrain_hold_pruned=False)
    retrain(model, pruner.masks, pruner.sites, make_data(), cfg, progress=False)
    assert all(bool((c != 0).any()) for c in pruned_columns(pruner))


# ------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_retrain_is_bit_identical_for_a_seed(arch: str) -> None:
    model, pruner = pruned_tiny(arch=arch)
    data = make_data()
    cfg = config(retrain_steps=4, retrain_lr=1e-3)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        curve = retrain(m, pruner.masks, find_sites(m), data, cfg, progress=False)
        runs.append((strip_seconds(curve), m.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    m = copy.deepcopy(model)  # another seed, another data order
    other = retrain(m, pruner.masks, find_sites(m), data, cfg.replace(seed=1), progress=False)
    assert strip_seconds(other) != runs[0][0]


# ------------------------------------------------------------------------ the loop
def test_retrain_lowers_forget_loss_in_train_and_eval_modes() -> None:
    model, data = tiny_model("llama"), make_data()
    modes: list[tuple[bool, int]] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: modes.append((m.training, kwargs["input_ids"].shape[0])),
                                    with_kwargs=True)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    cfg = config(retrain_steps=16, retrain_lr=3e-3).replace(retrain_batch=2, batch_size=4)
    curve = retrain(model, None, None, data, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before), "retrain disturbed the caller's RNG"
    assert [r["step"] for r in curve] == [0, 1, 2, 4, 8, 16]
    assert [r["tokens"] for r in curve] == [s * 2 * WINDOW for s in (0, 1, 2, 4, 8, 16)]
    assert curve[0]["train_loss"] is None and curve[-1]["train_loss"] < curve[1]["train_loss"]
    assert curve[-1]["forget"]["loss"] < 0.8 * curve[0]["forget"]["loss"]
    assert curve[-1]["forget"]["top1"] > curve[0]["forget"]["top1"]
    assert sum(1 for t, b in modes if t and b == 2) == 16  # every training step in train mode
    assert all(not t for t, b in modes if b == 4)  # every evaluation in eval mode, batch_size windows
    assert not model.training


def test_retrain_runs_in_bf16() -> None:
    model, pruner = pruned_tiny(ablation_values=False)
    model.to(torch.bfloat16)
    curve = retrain(model, pruner.masks, pruner.sites, make_data(), config(retrain_steps=2, retrain_lr=1e-2),
                    progress=False)
    assert all(math.isfinite(r["forget"]["loss"]) for r in curve)
    assert model.dtype == torch.bfloat16
    assert all(bool((c == 0).all()) for c in pruned_columns(pruner))
