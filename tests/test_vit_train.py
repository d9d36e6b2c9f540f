"""selprune.vit_train and `selprune train-vit`: a tiny ViT trained for a few steps on
synthetic images (a registered in-memory dataset), saved, reloaded and checked."""

from __future__ import annotations

import json

import pytest
import torch
from image_sets import bars, registered
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from selprune import vit_train
from selprune.errors import SelpruneError
from selprune.experiment.cli import main
from selprune.images import ImageSet
from selprune.vision import pixel_values

CLASSES = ("left", "middle", "right")
TINY = {"patch_size": 4, "hidden_size": 16, "layers": 1, "heads": 2, "mlp_ratio": 2}
FAST = {"steps": 3, "batch_size": 8, "warmup": 1, "progress": False, **TINY}


def synthetic(split: str) -> ImageSet:
    return bars(split, CLASSES, 24, 9)


@pytest.fixture(autouse=True)
def bars_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SELPRUNE_CACHE", str(tmp_path / "cache"))
    with registered("bars", synthetic):
        yield


def test_checkpoint_reloads_with_identical_logits(tmp_path) -> None:
    model, processor, log = vit_train.fit_vit("bars", **FAST)
    vit_train._save(model, processor, log, tmp_path / "vit", overwrite=False)
    files = sorted(p.name for p in (tmp_path / "vit").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json", "train_log.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    again = ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    x = pixel_values(synthetic("test").images, processor, model.config)  # [9, 1, 8, 8]
    with torch.inference_mode():
        assert torch.equal(model(pixel_values=x).logits, again(pixel_values=x).logits)
    assert again.config.id2label == dict(enumerate(CLASSES)) and again.config.image_size == 8
    saved = json.loads((tmp_path / "vit" / "train_log.json").read_text())
    assert saved["test"]["top1"] == log["test"]["top1"] and set(saved["test"]["per_class"]) == set(CLASSES)
    assert saved["params"]["steps"] == 3 and saved["loss_curve"][-1]["step"] == 3


def test_training_is_reproducible_bit_for_bit(tmp_path) -> None:
    state = torch.get_rng_state()
    logs = [vit_train.train_vit("bars", tmp_path / name, seed=seed, dropout=0.1, **FAST)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logs[0]["loss_curve"] == logs[1]["loss_curve"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed, other weights


def test_processor_statistics_and_dropout(tmp_path) -> None:
    vit_train.train_vit("bars", tmp_path / "vit", dropout=0.25, **FAST)
    pre = json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())
    x = synthetic("train").images.double() / 255  # [24, 8, 8, 1]
    assert pre["image_mean"] == pytest.approx([float(x.mean())], abs=1e-12)
    assert pre["image_std"] == pytest.approx([float(x.std(unbiased=False))], abs=1e-12)
    assert pre["size"] == {"height": 8, "width": 8}
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.25
    cfg = vit_train.small_vit_config(10, 28, 1, dropout=0.1, classes=[str(i) for i in range(10)])
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.1 and cfg.label2id["3"] == 3


def test_refuses_to_overwrite_and_replaces_when_asked(tmp_path, monkeypatch) -> None:
    out = tmp_path / "vit"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as m, pytest.raises(SelpruneError, match="not empty.*overwrite"):
        m.setattr(vit_train, "load_images", _no_loading)
        vit_train.train_vit("bars", out, **FAST)
    vit_train.train_vit("bars", out, overwrite=True, **FAST)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_an_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vit_train, "atomic_write_json", interrupt)
    with pytest.raises(KeyboardInterrupt):
        vit_train.train_vit("bars", tmp_path / "vit", **FAST)
    assert list(tmp_path.iterdir()) == []


def _no_loading(*args, **kwargs):
    raise AssertionError("the data was loaded before the arguments were checked")


@pytest.mark.parametrize("bad, message", [
    ({"steps": 0}, "steps=0"), ({"batch_size": 0}, "batch_size=0"), ({"lr": 0.0}, "lr=0.0"),
    ({"lr": -1e-3}, "positive learning rate"), ({"lr": float("nan")}, "lr=nan"), ({"dropout": 1.0}, r"\[0, 1\)"),
    ({"dropout": -0.1}, r"\[0, 1\)"), ({"warmup": 3}, "warmup=3"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"depth": 3}, "unknown architecture"), ({"dataset": "no-such-images"}, "unknown image dataset"),
])
def test_bad_arguments_fail_before_training(tmp_path, monkeypatch, bad, message) -> None:
    monkeypatch.setattr(vit_train, "load_images", _no_loading)
    args = {**FAST, "dataset": "bars", **bad}
    with pytest.raises(SelpruneError, match=message):
        vit_train.train_vit(out=tmp_path / "vit", **args)
    assert not (tmp_path / "vit").exists()


def test_architecture_checks() -> None:
    with pytest.raises(SelpruneError, match="does not divide"):
        vit_train.small_vit_config(3, 10, 1, patch_size=4)
    with pytest.raises(SelpruneError, match="multiple of heads"):
        vit_train.small_vit_config(3, 8, 1, hidden_size=10, heads=4)
    with pytest.raises(SelpruneError, match="one name per class"):
        vit_train.small_vit_config(3, 8, 1, classes=["a", "b"])


def test_lr_schedule() -> None:
    f = [vit_train.lr_factor(s, 10, 2) for s in range(10)]
    assert f[:2] == [0.5, 1.0] and f[2] == 1.0 and all(a > b for a, b in zip(f[2:], f[3:], strict=False))


def test_cli_trains_and_reports(tmp_path, capsys) -> None:
    out = tmp_path / "vit"
    assert main(["train-vit", "--dataset", "bars", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--lr", "0.001", "--seed", "3", "--dropout", "0.1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "test top-1" in printed
    log = json.loads((out / "train_log.json").read_text())
    assert log["params"]["seed"] == 3 and log["params"]["lr"] == 0.001 and log["params"]["dropout"] == 0.1
    assert main(["train-vit", "--dataset", "bars", "--out", str(out), "--steps", "2"]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train-vit", "--dataset", "bars", "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert "steps=0" in capsys.readouterr().err


def test_pixels_are_the_vision_modules() -> None:
    """Training normalises through selprune.vision.pixel_values: the saved processor
    turns the training images into zero-mean, unit-variance pixels."""
    _, processor, _ = vit_train.fit_vit("bars", **FAST)
    cfg = vit_train.small_vit_config(3, 8, 1)
    x = pixel_values(synthetic("train").images, processor, cfg).double()
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
