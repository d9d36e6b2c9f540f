"""Image classification datasets, offline: named sets, ImageFolder folders, hub datasets.

Every source comes back as an `ImageSet`: `uint8 [n, H, W, C]` images (C = 1 grey, 3 RGB),
`int64 [n]` labels and the class names, so the rest of selprune (`selprune.vision`) never
cares where images came from. Named sets are data (`IMAGE_DATASETS`), as selprune.texts'
corpora are, and reach the machine through package registries, the only network an
offline machine may have:

- `fashion-mnist`: Zalando's Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10
  classes) from Debian's `dataset-fashion-mnist` package, fetched from deb.debian.org's
  pool by a pinned URL and SHA-256 (or a local copy: `$SELPRUNE_FASHION_MNIST`, the .deb
  or a folder of its four idx files).
- `cifar10`: the CIFAR-10 *test* set (10,000 32x32 RGB images, 1,000 a class) from the
  `bigbench==1.0.0` sdist on PyPI, fetched by pip, checked by SHA-256 (or a local copy:
  `$SELPRUNE_BIGBENCH_SDIST`, the sdist or its base64 task.json). CIFAR-10's training
  set is in no package, so selprune cuts this one set into its own splits: within each
  class the images are ranked by the SHA-256 of their pixels, and the first 80% are
  `train` (800 a class), the rest `test` (200 a class). These are not CIFAR-10's usual
  splits: accuracies are not comparable with published CIFAR-10 numbers.

A spec may also be a local folder in ImageFolder layout (`train/<class>/<image>` and
`test/<class>/<image>`; classes are the sorted sub-folder names) or `hub:ORG/NAME[:CONFIG]`
(read with `datasets.load_dataset`: an image column and a label column). Decoded tensors
of named and hub sets are cached under `cache_dir()/images/<name>/<split>.safetensors`,
so a download and decode happen once; local folders are read afresh each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from selprune import image_files as files
from selprune.errors import SelpruneError
from selprune.paths import atomic_write_bytes, cache_dir

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CACHE_FORMAT = "1"  # bump when the cached tensors change meaning
log = logging.getLogger("selprune")


@dataclass(frozen=True, eq=False)  # eq by identity: comparing tensors field by field has no one truth value
class ImageSet:
    """One split of an image classification dataset; `labels` index `classes`."""

    name: str
    images: torch.Tensor  # uint8 [n, H, W, C]
    labels: torch.Tensor  # int64 [n]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        im, y = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[-1] not in (1, 3):
            raise SelpruneError(f"{self.name}: images must be uint8 [n, H, W, 1 or 3], got {im.dtype} {list(im.shape)}")
        if y.dtype != torch.int64 or y.shape != (len(im),):
            raise SelpruneError(f"{self.name}: labels must be int64 [{len(im)}], got {y.dtype} {list(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
            raise SelpruneError(f"{self.name}: labels span {int(y.min())}..{int(y.max())} but there are "
                                f"{len(self.classes)} classes; give one class name per label")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, class_ids: Sequence[int | str]) -> ImageSet:
        """The images of these classes, in their original order, labels unchanged."""
        keep = torch.isin(self.labels, torch.tensor(self.class_ids(class_ids), dtype=torch.int64))  # [n]
        return ImageSet(self.name, self.images[keep], self.labels[keep], self.classes)

    def class_ids(self, names_or_ids: Sequence[int | str]) -> list[int]:
        """Class indices from names (exact, else case-insensitive) or indices (ints or
        digit strings, as a spec like image:fashion-mnist:0+6 gives them)."""
        return [self._class_id(x) for x in names_or_ids]

    def _class_id(self, x: int | str) -> int:
        if isinstance(x, str):
            if x in self.classes:
                return self.classes.index(x)
            folded = [i for i, c in enumerate(self.classes) if c.casefold() == x.strip().casefold()]
            if len(folded) == 1:
                return folded[0]
            x = int(x) if x.strip().isdigit() else x
        if isinstance(x, int | np.integer) and not isinstance(x, bool) and 0 <= x < len(self.classes):
            return int(x)
        named = ", ".join(f"{i}={c}" for i, c in enumerate(self.classes))
        raise SelpruneError(f"{self.name} has no class {x!r}; give a class index 0-{len(self.classes) - 1} or "
                            f"a name: {named}")


@dataclass(frozen=True)
class ImageSource:
    """A named image dataset. `kind`: "deb-idx" (idx files under `member` in the Debian
    package at URL `path`), "bigbench" (the task file `member` of the sdist `path`,
    "dist==version", cut by `files.hash_split`), "folder" (ImageFolder at `path`), "hub"
    (`datasets.load_dataset(path, config)`, our splits mapped by `splits`, or one split
    cut by hash if `hash_split`), or "python" (`loader(split)` returns the ImageSet; never
    cached). `sha256` pins a downloaded archive; `env` names a variable that may point at
    a local copy instead."""

    kind: str
    path: str = ""
    sha256: str = ""
    member: str = ""
    env: str = ""
    classes: tuple[str, ...] = ()
    image_field: str = "image"
    label_field: str = "label"
    config: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    hash_split: bool = False
    loader: Callable[[str], ImageSet] | None = field(default=None, compare=False, repr=False)
    description: str = ""


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_DATASETS: dict[str, ImageSource] = {
    "fashion-mnist": ImageSource(
        "deb-idx", "http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
        "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        member="usr/share/datasets/fashion-mnist/", env="SELPRUNE_FASHION_MNIST", classes=FASHION_MNIST_CLASSES,
        description="Fashion-MNIST, 60,000 train / 10,000 test 28x28 grey images of 10 garments (Debian package)",
    ),
    "cifar10": ImageSource(
        "bigbench", "bigbench==1.0.0", sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        member="bigbench/benchmark_tasks/cifar10_classification/base64/task.json", env="SELPRUNE_BIGBENCH_SDIST",
        classes=CIFAR10_CLASSES, hash_split=True,
        description="the CIFAR-10 test set (32x32 RGB) cut 80/20 by hash into train and test (bigbench sdist)",
    ),
}


def register_image_dataset(name: str, source: ImageSource, *, overwrite: bool = False) -> None:
    """Add a named image dataset; refuses to shadow an existing name unless `overwrite`."""
    if name in IMAGE_DATASETS and not overwrite:
        raise SelpruneError(f"image dataset name {name!r} already exists; pass overwrite=True or pick another")
    IMAGE_DATASETS[name] = source


def load_images(name: str, split: str) -> ImageSet:
    """The `split` ("train" or "test") of `name`: a key of `IMAGE_DATASETS`, a local
    ImageFolder folder, or `hub:ORG/NAME[:CONFIG]`."""
    if split not in SPLITS:
        raise SelpruneError(f"unknown split {split!r}; use one of {SPLITS}")
    source = image_source(name)
    if source.kind == "python":
        got = source.loader(split) if source.loader else None
        if not isinstance(got, ImageSet):
            raise SelpruneError(f"image dataset {name!r}: its loader returned {type(got).__name__}, not an ImageSet")
        return got
    if source.kind == "folder":
        return _read_folder(Path(source.path), split, name)
    if source.kind not in READERS:
        raise SelpruneError(f"image dataset {name!r} has kind {source.kind!r}; use one of "
                            f"{sorted([*READERS, 'folder', 'python'])}")
    where = cache_dir() / "images" / _safe_name(name)
    key = _fingerprint(source)
    hit = _read_cache(where / f"{split}.safetensors", name, key)
    if hit is not None:
        return hit
    classes, splits = READERS[source.kind](source)
    if not classes:  # a source registered without class names: the labels' numbers stand in
        classes = [str(i) for i in range(1 + max(int(y.max()) for _, y in splits.values() if len(y)))]
    for s, (images, labels) in splits.items():
        _write_cache(where / f"{s}.safetensors", ImageSet(name, images, labels, tuple(classes)), key)
    return ImageSet(name, *splits[split], tuple(classes))


def image_source(name: str) -> ImageSource:
    """The source `name` stands for (registered, hub: or a folder), or an error naming the choices."""
    if name in IMAGE_DATASETS:
        return IMAGE_DATASETS[name]
    if name.startswith("hub:"):
        path, _, config = name[4:].partition(":")
        return ImageSource("hub", path, config=config or None)
    if Path(name).expanduser().is_dir():
        return ImageSource("folder", str(Path(name).expanduser()))
    raise SelpruneError(f"unknown image dataset {name!r}: not a name ({', '.join(sorted(IMAGE_DATASETS))}), no "
                        "folder of that name exists (check the path), and not a hub spec (write hub:ORG/NAME)")


def _safe_name(name: str) -> str:
    """A folder name for `name`: itself if plain, else its safe characters and a short hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "dataset"
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _fingerprint(source: ImageSource) -> str:
    """What the cached tensors were made from: the source's fields and its local copy, if any."""
    d = {k: v for k, v in asdict(source).items() if k not in ("loader", "description")}
    return json.dumps({**d, "local": os.environ.get(source.env, "") if source.env else "", "format": CACHE_FORMAT},
                      sort_keys=True)


def _read_cache(path: Path, name: str, key: str) -> ImageSet | None:
    """The cached split, or None when absent, damaged or made from another source."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("source") != key:
                return None
            return ImageSet(name, f.get_tensor("images"), f.get_tensor("labels"), tuple(json.loads(meta["classes"])))
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def _write_cache(path: Path, data: ImageSet, key: str) -> None:
    meta = {"name": data.name, "classes": json.dumps(list(data.classes)), "source": key}
    atomic_write_bytes(path, safetensors_bytes({"images": data.images.contiguous(), "labels": data.labels}, meta))


Splits = tuple[Sequence[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]  # classes, split -> (images, labels)


def _read_deb_idx(source: ImageSource) -> Splits:
    """Both splits from the Debian package (downloaded, or the local copy in `source.env`)."""
    fix = (f"no network? download {source.path} by hand (or `apt-get download` the package on a Debian machine) and "
           f"set {source.env}=/path/to/the.deb, or to a folder holding the four idx .gz files")
    local = os.environ.get(source.env) if source.env else None
    if local and Path(local).is_dir():
        found = {str(p): p.read_bytes() for p in sorted(Path(local).rglob("*")) if files.is_idx_name(p.name)}
        return source.classes, files.idx_splits(found)
    with tempfile.TemporaryDirectory(prefix="selprune-images-") as tmp:
        if local:
            if not Path(local).is_file():
                raise SelpruneError(f"{source.env}={local} is neither a file nor a folder; {fix}")
            deb = Path(local)
            files.check_sha256(deb, source.sha256, f"unset {source.env}, or {fix}")
        else:
            log.info("downloading %s (once; cached decoded under %s)", source.path, cache_dir() / "images")
            deb = files.download(source.path, Path(tmp) / "package.deb", source.sha256, fix)
        found = files.deb_files(deb.read_bytes(), lambda p: p.startswith(source.member) and files.is_idx_name(p))
    return source.classes, files.idx_splits(found)


def _read_bigbench(source: ImageSource) -> Splits:
    """The task's images from the sdist (pip download, or `source.env`), cut by hash."""
    fix = (f"no network? download it by hand (python -m pip download --no-deps --no-binary :all: {source.path}) and "
           f"set {source.env}=/path/to/the .tar.gz (or to its {source.member} file)")
    local = os.environ.get(source.env) if source.env else None
    with tempfile.TemporaryDirectory(prefix="selprune-images-") as tmp:
        if local and Path(local).suffix == ".json" and Path(local).is_file():
            raw = Path(local).read_bytes()
        else:
            if local:
                if not Path(local).is_file():
                    raise SelpruneError(f"{source.env}={local} is not a file; {fix}")
                sdist = Path(local)
            else:
                log.info("downloading the sdist %s (once; cached decoded under %s)", source.path,
                         cache_dir() / "images")
                sdist = files.pip_download_sdist(source.path, Path(tmp), fix)
            files.check_sha256(sdist, source.sha256, fix if not local else f"unset {source.env}, or {fix}")
            raw = files.tar_member(sdist, "/" + source.member)
    images, labels = files.bigbench_images(raw, source.classes)  # [n, H, W, C], [n]
    cut = files.hash_split(images, labels)
    return source.classes, {s: (images[i], labels[i]) for s, i in cut.items()}


def _read_folder(root: Path, split: str, name: str) -> ImageSet:
    """ImageFolder layout: root/<split>/<class>/<image>; classes from both splits' folders."""
    classes = sorted({d.name for s in SPLITS if (root / s).is_dir() for d in (root / s).iterdir() if d.is_dir()})
    if not (root / split).is_dir() or not classes:
        raise SelpruneError(f"{root} is not an image folder: it needs {split}/<class name>/<image files> (and the "
                            f"other split beside it), one sub-folder per class, images ending in "
                            f"{', '.join(IMAGE_SUFFIXES)}")
    paths, labels = [], []
    for c, cls in enumerate(classes):
        found = sorted(p for p in (root / split / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += found
        labels += [c] * len(found)
    if not paths:
        raise SelpruneError(f"{root / split} holds no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    images = files.stack_pil((files.open_image(p) for p in paths), str(root / split))  # [n, H, W, C]
    return ImageSet(name, images, torch.tensor(labels, dtype=torch.int64), tuple(classes))


def _read_hub(source: ImageSource) -> Splits:
    """Both splits through `datasets.load_dataset` (a hub id, or a local dataset folder)."""
    import datasets

    from selprune.models import hub_reachable

    if not Path(source.path).exists() and not hub_reachable():
        raise SelpruneError(f"image dataset {source.path!r} is on the Hugging Face hub, which cannot be reached (no "
                            "network); use fashion-mnist or cifar10 (fetched from package registries) or a local "
                            "ImageFolder folder (train/<class>/..., test/<class>/...)")
    wanted = {ours: source.splits["train" if source.hash_split else ours] for ours in SPLITS}
    try:
        read = {theirs: datasets.load_dataset(source.path, source.config, split=theirs) for theirs in set(wanted.values())}
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SelpruneError(f"cannot load image dataset {source.path!r} ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                            "check its name, config and that it has the splits "
                            f"{sorted(set(wanted.values()))}") from e
    return _from_datasets(read, wanted, source)


def _from_datasets(read: dict[str, Any], wanted: dict[str, str], source: ImageSource) -> Splits:
    import datasets

    first = next(iter(read.values()))
    for field_name in (source.image_field, source.label_field):
        if field_name not in first.column_names:
            raise SelpruneError(f"image dataset {source.path!r} has no column {field_name!r} (it has "
                                f"{first.column_names}); register it with ImageSource(image_field=..., label_field=...)")
    feature = first.features[source.label_field]
    raw = {s: ds[source.label_field] for s, ds in read.items()}
    if isinstance(feature, datasets.ClassLabel):
        classes, index = list(feature.names), None
    else:  # plain values: classes are their sorted union over the splits, as strings
        values = sorted({v for labels in raw.values() for v in labels})
        classes, index = [str(v) for v in values], {v: i for i, v in enumerate(values)}
    loaded = {}
    for s, ds in read.items():
        labels = raw[s] if index is None else [index[v] for v in raw[s]]
        loaded[s] = (files.stack_pil((row[source.image_field] for row in ds), f"{source.path} ({s})"), torch.tensor(labels, dtype=torch.int64))
    if not source.hash_split:
        return classes, {ours: loaded[theirs] for ours, theirs in wanted.items()}
    images, labels = loaded[wanted["train"]]
    return classes, {s: (images[i], labels[i]) for s, i in files.hash_split(images, labels).items()}


READERS: dict[str, Callable[[ImageSource], Splits]] = {"deb-idx": _read_deb_idx, "bigbench": _read_bigbench,
                                                       "hub": _read_hub}
