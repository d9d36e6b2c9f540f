"""Vision transformers: images in, per-class accuracy out.

The paper's reference library also prunes image classifiers; here a ViT (or DeiT) is
pruned like a language model. Its neurons sit where a BERT-like encoder's do (the FF
output projection's input after the GELU, the attention output projection's input), and
every patch token (and the CLS token) of an image counts as one token of the statistics.
What is forgotten is a set of *classes*: forget images are those of the forget classes,
retain images those of the rest, and a model is judged by its top-1 accuracy (and
cross-entropy) on the held-out images of each.

Images arrive as `uint8 [n, H, W, C]` (`selprune.images`) and become the model's
`pixel_values` by the checkpoint's own image processor settings (size, rescale factor,
mean, std), done in torch on the whole batch: a grey image given to an RGB model is
repeated over three channels, an RGB image given to a grey model becomes its luma.

Definitions: docs/method.md, "Vision transformers".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from selprune.errors import SelpruneError
from selprune.models import input_device

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B


def is_image_classifier(model: nn.Module) -> bool:
    """Whether `model` is an image classifier (a transformers `*ForImageClassification`)."""
    return type(model).__name__.endswith("ForImageClassification")


def _processor_settings(processor: Any, config: Any) -> tuple[tuple[int, int], float, list[float], list[float]]:
    """(height, width), rescale factor, mean, std: from the image processor where it has
    them, else the model config's image size with no normalisation."""
    size = getattr(processor, "size", None) or {}
    side = getattr(config, "image_size", None)
    hw = (int(size.get("height", side)), int(size.get("width", side))) if size else (int(side), int(side))
    channels = int(getattr(config, "num_channels", 3))
    mean = list(getattr(processor, "image_mean", None) or [0.0] * channels)
    std = list(getattr(processor, "image_std", None) or [1.0] * channels)
    if processor is not None and not getattr(processor, "do_normalize", True):
        mean, std = [0.0] * channels, [1.0] * channels
    scale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    if len(mean) == 1 < channels:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise SelpruneError(f"the image processor has {len(mean)} channel means but the model takes {channels} "
                            "channels; fix preprocessor_config.json (image_mean, image_std)")
    return hw, scale, mean, std


def pixel_values(images: torch.Tensor, processor: Any, config: Any) -> torch.Tensor:
    """`images` `uint8 [n, H, W, C]` as the model's `pixel_values` `float32 [n, C', h, w]`:
    channels matched to the model's, resized (bilinear, as the processors do) to its
    size, rescaled and normalised with the processor's mean and std."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise SelpruneError(f"images must be uint8 [n, height, width, channels], got {images.dtype} "
                            f"{list(images.shape)}; load them with selprune.images.load_images")
    (h, w), scale, mean, std = _processor_settings(processor, config)
    channels = len(mean)
    x = images.permute(0, 3, 1, 2).float()  # [n, C, H, W]
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != channels:
        raise SelpruneError(f"images have {x.shape[1]} channels, the model takes {channels}")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = x * scale
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def tokens_per_image(config: Any) -> int:
    """Tokens one image puts through the encoder: its patches and the CLS token (DeiT's
    distillation token too)."""
    side, patch = int(config.image_size), int(config.patch_size)
    extra = 2 if getattr(config, "model_type", "") == "deit" else 1
    return (side // patch) ** 2 + extra


def evaluate_classes(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
                     progress: bool = False, desc: str = "evaluate images") -> dict[str, Any]:
    """Top-1 and top-5 accuracy (top-k for fewer than 5 classes), cross-entropy and
    per-class top-1 over `pixels` `[n, C, h, w]` with `labels` `[n]`. The keys of
    `selprune.evaluate.evaluate` where they apply (top1, loss, perplexity), plus top5,
    per_class and images. Eval mode; the model is left as it was."""
    if len(pixels) != len(labels) or not len(labels):
        raise SelpruneError(f"{len(pixels)} images and {len(labels)} labels: give one label per image, at least one")
    was_training = model.training
    model.eval()
    device = input_device(model)
    n_classes = int(model.config.num_labels)
    k = min(5, n_classes)
    hits1 = torch.zeros(n_classes, dtype=torch.int64)
    seen = torch.zeros(n_classes, dtype=torch.int64)
    hitk, loss_sum = 0, 0.0
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(pixels), batch_size), desc=desc, disable=not progress, leave=False):
                x = pixels[start : start + batch_size].to(device)  # [batch, C, h, w]
                y = labels[start : start + batch_size].to(device)  # [batch]
                logits = model(pixel_values=x).logits.float()  # [batch, classes]
                top = logits.topk(k, dim=-1).indices  # [batch, k]
                hit = top[:, 0] == y
                hitk += int((top == y[:, None]).any(-1).sum())
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum").double())
                hits1 += torch.bincount(y[hit].cpu(), minlength=n_classes)
                seen += torch.bincount(y.cpu(), minlength=n_classes)
    finally:
        model.train(was_training)
    n = int(seen.sum())
    loss = loss_sum / n
    per_class = {str(c): int(hits1[c]) / int(seen[c]) for c in range(n_classes) if seen[c]}
    return {"top1": int(hits1.sum()) / n, "top5": hitk / n, "loss": loss, "perplexity": math.exp(loss),
            "images": n, "per_class": per_class}


# ------------------------------------------------------------------ forget/retain images
IMAGE_PREFIX = "image:"  # a forget/retain spec of images: image:DATASET:CLASSES
REST = "rest"  # the classes the other side does not name


def is_image_spec(spec: str) -> bool:
    """Whether a forget/retain spec names images (`image:DATASET:CLASSES`)."""
    return str(spec).startswith(IMAGE_PREFIX)


def parse_image_spec(spec: str) -> tuple[str, list[str]]:
    """`image:DATASET:CLASSES` as (dataset, class names or ids, or ["rest"]). DATASET is a
    registered name (fashion-mnist, cifar10), a local ImageFolder path or hub:ORG/NAME;
    CLASSES is names or indices joined by "+", or "rest"."""
    body = str(spec)[len(IMAGE_PREFIX):]
    dataset, sep, classes = body.rpartition(":")
    names = [c.strip() for c in classes.split("+")] if sep else []
    if not dataset or not names or "" in names:
        raise SelpruneError(f"image spec {spec!r} is not image:DATASET:CLASSES; write e.g. image:fashion-mnist:0 "
                            "(forget class 0) and image:fashion-mnist:rest (retain the others), or name classes "
                            "joined by + (image:cifar10:cat+dog)")
    if REST in names and len(names) > 1:
        raise SelpruneError(f"image spec {spec!r} mixes {REST!r} with named classes; use one or the other")
    return dataset, names


def check_image_pair(forget: str, retain: str) -> None:
    """Forget and retain must both be images of one dataset, with at most one side "rest"
    (checked without loading anything); text on one side and images on the other is refused."""
    if is_image_spec(forget) != is_image_spec(retain):
        raise SelpruneError(f"forget={forget!r} and retain={retain!r}: one is images and the other text; "
                            "give both as image:DATASET:CLASSES")
    if not is_image_spec(forget):
        return
    (fd, fc), (rd, rc) = parse_image_spec(forget), parse_image_spec(retain)
    if fd != rd:
        raise SelpruneError(f"forget images come from {fd!r} and retain images from {rd!r}; use one dataset "
                            "(its classes split into forget and retain)")
    if fc == rc == [REST]:
        raise SelpruneError("forget and retain are both 'rest'; name the forget classes (image:DATASET:0)")


def _class_split(forget: str, retain: str, classes: list[int], resolve) -> tuple[list[int], list[int]]:
    """The class ids of each side; "rest" is every class the other side does not name."""
    (_, fc), (_, rc) = parse_image_spec(forget), parse_image_spec(retain)
    f = [c for c in classes if c not in resolve(rc)] if fc == [REST] else resolve(fc)
    r = [c for c in classes if c not in f] if rc == [REST] else resolve(rc)
    if set(f) & set(r):
        raise SelpruneError(f"classes {sorted(set(f) & set(r))} are in both forget and retain; a class is one or "
                            "the other")
    return f, r


def _take(images: torch.Tensor, budget_images: int, seed: int) -> torch.Tensor:
    """Indices of `budget_images` of `images`' rows (all, if fewer), in an order seeded by `seed`."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return order[: max(1, budget_images)]


def prepare_image_data(processor: Any, config: Any, *, forget: str, retain: str, collect_tokens: int,
                       eval_tokens: int, seed: int):
    """The `selprune.data.Data` of an image experiment: pixel values `[n, C, h, w]` of the
    forget and retain classes, train split for collection, test split for evaluation, and
    the test labels. Budgets are tokens through the encoder, as for text: an image is
    `tokens_per_image` tokens, so a budget buys budget // tokens images (at least one; all
    there are, if fewer). `seed` orders the collection images; the test images are always
    taken in the `EVAL_SEED` order, so every seed is judged on the same images."""
    from selprune.data import EVAL_SEED, Data
    from selprune.images import load_images

    check_image_pair(forget, retain)
    dataset, _ = parse_image_spec(forget)
    per = tokens_per_image(config)
    train, test = load_images(dataset, "train"), load_images(dataset, "test")
    if int(config.num_labels) != len(train.classes):
        raise SelpruneError(f"the model has {config.num_labels} classes, {dataset} has {len(train.classes)}; "
                            "pass a classifier trained on this dataset (selprune train-vit)")
    ids = _class_split(forget, retain, list(range(len(train.classes))), train.class_ids)
    out: dict[str, torch.Tensor] = {}
    for side, classes in zip(("forget", "retain"), ids, strict=True):
        part = train.subset(classes)
        out[f"{side}_train"] = pixel_values(part.images[_take(part.images, collect_tokens // per, seed)],
                                            processor, config)
        part = test.subset(classes)
        pick = _take(part.images, eval_tokens // per, EVAL_SEED)
        out[f"{side}_test"] = pixel_values(part.images[pick], processor, config)
        out[f"{side}_labels"] = part.labels[pick]
    return Data(out["forget_train"], out["retain_train"], out["forget_test"], out["retain_test"],
                labels={"forget": out["forget_labels"], "retain": out["retain_labels"]}, tokens_per_item=per)
