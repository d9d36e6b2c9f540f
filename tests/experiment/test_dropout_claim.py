"""The dropout claim's runner and the image pipeline from named data: tiny ViTs trained on a
registered in-memory dataset (`selprune.images`, kind "python"), pruned through
`prepare_image_data` and the pruning loop, resumed from what is on disk; and `selprune prune`
and `selprune dropout-claim` on the same data."""

from __future__ import annotations

import json

import pytest
import torch
from image_sets import bars, registered

from selprune.errors import SelpruneError
from selprune.experiment import dropout_claim as dc
from selprune.experiment.cli import main
from selprune.experiment.config import Config
from selprune.images import ImageSet
from selprune.models import load_model
from selprune.vision import prepare_image_data, tokens_per_image

CLASSES = ("left", "middle", "right", "none")
TRAIN = {"steps": 20, "batch_size": 16, "warmup": 2, "patch_size": 4, "hidden_size": 16, "layers": 2, "heads": 2,
         "mlp_ratio": 2}
RECIPE = {"ff_frac": 0.1, "attn_frac": 0.1, "steps": 3, "max_retain_drop": None, "collect_tokens": 600,
          "batch_size": 16}


def four_bars(split: str) -> ImageSet:
    return bars(split, CLASSES, 64, 24)


@pytest.fixture(autouse=True)
def bars_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SELPRUNE_CACHE", str(tmp_path / "cache"))
    with registered("bars", four_bars):
        yield


@pytest.fixture(scope="module")
def claim(tmp_path_factory):
    """Two dropout rates x two seeds, trained and pruned once for the module."""
    out = tmp_path_factory.mktemp("claim")
    with pytest.MonkeyPatch.context() as mp, registered("bars", four_bars):
        mp.setenv("SELPRUNE_CACHE", str(out / "cache"))
        rows = dc.dropout_claim(out, dataset="bars", forget="left", dropouts=(0.0, 0.2), seeds=(0, 1), train=TRAIN,
                                recipe=RECIPE, progress=False)
    return out, rows


def test_image_data_come_from_the_named_classes(tmp_path) -> None:
    from selprune.vit_train import train_vit

    train_vit("bars", tmp_path / "vit", progress=False, **TRAIN)
    model, proc = load_model(str(tmp_path / "vit"), dtype="float32", device="cpu")
    per = tokens_per_image(model.config)
    data = prepare_image_data(proc, model.config, forget="image:bars:left+middle", retain="image:bars:rest",
                              collect_tokens=10 * per, eval_tokens=10**6, seed=3)
    assert data.forget_train.shape == (10, 1, 8, 8) and data.retain_train.shape == (10, 1, 8, 8)
    assert set(data.labels["forget"].tolist()) == {0, 1} and set(data.labels["retain"].tolist()) == {2, 3}
    assert len(data.labels["forget"]) == 12 and len(data.labels["retain"]) == 12  # every test image of the classes
    again = prepare_image_data(proc, model.config, forget="image:bars:0+1", retain="image:bars:rest",
                               collect_tokens=10 * per, eval_tokens=10**6, seed=3)
    assert torch.equal(again.forget_train, data.forget_train)  # names and indices name the same classes
    other = prepare_image_data(proc, model.config, forget="image:bars:0+1", retain="image:bars:rest",
                               collect_tokens=10 * per, eval_tokens=10**6, seed=4)
    assert not torch.equal(other.forget_train, data.forget_train) and torch.equal(other.forget_test, data.forget_test)
    with pytest.raises(SelpruneError, match="in both forget and retain"):
        prepare_image_data(proc, model.config, forget="image:bars:0", retain="image:bars:0+2",
                           collect_tokens=per, eval_tokens=per, seed=0)
    with pytest.raises(SelpruneError, match="unknown|not a class|class"):
        prepare_image_data(proc, model.config, forget="image:bars:sideways", retain="image:bars:rest",
                           collect_tokens=per, eval_tokens=per, seed=0)


def test_the_claim_trains_prunes_and_summarises_every_model(claim) -> None:
    out, rows = claim
    assert [(r["dropout"], r["seed"], r["run"]) for r in rows] == [
        (d, s, run) for d in (0.0, 0.2) for s in (0, 1) for run in ("ff", "both")]
    for r in rows:
        assert r["steps"] == 3 and len(r["curve"]) == 4 and r["curve"][0]["ff"] == 0.0
        assert r["curve"][-1]["ff"] == pytest.approx(0.3, abs=0.02)
        assert 0 <= r["test_top1"] <= 1 and set(r) >= {"forget_drop@0.1", "selectivity_area"}
    ff, both = rows[0], rows[1]  # the same model: the same start, and "both" starts unpruned too (restored)
    assert ff["curve"][0] == both["curve"][0] and ff["curve"][1]["attn"] == 0 < both["curve"][1]["attn"]
    both_cfg = json.loads((out / "runs" / "dropout-0__seed-0" / "both" / "config.json").read_text())
    assert both_cfg["attn_frac"] == 0.1 and both_cfg["run"] == "both"
    cfg = json.loads((out / "models" / "dropout-0.2__seed-1" / "config.json").read_text())
    assert cfg["hidden_dropout_prob"] == cfg["attention_probs_dropout_prob"] == 0.2
    assert json.loads((out / "claim.json").read_text()) == rows
    table = dc.claim_table(rows)
    assert list(zip(table["run"], table["dropout"], strict=True)) == [("both", 0.0), ("both", 0.2), ("ff", 0.0),
                                                                       ("ff", 0.2)]
    assert list(table["seeds"]) == [2, 2, 2, 2]
    assert dc.plot_claim(rows).axes[0].get_title().startswith("Forgetting one class")


def test_a_rerun_reuses_the_checkpoints_and_runs(claim, monkeypatch) -> None:
    out, rows = claim
    import selprune.vit_train as vt

    monkeypatch.setattr(vt, "train_vit", lambda *a, **k: pytest.fail("a trained checkpoint was trained again"))
    again = dc.dropout_claim(out, dataset="bars", forget="left", dropouts=(0.0, 0.2), seeds=(0, 1), train=TRAIN,
                             recipe=RECIPE, progress=False)
    assert again == rows  # the same checkpoints, the same records replayed: the same numbers


def test_bad_claims_are_refused_before_training(tmp_path) -> None:
    with pytest.raises(SelpruneError, match="at least two dropout rates"):
        dc.dropout_claim(tmp_path, dataset="bars", dropouts=(0.1,), progress=False)
    with pytest.raises(SelpruneError, match="ff_frac"):
        dc.dropout_claim(tmp_path, dataset="bars", recipe={"ff_frac": 2.0}, progress=False)
    assert not (tmp_path / "models").exists()


def test_prune_command_runs_on_a_vit_and_named_image_classes(tmp_path, capsys) -> None:
    from selprune.vit_train import train_vit

    train_vit("bars", tmp_path / "vit", progress=False, **TRAIN)
    params = {"model": str(tmp_path / "vit"), "forget": "image:bars:left", "retain": "image:bars:rest",
              "collect_tokens": "600", "eval_tokens": "100000", "steps": "2", "ff_frac": "0.1", "device": "cpu"}
    argv = ["prune", "--out", str(tmp_path / "run"), "--run-kind", "ff", "--save-model", "--quiet",
            *(x for name, value in params.items() for x in ("-p", name, value))]
    assert main(argv) == 0, capsys.readouterr().err
    records = json.loads((tmp_path / "run" / "records.json").read_text())
    assert len(records) == 3 and records[0]["forget"]["images"] == 6 and records[0]["retain"]["images"] == 18
    again, _ = load_model(str(tmp_path / "run" / "pruned-model"), dtype="float32", device="cpu")
    assert type(again).__name__ == "ViTForImageClassification"
    assert Config(forget="image:bars:left", retain="image:bars:rest").forget.startswith("image:")
