"""Vision transformers as prunable models: neuron sites on random-init ViT and DeiT configs,
pixel values by the processor's settings, per-class evaluation against a brute-force count,
pruning one neuron removes exactly its contribution, and the image spec's rules."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from selprune.errors import SelpruneError
from selprune.prune import Pruner
from selprune.sites import find_sites
from selprune.stats import collect_stats
from selprune.vision import (
    check_image_pair,
    evaluate_classes,
    is_image_classifier,
    parse_image_spec,
    pixel_values,
    tokens_per_image,
)

SMALL = {"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "intermediate_size": 48, "num_labels": 5}


def _vit(cls=T.ViTForImageClassification, config=T.ViTConfig, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(config(**{**SMALL, **kw})).eval()


def _images(n: int, side: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, side, side, channels), dtype=torch.uint8, generator=g)  # [n, H, W, C]


@pytest.mark.parametrize("cls,config", [(T.ViTForImageClassification, T.ViTConfig),
                                        (T.DeiTForImageClassification, T.DeiTConfig)])
def test_sites_of_vit_and_deit_are_the_mlp_and_attention_output_projections(cls, config) -> None:
    model = _vit(cls, config)
    sites = find_sites(model)
    assert sites.shape("ff") == (2, 48) and sites.shape("attn") == (2, 4, 8)
    body = getattr(model, model.base_model_prefix)
    assert sites.ff[1] is body.layers[1].mlp.fc2 and sites.attn[0] is body.layers[0].attention.o_proj
    assert is_image_classifier(model)


def test_every_patch_and_the_cls_token_count_as_tokens() -> None:
    model = _vit()
    pixels = pixel_values(_images(6), None, model.config)
    stats = collect_stats(model, find_sites(model), pixels, batch_size=4, progress=False)
    assert stats.n_tokens == 6 * tokens_per_image(model.config) == 6 * (16 + 1)
    assert tokens_per_image(T.DeiTConfig(**SMALL)) == 16 + 2  # DeiT adds a distillation token


def test_pixel_values_follow_the_processor_and_match_channels() -> None:
    images = _images(3)
    proc = T.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.25], image_std=[0.5])
    config = T.ViTConfig(**SMALL)
    x = pixel_values(images, proc, config)  # [3, 1, 16, 16]
    want = (images.permute(0, 3, 1, 2).float() / 255 - 0.25) / 0.5
    assert x.shape == (3, 1, 16, 16) and torch.allclose(x, want, atol=1e-6)
    rgb = pixel_values(images, None, T.ViTConfig(**{**SMALL, "num_channels": 3}))  # grey to an RGB model
    assert rgb.shape == (3, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2])
    big = pixel_values(images, None, T.ViTConfig(**{**SMALL, "image_size": 32}))  # resized to the model's size
    assert big.shape == (3, 1, 32, 32)
    grey = pixel_values(_images(2, channels=3), None, config)  # RGB to a grey model: its luma
    assert grey.shape == (2, 1, 16, 16)
    with pytest.raises(SelpruneError, match="uint8"):
        pixel_values(images.float(), proc, config)


def test_class_evaluation_equals_a_brute_force_count() -> None:
    model = _vit()
    pixels = pixel_values(_images(37), None, model.config)
    labels = torch.randint(0, 5, (37,), generator=torch.Generator().manual_seed(1))
    got = evaluate_classes(model, pixels, labels, batch_size=8)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits  # [37, 5]
    pred = logits.argmax(-1)
    assert got["top1"] == pytest.approx(float((pred == labels).float().mean()))
    top5 = logits.topk(5, -1).indices
    assert got["top5"] == pytest.approx(float((top5 == labels[:, None]).any(-1).float().mean()))
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    for c in range(5):
        assert got["per_class"][str(c)] == pytest.approx(float((pred[labels == c] == c).float().mean()))
    assert got["images"] == 37
    with pytest.raises(SelpruneError, match="one label per image"):
        evaluate_classes(model, pixels, labels[:-1])


@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_pruning_one_neuron_removes_exactly_its_contribution(kind) -> None:
    model = _vit()
    sites = find_sites(model)
    proj = sites.modules(kind)[1]
    seen: dict[str, torch.Tensor] = {}
    proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    pixels = pixel_values(_images(4), None, model.config)
    mask = torch.zeros(sites.shape(kind), dtype=torch.bool)
    mask[(1, 7) if kind == "ff" else (1, 2, 3)] = True
    j = 7 if kind == "ff" else 2 * 8 + 3  # head 2, channel 3 of d_head 8
    column = proj.weight[:, j].detach().clone()  # [d_model]
    with torch.no_grad():
        model(pixel_values=pixels)
        x, before = seen["x"], seen["y"]  # [batch, tokens, d_in], [batch, tokens, d_model]
        Pruner(model, sites).prune(kind, mask)
        model(pixel_values=pixels)
    assert torch.equal(seen["x"], x)  # layer 1's input is untouched: nothing before the neuron changed
    assert torch.allclose(seen["y"], before - x[..., j : j + 1] * column, atol=1e-5)
    assert not torch.allclose(seen["y"], before)


def test_image_specs_name_one_dataset_split_by_class() -> None:
    assert parse_image_spec("image:fashion-mnist:0") == ("fashion-mnist", ["0"])
    assert parse_image_spec("image:hub:org/name:cat+dog") == ("hub:org/name", ["cat", "dog"])
    check_image_pair("image:cifar10:cat", "image:cifar10:rest")
    for bad, match in [("image:fashion-mnist", "image:DATASET:CLASSES"), ("image:x:rest+1", "mixes")]:
        with pytest.raises(SelpruneError, match=match):
            parse_image_spec(bad)
    with pytest.raises(SelpruneError, match="one dataset"):
        check_image_pair("image:cifar10:cat", "image:fashion-mnist:rest")
    with pytest.raises(SelpruneError, match="one is images and the other text"):
        check_image_pair("image:cifar10:cat", "prose")
    with pytest.raises(SelpruneError, match="both 'rest'"):
        check_image_pair("image:cifar10:rest", "image:cifar10:rest")
