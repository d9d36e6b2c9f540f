"""The relearning experiment (selprune/experiment/relearning.py): three arms retrained
alike, the random control matched on retain damage, from hand-made builders or from
pruning run directories; the schema's retraining parameters reach every arm."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import VOCAB, tiny_model  # sets torch to one thread

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.config import Config, validate
from selprune.experiment.loop import run_pruning
from selprune.experiment.relearning import anamnesia_experiment, anamnesia_from_runs, replay_builder
from selprune.prune import Pruner
from selprune.texts import top_tokens

WINDOW = 16



def config(**params) -> Config:
    """A valid Config for the tiny data (windows of WINDOW tokens)."""
    cfg = Config(**{"window": WINDOW, "retrain_window": WINDOW, "retrain_batch": 4, "batch_size": 8, **params})
    validate(cfg)
    return cfg


def make_data(n: int = 8) -> Data:
    """Forget: a repetitive sequence (period 7) that a tiny model learns in a few steps;
    retain: random tokens."""
    g = torch.Generator().manual_seed(1)

    def pattern(starts: torch.Tensor) -> torch.Tensor:
        return (starts[:, None] + torch.arange(WINDOW)) % 7 + 1  # [n, window]

    d = Data(pattern(torch.randint(0, 7, (n,), generator=g)), torch.randint(0, VOCAB, (n, WINDOW), generator=g),
             pattern(torch.arange(4)), torch.randint(0, VOCAB, (4, WINDOW), generator=g))
    d.skip = {"forget": top_tokens(d.forget_train, 3), "retain": top_tokens(d.retain_train, 3)}
    return d


def random_masks(sites, frac: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(sites.shape(k), generator=g) < frac for k in ("ff", "attn")}


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
    return anamnesia_experiment(tiny_model("llama"), make_data(), cfg, SELECTIVE, RANDOM,
                                builder("selective", 0.3, calls), builder("random", 0.1, calls), progress=False)


def test_experiment_arms_are_independent_and_matched() -> None:
    model, data = tiny_model("llama"), make_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[str, int]] = []
    out = anamnesia_experiment(model, data, config(retrain_steps=2, retrain_lr=1e-3), SELECTIVE, RANDOM,
                               builder("selective", 0.3, calls), builder("random", 0.1, calls), progress=False)
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
                              root / "random", progress=False)
    assert out["matching"]["selective_step"] == 2 and out["matching"]["random_step"] in (1, 2)
    assert out["arms"]["selective"]["pruned_fraction"]["ff"] == pytest.approx(0.5)
    assert out["arms"]["random"]["pruned_fraction"]["ff"] == pytest.approx(0.25 * out["matching"]["random_step"])


def test_experiment_without_a_finished_run_names_the_fix(pruning_runs, tmp_path) -> None:
    root, model, _ = pruning_runs
    with pytest.raises(SelpruneError, match=r"the random run in .* has no records; run the pruning first"):
        anamnesia_from_runs(model, make_data(), config(retrain_steps=1), root / "ff", tmp_path / "none",
                            progress=False)
