"""An image classifier through the pruning pipeline, offline: a tiny random-init ViT saved as a
local Hugging Face directory with its image processor, loaded by `load_model`, images of
forget and retain classes, a pruning run (statistics over patch tokens, scores, pruning,
per-class evaluation), export and reload logits-exact; and the causal-only work refused."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.evaluate import evaluate_both
from selprune.experiment.config import Config, validate
from selprune.experiment.loop import run_pruning
from selprune.models import load_model
from selprune.prune import export_pruned
from selprune.vision import evaluate_classes, is_image_classifier, pixel_values, tokens_per_image


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, num_labels=4,
                      architectures=["ViTForImageClassification"])
    torch.manual_seed(0)
    T.ViTForImageClassification(cfg).save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.25]).save_pretrained(folder)
    return folder


def _data(model, processor, n_train: int = 12, n_test: int = 10) -> Data:
    """Class 0 (forget) and classes 1-3 (retain): images whose brightness depends on the class."""
    g = torch.Generator().manual_seed(0)

    def images(n: int, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.tensor(classes).repeat(n // len(classes) + 1)[:n]
        base = (labels * 60).view(-1, 1, 1, 1)
        noise = torch.randint(0, 40, (n, 16, 16, 1), generator=g)
        return pixel_values((base + noise).to(torch.uint8), processor, model.config), labels

    (ftr, _), (rtr, _) = images(n_train, [0]), images(n_train, [1, 2, 3])
    (fte, fy), (rte, ry) = images(n_test, [0]), images(n_test, [1, 2, 3])
    return Data(ftr, rtr, fte, rte, labels={"forget": fy, "retain": ry}, tokens_per_item=tokens_per_image(model.config))


CFG = Config(forget="image:tiny:0", retain="image:tiny:rest", collect_tokens=256, eval_tokens=256, batch_size=4,
             steps=2, ff_frac=0.1, attn_frac=0.1, dtype="float32", device="cpu")


def test_a_local_vit_loads_with_its_image_processor(vit_dir) -> None:
    model, proc = load_model(str(vit_dir), dtype="float32", device="cpu")
    assert is_image_classifier(model) and type(proc).__name__.startswith("ViTImageProcessor")
    assert list(proc.image_mean) == [0.5] and not model.training


def test_the_hub_path_loads_an_image_classifier_by_its_auto_class(vit_dir) -> None:
    """A hub id goes through the same auto class as a local folder (a local folder stands in
    for the hub: from_pretrained reads both)."""
    from selprune.models import _load_hub_id

    model, proc = _load_hub_id(str(vit_dir), dtype=torch.float32)
    assert is_image_classifier(model) and hasattr(proc, "image_mean")


def test_an_image_classifier_without_its_processor_is_refused(vit_dir, tmp_path) -> None:
    T.ViTForImageClassification.from_pretrained(vit_dir).save_pretrained(tmp_path)
    with pytest.raises(SelpruneError, match="preprocessor_config.json"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


@pytest.mark.parametrize("kind", ["ff", "both", "random"])
def test_pruning_run_on_a_vit_evaluates_classes_and_exports(vit_dir, tmp_path, kind) -> None:
    model, proc = load_model(str(vit_dir), dtype="float32", device="cpu")
    cfg = CFG.replace(model=str(vit_dir))
    data = _data(model, proc)
    records, pruner = run_pruning(cfg, kind, tmp_path / kind, model, proc, data, progress=False)
    assert len(records) == 3 and records[-1]["fraction"]["ff"] == pytest.approx(0.2, abs=0.03)
    want = evaluate_classes(model, data.forget_test, data.labels["forget"], cfg.batch_size)
    assert records[-1]["forget"] == want  # the same computation: exactly equal
    assert records[0]["retain"]["images"] == 10 and set(records[0]["forget"]["per_class"]) == {"0"}
    # compute: the collection's tokens are patches + CLS of every collection image
    if kind != "random":
        assert records[1]["compute"]["forward_tokens"] >= 24 * tokens_per_image(model.config)
    assert records[0]["forget"]["loss"] != records[-1]["forget"]["loss"]  # pruning changed the classifier
    out = export_pruned(model, pruner, tmp_path / "export", proc)
    again, _ = load_model(str(out), dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(again(pixel_values=data.retain_test).logits, model(pixel_values=data.retain_test).logits)
    assert evaluate_both(again, data, cfg.batch_size, False) == evaluate_both(model, data, cfg.batch_size, False)


def test_a_rerun_replays_the_recorded_steps(vit_dir, tmp_path) -> None:
    model, proc = load_model(str(vit_dir), dtype="float32", device="cpu")
    cfg = CFG.replace(model=str(vit_dir))
    first, pruner = run_pruning(cfg, "ff", tmp_path / "r", model, proc, _data(model, proc), progress=False)
    pruner.restore()
    again, _ = run_pruning(cfg, "ff", tmp_path / "r", model, proc, _data(model, proc), progress=False)
    assert [r["forget"] for r in again] == [r["forget"] for r in first]


def test_image_and_text_sides_cannot_be_mixed() -> None:
    with pytest.raises(SelpruneError, match="one is images and the other text"):
        validate(CFG.replace(retain="prose"), runs=["ff"])


def test_causal_only_work_is_refused_for_an_image_classifier(vit_dir) -> None:
    from selprune.experiment.baselines import unlearn
    from selprune.experiment.retrain import retrain

    model, proc = load_model(str(vit_dir), dtype="float32", device="cpu")
    data = _data(model, proc)
    with pytest.raises(SelpruneError, match="needs a causal LM.*image classifier"):
        unlearn(model, data, CFG, "ga", progress=False)
    with pytest.raises(SelpruneError, match="needs a causal LM.*image classifier"):
        retrain(model, None, None, data, CFG, progress=False, train=data.forget_train)
