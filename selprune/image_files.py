"""The file formats behind selprune's built-in image sets, read in Python alone.

No pretrained vision model or image dataset can be fetched from the Hugging Face hub
offline, but package registries can be reached, and two of them carry images:

- Debian's `dataset-fashion-mnist` package: a `.deb` is an `ar` archive whose
  `data.tar.*` member holds Fashion-MNIST's four idx files (gzipped). `ar_members`,
  `tar_files` and `parse_idx` read them without dpkg, ar or tar on the machine.
- PyPI's `bigbench` sdist: its `cifar10_classification` task holds the CIFAR-10 test
  set as JSON examples, each a base64 PNG (`input`) and a one-hot `target_scores` dict.
  `bigbench_images` decodes them; `hash_split` cuts such a single set into train and test.

`stack_pil` and `open_image` turn image files (ImageFolder folders, hub datasets) into
the same `uint8 [n, H, W, C]` tensors.

Every downloaded archive is checked against a pinned SHA-256 before it is parsed, so a
cut-short download or a changed upstream file fails loudly instead of giving other data.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selprune.errors import SelpruneError

_CHUNK = 1 << 20
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL modes of one channel
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"(train|t10k)-(images|labels)-idx\d-ubyte(\.gz)?$")
IDX_SPLITS = {"train": "train", "t10k": "test"}  # idx file prefix -> our split name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, fix: str) -> None:
    """Refuse `path` unless its SHA-256 is `expected` (a damaged or different file)."""
    got = sha256_file(path)
    if got != expected.lower():
        raise SelpruneError(f"{path} has SHA-256 {got}, not the pinned {expected}: the file is damaged, cut "
                            f"short or another version; {fix}")


def download(url: str, dest: Path, sha256: str, fix: str) -> Path:
    """Fetch `url` into `dest` (streamed, no size limit in memory) and check its SHA-256."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r, Path(dest).open("wb") as f:
            shutil.copyfileobj(r, f, _CHUNK)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SelpruneError(f"cannot download {url} ({type(e).__name__}: {e}); {fix}") from e
    check_sha256(dest, sha256, fix)
    return Path(dest)


def pip_download_sdist(spec: str, dest: Path, fix: str) -> Path:
    """The source distribution `spec` ("dist==version") from the package index, by pip, so
    the user's index settings (mirrors, proxies, certificates) apply."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), "-q", spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(Path(dest).glob("*.tar.gz"))
    if done.returncode or not found:
        raise SelpruneError(f"could not download the sdist {spec} from the package index "
                            f"({done.stderr.strip()[-300:]}); {fix}")
    return found[0]


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an `ar` archive (a `.deb` is one): name -> bytes. Common format: an
    8-byte magic, then per member a 60-byte ASCII header (name 16, dates and ids 32, size
    10, end mark 2) and the data padded to an even length."""
    if not data.startswith(b"!<arch>\n"):
        raise SelpruneError("not an ar archive (no !<arch> magic): the .deb is damaged or not a .deb; download it again")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        head = data[pos : pos + 60]
        if head[58:60] != b"`\n":
            raise SelpruneError(f"damaged ar member header at byte {pos}; download the .deb again")
        name = head[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(head[48:58].decode("ascii").strip() or 0)
        if pos + 60 + size > len(data):
            raise SelpruneError(f"ar member {name!r} runs past the end of the archive: the .deb is cut short; "
                                "download it again")
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    return out


def tar_files(data: bytes, want: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of a tar archive (any compression Python reads: gz, bz2, xz)
    whose path `want` accepts: path (without a leading ./) -> bytes."""
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for m in tar:
                name = m.name.removeprefix("./")
                if m.isfile() and want(name):
                    out[name] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SelpruneError(f"cannot read the tar archive ({type(e).__name__}: {e}); download the file again") from e
    return out


def deb_files(deb: bytes, want: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a Debian package's payload (its `data.tar.*` member) that `want` accepts."""
    members = ar_members(deb)
    data = [v for k, v in members.items() if k.startswith("data.tar")]
    if not data:
        raise SelpruneError(f"the .deb has no data.tar.* member (it has {sorted(members)}); download it again")
    return tar_files(data[0], want)


def parse_idx(raw: bytes) -> torch.Tensor:
    """An idx file (MNIST's format, gzipped or not) as a tensor: two zero bytes, a type code,
    the number of dimensions, each dimension as a big-endian int32, then the values."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise SelpruneError("not an idx file (bad magic number); give the original "
                            "{train,t10k}-{images,labels}-idx?-ubyte[.gz] files")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start, count = 4 + 4 * ndim, int(np.prod(shape, dtype=np.int64))
    if len(raw) != start + count * dtype.itemsize:
        raise SelpruneError(f"idx file of shape {shape} holds {len(raw) - start} data bytes, not "
                            f"{count * dtype.itemsize}: it is cut short or damaged; get it again")
    values = np.frombuffer(raw, dtype, count, start).reshape(shape)
    return torch.from_numpy(values.astype(values.dtype.newbyteorder("=")))  # a native-order copy


def is_idx_name(path: str) -> bool:
    return bool(_IDX_NAME.search(path))


def idx_splits(files: dict[str, bytes]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both splits from the four MNIST-style idx files (keyed by path): split -> (images
    `uint8 [n, H, W, 1]`, labels `int64 [n]`)."""
    found = {}
    for path, raw in files.items():
        m = _IDX_NAME.search(path)
        if m:
            found[m.group(1), m.group(2)] = raw
    out = {}
    for prefix, split in IDX_SPLITS.items():
        if (prefix, "images") not in found or (prefix, "labels") not in found:
            raise SelpruneError(f"no {prefix}-images / {prefix}-labels idx files among {sorted(files)[:8]}; give "
                                "the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                                "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
        images, labels = parse_idx(found[prefix, "images"]), parse_idx(found[prefix, "labels"])
        if images.dim() != 3 or images.dtype != torch.uint8 or labels.shape != (len(images),):
            raise SelpruneError(f"{prefix} idx files hold images {list(images.shape)} ({images.dtype}) and labels "
                                f"{list(labels.shape)}; expected uint8 [n, H, W] and [n]")
        out[split] = (images.unsqueeze(-1).contiguous(), labels.long())  # [n, H, W, 1], [n]
    return out


def tar_member(path: Path, suffix: str) -> bytes:
    """The first file in the (compressed) tar at `path` whose name ends with `suffix`,
    read in one streaming pass (a 358 MB sdist is never unpacked to disk)."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(suffix):
                    return tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SelpruneError(f"cannot read {path} as a tar archive ({type(e).__name__}: {e}); get it again") from e
    raise SelpruneError(f"{path} holds no file ending in {suffix}; it is not the expected archive")


def bigbench_images(raw: bytes, classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A BIG-bench image-classification task file (JSON; `examples`, each an `input` base64
    PNG and `target_scores` {class name: 1 for the answer, 0 otherwise}) as images
    `uint8 [n, H, W, C]` and labels `int64 [n]`, labels indexing `classes`."""
    from PIL import Image

    try:
        examples = json.loads(raw)["examples"]
        index = {c: i for i, c in enumerate(classes)}
        labels, arrays = [], []
        for ex in examples:
            scores = ex["target_scores"]
            answer = max(scores, key=scores.get)
            if set(scores) != set(index) or sorted(scores.values()) != [0] * (len(index) - 1) + [1]:
                raise SelpruneError(f"an example's target_scores {scores} are not one-hot over {list(classes)}")
            with Image.open(io.BytesIO(base64.b64decode(ex["input"], validate=True))) as im:
                arrays.append(np.asarray(im.convert("RGB")))
            labels.append(index[answer])
    except SelpruneError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:  # JSON, base64, PIL: the file is not such a task
        raise SelpruneError(f"cannot read the BIG-bench task file ({type(e).__name__}: {e}); it is damaged or "
                            "not an image task in base64 PNG form") from e
    if not arrays or len({a.shape for a in arrays}) != 1:
        raise SelpruneError(f"the task file holds {len(arrays)} images of sizes {sorted({a.shape for a in arrays})[:3]}; "
                            "expected at least one, all of one size")
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64)  # [n, H, W, C], [n]


def hash_split(images: torch.Tensor, labels: torch.Tensor, train_fraction: float = 0.8) -> dict[str, torch.Tensor]:
    """Indices of a deterministic, stratified train/test cut of one set of images: within
    each class, images ranked by the SHA-256 of their pixel bytes, the first
    `round(train_fraction * n)` go to train, the rest to test. Indices are sorted, so each
    split keeps the original order; the cut depends on the pixels only, never on a seed,
    file order or library version."""
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten().tolist()
        idx.sort(key=lambda i: (hashlib.sha256(images[i].contiguous().numpy().tobytes()).digest(), i))
        k = int(np.floor(train_fraction * len(idx) + 0.5))
        train += idx[:k]
        test += idx[k:]
    return {"train": torch.tensor(sorted(train), dtype=torch.int64), "test": torch.tensor(sorted(test), dtype=torch.int64)}


def stack_pil(pictures: Iterable[Any], where: str) -> torch.Tensor:
    """PIL images as one `uint8 [n, H, W, C]` tensor: grey if every image is, else RGB
    (grey ones repeated over three channels). Each is converted as it comes, so a file
    can be closed after it."""
    arrays = [np.asarray(p.convert("L") if p.mode in _GREY_MODES else p.convert("RGB")) for p in pictures]
    sizes = sorted({a.shape[:2] for a in arrays})
    if not arrays:
        raise SelpruneError(f"{where} holds no images; add some, or use another dataset")
    if len(sizes) != 1:
        raise SelpruneError(f"{where} holds images of {len(sizes)} sizes ({sizes[:3]} ...); resize them to one size "
                            "first (a ViT takes one image size)")
    if all(a.ndim == 2 for a in arrays):
        return torch.from_numpy(np.stack(arrays)).unsqueeze(-1)  # [n, H, W, 1]
    return torch.from_numpy(np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, -1) for a in arrays]))


def open_image(path: Path) -> Any:
    """One image file, read whole and closed (a folder of thousands never holds them all open)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # the file closes here; the copy keeps the pixels
    except OSError as e:
        raise SelpruneError(f"cannot read image {path} ({e}); remove or replace the damaged file") from e
