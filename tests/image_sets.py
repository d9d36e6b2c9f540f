"""Synthetic image classification sets for tests: 8x8 grey images with a bright vertical bar
whose column band is the class (a class past the bands has no bar), plus noise; and a
context that registers one as a named `selprune.images` dataset, then puts the registry back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from selprune.images import IMAGE_DATASETS, ImageSet, ImageSource, register_image_dataset


def bars(split: str, classes: tuple[str, ...], n_train: int, n_test: int) -> ImageSet:
    """`n_train` or `n_test` images, labels cycling through `classes`; class c < 3 has its bar
    in columns 3c and 3c+1."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = n_train if split == "train" else n_test
    labels = torch.arange(n) % len(classes)
    images = torch.randint(0, 60, (n, 8, 8, 1), generator=g, dtype=torch.uint8)  # [n, H, W, C]
    for i, c in enumerate(labels.tolist()):
        if c < 3:
            images[i, :, 3 * c : 3 * c + 2] = 250
    return ImageSet("bars", images, labels, classes)


@contextlib.contextmanager
def registered(name: str, loader) -> Iterator[None]:
    """`loader` (split -> ImageSet) as the named dataset `name` while the block runs."""
    saved = dict(IMAGE_DATASETS)
    register_image_dataset(name, ImageSource("python", loader=loader), overwrite=True)
    try:
        yield
    finally:
        IMAGE_DATASETS.clear()
        IMAGE_DATASETS.update(saved)
