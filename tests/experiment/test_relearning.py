"""The relearning experiment (selprune/experiment/relearning.py): three arms retrained
alike, the random control matched on retain damage, from hand-made builders or from
pruning run directories; the schema's retraining parameters reach every arm."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import pattern_data, random_masks, tiny_model  # sets torch to one thread

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.config import Config, validate
from selprune.experiment.loop import run_pruning
from selprune.experiment.relearning import (
    CONTROL_TOLERANCE,
    RELEARN_DATA,
    anamnesia_experiment,
    anamnesia_from_runs,
    control_check,
    relearn,
    relearn_windows,
    replay_builder,
)
from selprune.prune import Pruner

WINDOW = 16



def config(**params) -> Config:
    """A valid Config for the tiny data (windows of WINDOW tokens)."""
    cfg = Config(**{"window": WINDOW, "retrain_window": WINDOW, "retrain_batch": 4, "batch_size": 8, **params})
    validate(cfg)
    return cfg


def make_data(n: int = 8) -> Data:
    return pattern_data(WINDOW, n)


SELECTIVE = [{"step": s, "retain": {"top1": r}} for s, r in enumerate([0.5, 0.45])]  # 10% retain drop
RANDOM = [{"step": s, "retain": {"top1": r}} for s, r in enumerate([0.5, 0.49, 0.46, 0.40])]  # 8% at step 2


def builder(name: str, frac: float, calls: list | None = None):
    """Prunes a random `frac * step` of FF and attention neurons (seeded by the step)."""
    def build(m, step):
        if calls is not None:
            calls.append((name, step))
        pruner = Pruner(m)
        masks = random_masks(pruner.sites, frac * step, seed=step)
        for k in masks:
            pruner.prune(k, masks[k])
        return pruner.masks
    return build


def experiment(cfg: Config, calls: list | None = None) -> dict:
    data = make_data()
    return anamnesia_experiment(tiny_model("llama"), data, cfg, SELECTIVE, RANDOM, builder("selective", 0.3, calls),
                                builder("random", 0.1, calls), data.forget_train, progress=False)


def test_experiment_arms_are_independent_and_matched() -> None:
    model, data = tiny_model("llama"), make_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[str, int]] = []
    out = anamnesia_experiment(model, data, config(retrain_steps=2, retrain_lr=1e-3), SELECTIVE, RANDOM,
                               builder("selective", 0.3, calls), builder("random", 0.1, calls), data.forget_train,
                               progress=False)
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
    assert out["config"]["retrain_steps"] == 2 and arms["selective"]["pruned_fraction"]["ff"] > 0
    json.dumps(out, allow_nan=False)  # ready for results.json


def _curves(out: dict) -> dict[str, list[dict]]:
    return {name: [{k: v for k, v in r.items() if k != "seconds"} for r in arm["curve"]]
            for name, arm in out["arms"].items()}


def test_hold_pruned_off_reaches_the_pruned_arms_only() -> None:
    """retrain_hold_pruned=False lets the pruned arms' neurons regrow (another curve); the
    unpruned arm has nothing to hold and retrains the same."""
    cfg = config(retrain_steps=4, retrain_lr=1e-2)
    held, free = experiment(cfg), experiment(cfg.replace(retrain_hold_pruned=False))
    assert (held["config"]["retrain_hold_pruned"], free["config"]["retrain_hold_pruned"]) == (True, False)
    h, f = _curves(held), _curves(free)
    assert h["unpruned"] == f["unpruned"]
    assert h["selective"][0] == f["selective"][0] and h["selective"][1:] != f["selective"][1:]
    assert h["random"][1:] != f["random"][1:]


def test_lora_mode_reaches_every_arm() -> None:
    cfg = config(retrain_steps=2, retrain_lr=1e-2)
    full, lora = experiment(cfg), experiment(cfg.replace(retrain_mode="lora", lora_r=2))
    assert (full["config"]["retrain_mode"], lora["config"]["retrain_mode"], lora["config"]["lora_r"]) == \
        ("full", "lora", 2)
    f, lo = _curves(full), _curves(lora)
    for arm in ("unpruned", "selective", "random"):
        assert f[arm][0] == lo[arm][0] and f[arm][1:] != lo[arm][1:], arm


# ------------------------------------------------------ from pruning run directories
@pytest.fixture(scope="module")
def pruning_runs(tmp_path_factory):
    """An `ff` and a `random` pruning run (2 steps of 25% FF) of one tiny Llama: the run
    directories, the unpruned model, and each run's masks and weights after step 2."""
    root = tmp_path_factory.mktemp("runs")
    model, data = tiny_model("llama"), make_data()
    cfg = config(ff_frac=0.25, steps=2, collect_tokens=8 * WINDOW, eval_tokens=4 * WINDOW, batch_size=4, skip_k=3)
    pruned = {}
    for run in ("ff", "random"):
        records, pruner = run_pruning(cfg, run, root / run, model, None, data, progress=False)
        assert len(records) == 3
        pruned[run] = ({k: m.clone() for k, m in pruner.masks.items()},
                       {k: v.clone() for k, v in model.state_dict().items()})
        pruner.restore()
    return root, model, pruned


def test_replay_builder_rebuilds_a_pruning_run_exactly(pruning_runs) -> None:
    root, model, pruned = pruning_runs
    m = copy.deepcopy(model)
    masks = replay_builder(root / "ff")(m, 2)
    assert all(torch.equal(masks[k], pruned["ff"][0][k]) for k in masks)
    assert all(torch.equal(v, pruned["ff"][1][k]) for k, v in m.state_dict().items())
    with pytest.raises(SelpruneError, match="cannot replay step 3"):
        replay_builder(root / "ff")(copy.deepcopy(model), 3)


def test_experiment_from_pruning_run_directories(pruning_runs) -> None:
    root, model, _ = pruning_runs
    out = anamnesia_from_runs(model, make_data(), config(retrain_steps=1, retrain_lr=1e-3), root / "ff",
                              root / "random", make_data().forget_train, progress=False)
    assert out["matching"]["selective_step"] == 2 and out["matching"]["random_step"] in (1, 2)
    assert out["arms"]["selective"]["pruned_fraction"]["ff"] == pytest.approx(0.5)
    assert out["arms"]["random"]["pruned_fraction"]["ff"] == pytest.approx(0.25 * out["matching"]["random_step"])


def test_experiment_without_a_finished_run_names_the_fix(pruning_runs, tmp_path) -> None:
    root, model, _ = pruning_runs
    with pytest.raises(SelpruneError, match=r"the random run in .* has no records; run the pruning first"):
        anamnesia_from_runs(model, make_data(), config(retrain_steps=1), root / "ff", tmp_path / "none",
                            make_data().forget_train, progress=False)


# ----------------------------------------------------------------- the control, one protocol
@pytest.fixture(scope="module")
def taught() -> torch.nn.Module:
    """A tiny Llama taught the forget pattern (forget top-1 about 0.9): something to lose."""
    data, model = make_data(), tiny_model("llama")
    rec = relearn(model, None, data, config(retrain_steps=32, retrain_lr=1e-2), data.forget_train, progress=False)
    assert rec["curve"][-1]["forget"]["top1"] > 0.8
    return model


def _control(model: torch.nn.Module, lr: float) -> dict:
    data = make_data()
    rec = relearn(copy.deepcopy(model), None, data, config(retrain_steps=8, retrain_lr=lr), data.retain_train,
                  progress=False)
    return control_check(rec["curve"])


def test_control_check_fails_when_fine_tuning_provokes_drift(taught) -> None:
    """Fine-tuning the taught model hard on random (retain) tokens wrecks its forget
    pattern: the check must say the control drifted; a learning rate far too small to
    move anything must hold. (The protocol's default is chosen so that the embedded
    model's control holds: notebook 06 prints the check.)"""
    drifted, held = _control(taught, lr=3e-2), _control(taught, lr=1e-9)
    assert not drifted["holds"] and drifted["forget_change"] < -CONTROL_TOLERANCE
    assert held["holds"] and held["forget_change"] == 0 and held["retain_change"] == 0


def test_control_check_by_hand() -> None:
    def curve(f0, f1, r0, r1):
        return [{"forget": {"top1": f0}, "retain": {"top1": r0}}, {"forget": {"top1": f1}, "retain": {"top1": r1}}]
    assert control_check(curve(0.5, 0.9, 0.3, 0.31))["holds"]  # forget may rise
    assert control_check(curve(0.5, 0.485, 0.3, 0.29))["holds"]
    assert not control_check(curve(0.5, 0.47, 0.3, 0.3))["holds"]  # forget fell 0.03
    assert not control_check(curve(0.5, 0.5, 0.3, 0.33))["holds"]  # retain moved 0.03
    assert control_check(curve(0.5, 0.5, 0.3, 0.3))["tolerance"] == 0.02


def test_one_protocol_returns_the_same_record_for_any_model() -> None:
    """An unpruned model, a pruned one and a model trained by some other method all go
    through `relearn` and come back with the same keys."""
    data, cfg = make_data(), config(retrain_steps=2, retrain_lr=1e-3)
    plain = relearn(tiny_model("llama"), None, data, cfg, data.forget_train, progress=False)
    model = tiny_model("llama")
    masks = builder("x", 0.3)(model, 1)
    pruned = relearn(model, masks, data, cfg, data.forget_train, reference=plain["curve"][0], progress=False)
    assert set(plain) == set(pruned)
    assert pruned["removed_top1"] == pytest.approx(plain["curve"][0]["forget"]["top1"]
                                                   - pruned["curve"][0]["forget"]["top1"])
    for rec in (plain, pruned):
        assert set(rec["worst_case"]) >= {"max_forget_top1", "min_forget_loss", "max_recovered"}
        assert rec["worst_case"]["max_forget_top1"] == max(r["forget"]["top1"] for r in rec["curve"])
        for v in rec["index"].values():  # a number, or an honest bound
            assert (v["step"] is not None) != v["censored"]
            assert v["text"].startswith(">") == v["censored"]


def _chunks(windows: torch.Tensor, size: int = 32, stride: int = 1) -> set[tuple[int, ...]]:
    return {tuple(w[i:i + size].tolist()) for w in windows for i in range(0, w.numel() - size, stride)}


def test_relearning_data_variants(smollm_tokenizer) -> None:
    """forget: retrain_tokens of forget-train text in the collection's document order (it
    starts with what pruning saw); retain: retain-train text; forget-unseen: forget-train
    documents that the collection never touched. Each is retrain_tokens in windows of
    retrain_window, fresh text rather than the few collection windows repeated."""
    from selprune.experiment.loop import data_for

    cfg = Config(collect_tokens=1024, eval_tokens=512, retrain_window=128, retrain_tokens=4096)
    data = data_for(cfg, smollm_tokenizer)
    assert set(RELEARN_DATA) == {"forget", "forget-unseen", "retain"}
    windows = {name: relearn_windows(cfg.replace(retrain_data=name), smollm_tokenizer, data) for name in RELEARN_DATA}
    for w in windows.values():
        assert tuple(w.shape) == (4096 // 128, 128)
    seen, unseen = _chunks(data.forget_train, stride=8), _chunks(windows["forget-unseen"])
    assert _chunks(windows["forget"]) & seen, "forget relearning text starts with what the collection saw"
    assert not unseen & seen, "forget-unseen shares text with the collection windows"
    assert not _chunks(windows["retain"]) & _chunks(windows["forget"], stride=8)
    assert not _chunks(data.forget_test, stride=8) & (unseen | _chunks(windows["forget"])), "test text leaked"
