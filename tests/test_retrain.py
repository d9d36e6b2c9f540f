"""Retraining and the anamnesia index (selprune.retrain).

The index arithmetic is checked on synthetic curves with answers worked out by hand; the
training loop on tiny random-init Llamas and GPT-2s (no downloads; GPT-2 has transposed
Conv1D projections and dropout), where the claims that matter are exact: held neurons
stay bit-for-bit zero, LoRA touches nothing but low-rank deltas on its targets, and a
seeded run repeats bit-for-bit on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import VOCAB, tiny_model  # noqa: E402  (sets torch to one thread)

from selprune.errors import SelpruneError  # noqa: E402
from selprune.loop import Data, PruneConfig, run_pruning  # noqa: E402
from selprune.prune import Pruner  # noqa: E402
from selprune.retrain import (  # noqa: E402
    RetrainConfig,
    anamnesia_experiment,
    anamnesia_from_runs,
    anamnesia_index,
    log_schedule,
    match_random_step,
    recovery_auc,
    replay_run,
    retrain,
)
from selprune.sites import find_sites, weight_out_in  # noqa: E402
from selprune.texts import top_tokens  # noqa: E402

WINDOW = 16


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    return tiny_model("llama", seed)


def make_data(n: int = 8) -> Data:
    """Forget: a repetitive sequence (period 7) that a tiny model learns in a few steps;
    retain: random tokens."""
    g = torch.Generator().manual_seed(1)

    def pattern(starts: torch.Tensor) -> torch.Tensor:
        return (starts[:, None] + torch.arange(WINDOW)) % 7 + 1  # [n, window]

    d = Data(
        forget_train=pattern(torch.randint(0, 7, (n,), generator=g)),
        retain_train=torch.randint(0, VOCAB, (n, WINDOW), generator=g),
        forget_test=pattern(torch.arange(4)),
        retain_test=torch.randint(0, VOCAB, (4, WINDOW), generator=g),
    )
    d.skip = {"forget": top_tokens(d.forget_train, 3), "retain": top_tokens(d.retain_train, 3)}
    return d


def random_masks(sites, frac: float = 0.25, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(sites.shape(k), generator=g) < frac for k in ("ff", "attn")}


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


# ------------------------------------------------------------------------------ schedule
def test_log_schedule() -> None:
    assert log_schedule(1) == [0, 1]
    assert log_schedule(8) == [0, 1, 2, 4, 8]
    assert log_schedule(10) == [0, 1, 2, 4, 8, 10]
    assert log_schedule(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(SelpruneError, match="at least 1"):
        log_schedule(0)


# ------------------------------------------------------------------------- index and AUC
BASE, PRUNED = 0.6, 0.2


def curve_from(fracs: dict[int, float], tokens_per_step: int = 32) -> list[dict]:
    """Records whose forget top-1 has regained `fracs[step]` of BASE - PRUNED."""
    return [{"step": s, "tokens": s * tokens_per_step, "forget": {"top1": PRUNED + f * (BASE - PRUNED)}}
            for s, f in sorted(fracs.items())]


def test_index_interpolates_between_bracketing_evaluations() -> None:
    # linear recovery, 10% per step, capped at full: evaluated at 0, 1, 2, 4, 8, 16
    curve = curve_from({s: min(s / 10, 1.0) for s in log_schedule(16)})
    idx = anamnesia_index(curve, BASE, PRUNED)
    assert idx["note"] is None and idx["removed"] == pytest.approx(0.4)
    half, ninety = idx["thresholds"]["0.5"], idx["thresholds"]["0.9"]
    # 50%: between step 4 (0.4) and step 8 (0.8) -> 4 + 0.1 / 0.4 * 4 = 5
    assert half["step"] == pytest.approx(5.0) and half["tokens"] == pytest.approx(160.0)
    assert half["target"] == pytest.approx(0.4)
    # 90%: between step 8 (0.8) and step 16 (1.0) -> 8 + 0.1 / 0.2 * 8 = 12 (in step count, not the true 9)
    assert ninety["step"] == pytest.approx(12.0) and ninety["tokens"] == pytest.approx(384.0)


def test_index_threshold_met_at_first_evaluation_and_exactly_at_one() -> None:
    curve = curve_from({0: 0.6, 1: 0.7, 2: 1.0})
    idx = anamnesia_index(curve, BASE, PRUNED, fractions=(0.5, 1.0))
    assert idx["thresholds"]["0.5"]["step"] == 0
    assert idx["thresholds"]["1"]["step"] == pytest.approx(2.0)


def test_index_not_reached() -> None:
    curve = curve_from({0: 0.0, 1: 0.1, 2: 0.3, 4: 0.2})
    idx = anamnesia_index(curve, BASE, PRUNED)
    for q in ("0.5", "0.9"):
        assert idx["thresholds"][q]["step"] is None and idx["thresholds"][q]["tokens"] is None
        assert "not reached within 4 steps" in idx["thresholds"][q]["note"]


@pytest.mark.parametrize("pruned", [BASE, BASE + 0.1])
def test_index_when_pruning_removed_nothing(pruned: float) -> None:
    curve = [{"step": s, "tokens": s, "forget": {"top1": BASE}} for s in (0, 1, 2)]
    idx = anamnesia_index(curve, BASE, pruned)
    assert idx["thresholds"]["0.5"]["step"] == 0 and idx["thresholds"]["0.9"]["step"] == 0
    assert "nothing to recover" in idx["note"]
    assert idx["recovery_auc"] == 1.0 and math.isfinite(idx["removed"])


def test_index_rejects_bad_input() -> None:
    with pytest.raises(SelpruneError, match="outside"):
        anamnesia_index(curve_from({0: 0.0, 1: 1.0}), BASE, PRUNED, fractions=(1.5,))
    with pytest.raises(SelpruneError, match="empty"):
        anamnesia_index([], BASE, PRUNED)
    with pytest.raises(SelpruneError, match="increase"):
        anamnesia_index(curve_from({0: 0.0, 1: 1.0})[::-1], BASE, PRUNED)


def test_recovery_auc_known_areas() -> None:
    linear = curve_from({s: s / 16 for s in log_schedule(16)})  # trapezoid is exact on a line
    assert recovery_auc(linear, BASE, PRUNED) == pytest.approx(0.5)
    # full at step 4, held to 16: 0.5 * 4 + 12 = 14 over 16 steps; overshoot above base clips to 1
    assert recovery_auc(curve_from({0: 0.0, 4: 1.0, 16: 1.5}), BASE, PRUNED) == pytest.approx(14 / 16)
    assert recovery_auc(curve_from({0: 1.0, 8: 1.0}), BASE, PRUNED) == pytest.approx(1.0)
    # below the pruned level clips to 0
    assert recovery_auc(curve_from({0: 0.0, 2: -0.5, 8: 0.0}), BASE, PRUNED) == pytest.approx(0.0)


def test_match_random_step() -> None:
    def recs(retain: list[float]) -> list[dict]:
        return [{"step": i, "retain": {"top1": r}} for i, r in enumerate(retain)]

    selective = recs([0.5, 0.48, 0.45])  # last step: 10% relative retain drop
    random = recs([0.5, 0.49, 0.46, 0.44, 0.40])  # drops 0, 2, 8, 12, 20%: 8% and 12% tie
    assert match_random_step(selective, random) == 2  # tie goes to the earlier step
    assert match_random_step(selective, random, selective_step=1) == 1  # 4% -> 2%
    with pytest.raises(SelpruneError, match="not among"):
        match_random_step(selective, random, selective_step=7)
    # no retain damage at all: the control is still a pruned model (step 1), not step 0
    assert match_random_step(recs([0.5, 0.51]), random) == 1


# ------------------------------------------------------------------------------ training
def test_bad_config_is_refused() -> None:
    model, data = tiny_llama(), make_data()
    for cfg, msg in [(RetrainConfig(steps=0), "steps=0"), (RetrainConfig(lr=0.0), "lr=0.0"),
                     (RetrainConfig(lr=-1e-3), "learning rate"), (RetrainConfig(mode="qlora"), "unknown retrain mode"),
                     (RetrainConfig(window=WINDOW + 1), "longer than the data")]:
        with pytest.raises(SelpruneError, match=msg):
            retrain(model, None, None, data, cfg, progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("hold", [True, False])
def test_hold_pruned_keeps_columns_zero_under_adamw_weight_decay(hold: bool, arch: str) -> None:
    model, pruner = pruned_tiny(arch=arch)
    bias_before = pruner.sites.ff[0].bias.detach().clone()
    cfg = RetrainConfig(steps=4, lr=1e-2, weight_decay=0.1, hold_pruned=hold, max_grad_norm=None)
    retrain(model, pruner.masks, pruner.sites, make_data(), cfg, progress=False)
    cols = pruned_columns(pruner)
    if hold:
        assert all(bool((c == 0).all()) for c in cols)
    else:
        assert all(bool((c != 0).any()) for c in cols)
    # the mean-ablation bias trains like any bias (it is shared by the projection's neurons)
    assert not torch.equal(pruner.sites.ff[0].bias, bias_before)


def test_lora_changes_only_low_rank_deltas_and_holds_pruned() -> None:
    model, pruner = pruned_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = RetrainConfig(steps=3, lr=1e-2, mode="lora", lora_r=2, lora_alpha=4.0)
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


def test_lora_without_hold_lets_pruned_neurons_regrow() -> None:
    model, pruner = pruned_tiny()
    cfg = RetrainConfig(steps=2, lr=1e-2, mode="lora", lora_r=2, hold_pruned=False)
    retrain(model, pruner.masks, pruner.sites, make_data(), cfg, progress=False)
    assert all(bool((c != 0).any()) for c in pruned_columns(pruner))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_retrain_is_bit_identical_for_a_seed(arch: str) -> None:
    model, pruner = pruned_tiny(arch=arch)
    data = make_data()
    cfg = RetrainConfig(steps=4, lr=1e-3, weight_decay=0.01)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        curve = retrain(m, pruner.masks, find_sites(m), data, cfg, progress=False)
        runs.append((strip_seconds(curve), m.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    m = copy.deepcopy(model)  # another seed, another data order
    other = retrain(m, pruner.masks, find_sites(m), data, RetrainConfig(steps=4, lr=1e-3, seed=1), progress=False)
    assert strip_seconds(other) != runs[0][0]


def test_retrain_lowers_forget_loss_in_train_and_eval_modes() -> None:
    model, data = tiny_llama(), make_data()
    modes: list[tuple[bool, int]] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: modes.append((m.training, kwargs["input_ids"].shape[0])),
                                    with_kwargs=True)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    cfg = RetrainConfig(steps=16, lr=3e-3, batch_size=2, eval_batch_size=4)
    curve = retrain(model, None, None, data, cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before), "retrain disturbed the caller's RNG"
    assert [r["step"] for r in curve] == [0, 1, 2, 4, 8, 16]
    assert [r["tokens"] for r in curve] == [s * 2 * WINDOW for s in (0, 1, 2, 4, 8, 16)]
    assert curve[0]["train_loss"] is None and curve[-1]["train_loss"] < curve[1]["train_loss"]
    assert curve[-1]["forget"]["loss"] < 0.8 * curve[0]["forget"]["loss"]
    assert curve[-1]["forget"]["top1"] > curve[0]["forget"]["top1"]
    assert sum(1 for t, b in modes if t and b == 2) == 16  # every training step in train mode
    assert all(not t for t, b in modes if b == 4)  # every evaluation in eval mode
    assert not model.training


def test_retrain_runs_in_bf16() -> None:
    model, pruner = pruned_tiny(ablation_values=False)
    model.to(torch.bfloat16)
    curve = retrain(model, pruner.masks, pruner.sites, make_data(), RetrainConfig(steps=2, lr=1e-2), progress=False)
    assert all(math.isfinite(r["forget"]["loss"]) for r in curve)
    assert model.dtype == torch.bfloat16
    assert all(bool((c == 0).all()) for c in pruned_columns(pruner))


# ---------------------------------------------------------------------------- experiment
def test_experiment_arms_are_independent_and_matched() -> None:
    model, data = tiny_llama(), make_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    selective_records = [{"step": s, "retain": {"top1": r}} for s, r in enumerate([0.5, 0.45])]  # 10% drop
    random_records = [{"step": s, "retain": {"top1": r}} for s, r in enumerate([0.5, 0.49, 0.46, 0.40])]
    calls: list[tuple[str, int]] = []

    def builder(name: str, frac: float):
        def build(m, step):
            calls.append((name, step))
            pruner = Pruner(m)
            masks = random_masks(pruner.sites, frac * step, seed=step)
            for k in masks:
                pruner.prune(k, masks[k])
            return pruner.masks
        return build

    cfg = RetrainConfig(steps=2, lr=1e-3)
    out = anamnesia_experiment(model, data, cfg, selective_records, random_records,
                               builder("selective", 0.3), builder("random", 0.1), progress=False)
    assert calls == [("selective", 1), ("random", 2)]
    assert out["matching"]["random_step"] == 2 and out["matching"]["selective_step"] == 1
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the caller's model was modified"
    arms = out["arms"]
    assert set(arms) == {"unpruned", "selective", "random"}
    assert arms["unpruned"]["note"] and arms["unpruned"]["index"]["0.5"]["step"] == 0
    for arm in arms.values():
        assert [r["step"] for r in arm["curve"]] == [0, 1, 2]
        assert set(arm["index"]) == {"0.5", "0.9"} and 0 <= arm["recovery_auc"] <= 1
    # every arm started from the same fresh weights: the unpruned arm's step 0 is the model itself
    assert arms["unpruned"]["curve"][0]["forget"] == out["base"]["forget"]
    assert arms["selective"]["curve"][0]["forget"] != out["base"]["forget"]
    assert out["config"]["steps"] == 2 and arms["selective"]["pruned_fraction"]["ff"] > 0
    json.dumps(out, allow_nan=False)  # ready for results.json


def test_experiment_from_pruning_run_directories(tmp_path) -> None:
    model, data = tiny_llama(), make_data()
    base = dict(forget="f", retain="r", ff_frac=0.25, steps=2, window=WINDOW, collect_tokens=8 * WINDOW,
                eval_tokens=4 * WINDOW, batch_size=4, skip_k=3)
    pruned = {}
    for name, mode in (("ff", "iterative"), ("random", "random")):
        records, pruner = run_pruning(PruneConfig(**base, mode=mode), tmp_path / name, model, None, data, progress=False)
        pruned[name] = ({k: m.clone() for k, m in pruner.masks.items()},
                        {k: v.clone() for k, v in model.state_dict().items()})
        pruner.restore()
    m = copy.deepcopy(model)
    replayed = replay_run(m, tmp_path / "ff", 2)
    assert all(torch.equal(replayed.masks[k], pruned["ff"][0][k]) for k in replayed.masks)
    assert all(torch.equal(v, pruned["ff"][1][k]) for k, v in m.state_dict().items())
    with pytest.raises(SelpruneError, match="cannot replay step 3"):
        replay_run(copy.deepcopy(model), tmp_path / "ff", 3)
    out = anamnesia_from_runs(model, data, RetrainConfig(steps=1, lr=1e-3), tmp_path / "ff", tmp_path / "random",
                              progress=False)
    assert out["matching"]["selective_step"] == 2 and out["matching"]["random_step"] in (0, 1, 2)
    assert out["arms"]["selective"]["pruned_fraction"]["ff"] == pytest.approx(0.5)
