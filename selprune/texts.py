"""Datasets: bundled corpora, local files, hub presets; and their cut into token windows.

Every source comes back as a `datasets` object with one column, `text`, so the rest of
selprune never cares where text came from. Named sets are data (`DATASETS`), and bundled
names (`prose`, `code`) live beside hub presets without clashing because a name maps to
exactly one entry.

`token_windows` turns texts into a `[n_windows, window]` tensor: documents are tokenised
in a fixed order (shuffled by `seed`), joined with the EOS token, and packed into windows
of `window` tokens (BOS first where the tokenizer adds one), stopping at a token budget.
Packing wastes no compute on padding and makes the stream identical on every run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from selprune.errors import SelpruneError
from selprune.models import hub_reachable
from selprune.paths import data_dir
from selprune.vision import is_image_spec, parse_image_spec
from selprune.windows import adds_bos, token_windows, top_tokens  # noqa: F401 - part of this module's API since 0.1

SPLITS = ("train", "test")


@dataclass(frozen=True)
class TextSource:
    """A named dataset. `kind` "bundled" reads `data/<path>/<split>.jsonl.gz`; "hub"
    streams `path` (with `config`) from the Hugging Face hub, mapping our split names to
    the hub's through `splits`."""

    kind: str
    path: str
    config: str | None = None
    text_field: str = "text"
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    description: str = ""


DATASETS: dict[str, TextSource] = {
    "prose": TextSource("bundled", "prose", description="Jane Austen's six novels, one document a chapter"),
    "code": TextSource("bundled", "code", description="CPython 3.11.7 standard library, one document a file"),
    # The paper's sets, for users with a network.
    "pile": TextSource(
        "hub", "nickypro/minipile", description="MiniPile (the paper's retain set; its GitHub documents are not "
        "filtered out here, unlike the paper's pile_codeless)"
    ),
    # one hub split for both of ours: `load_texts` splits it by document (`is_test_document` of the text)
    "github-code": TextSource(
        "hub", "codeparrot/github-code-clean", config="all-all", text_field="code",
        splits={"train": "train", "test": "train"}, description="GitHub code, all languages",
    ),
    "github-python": TextSource(
        "hub", "codeparrot/github-code-clean", config="Python-all", text_field="code",
        splits={"train": "train", "test": "train"}, description="GitHub code, Python only",
    ),
}

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".gz": "json"}


def register_dataset(name: str, source: TextSource, *, overwrite: bool = False) -> None:
    """Add a named dataset; refuses to shadow an existing name unless `overwrite`."""
    if name in DATASETS and not overwrite:
        raise SelpruneError(f"dataset name {name!r} already exists; pass overwrite=True or pick another")
    DATASETS[name] = source


def is_test_document(doc_id: str) -> bool:
    """The split rule for sources without splits: ~10% of documents, by a hash of their id."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 10 == 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SelpruneError(f"unknown split {split!r}; use one of {SPLITS}")


def _only_text(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise SelpruneError(
            f"{where} has no field {text_field!r} (it has {ds.column_names}); pass text_field=<one of those>"
        )
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _load_bundled(src: TextSource, split: str) -> datasets.Dataset:
    path = data_dir() / src.path / f"{split}.jsonl.gz"
    if not path.is_file():
        raise SelpruneError(f"bundled corpus file {path} is missing; rebuild with `python data/build_corpora.py`")
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    return _only_text(ds, src.text_field, str(path))


def _load_local(path: Path, split: str, text_field: str) -> datasets.Dataset:
    """A file, or a folder of files. A folder with `train.*`/`test.*` files uses them as
    the splits (asking for a split it has no file for is an error, never a re-split of the
    other's documents); otherwise documents are split by `is_test_document` on their index."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_FORMATS)
        presplit = any(p.name.split(".")[0] in SPLITS for p in files)
        if presplit:  # a folder with any train.*/test.* file is pre-split: never re-split it
            files = [p for p in files if p.name.split(".")[0] == split]
            if not files:
                raise SelpruneError(
                    f"{path} holds split files ({', '.join(SPLITS)}) but no {split}.* file; add one, "
                    "or rename the files so that the folder is split by document"
                )
    else:
        files, presplit = [path], False
    if not files:
        raise SelpruneError(f"{path} holds no .txt, .jsonl, .json or .parquet files")
    kinds = {LOCAL_FORMATS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise SelpruneError(f"{path}: use files of one format among {sorted(LOCAL_FORMATS)}, not {sorted(map(str, kinds))}")
    kind = kinds.pop()
    if all(p.stat().st_size == 0 for p in files):
        raise SelpruneError(f"dataset {path} is empty (no text in {', '.join(p.name for p in files[:3])}); "
                            "add documents, or use another dataset")
    # A .txt file is one document (not one per line): prose and code both span lines.
    extra = {"sample_by": "document"} if kind == "text" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train", **extra)
    except Exception as e:  # noqa: BLE001 - whatever datasets raises, the file is unreadable as `kind`
        raise SelpruneError(f"cannot read dataset {path} as {kind} ({type(e).__name__}: {e}); "
                            "fix or remove the malformed file") from e
    ds = _only_text(ds, "text" if kind == "text" else text_field, str(path))
    if not presplit:
        keep = [i for i in range(len(ds)) if is_test_document(f"{path.name}/{i}") == (split == "test")]
        if not keep:  # e.g. a single .txt file: one document, which lands in one split only
            raise SelpruneError(
                f"{path} holds {len(ds)} document(s) and none falls in the {split!r} split (about 10% of "
                "documents go to test, chosen by a hash of their index); give it more documents (a folder "
                "of .txt files, one document each, or a .jsonl with one per line), or train.* and test.* files"
            )
        ds = ds.select(keep)
    return ds


def _load_hub(path: str, config: str | None, split: str, text_field: str) -> datasets.IterableDataset:
    if not hub_reachable():
        raise SelpruneError(
            f"dataset {path!r} is on the Hugging Face hub, which cannot be reached (no network). "
            "Use a bundled set (prose, code) or a local .txt/.jsonl/.parquet file or folder instead."
        )
    ds = datasets.load_dataset(path, config, split=split, streaming=True)
    if ds.column_names is not None and text_field not in ds.column_names:
        raise SelpruneError(f"hub dataset {path!r} has no field {text_field!r}; it has {ds.column_names}")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds


def load_texts(
    spec: str, split: str = "train", text_field: str | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Return the documents of `spec`'s `split` as a dataset with one column, `text`.

    `spec`: a name in `DATASETS`; a local file or folder (.txt, .jsonl, .json, .parquet);
    or `hub:ORG/NAME[:CONFIG]` (streamed). `text_field` overrides the field to read.
    """
    _check_split(split)
    check_dataset_spec(spec)
    if spec in DATASETS:
        src = DATASETS[spec]
        if src.kind == "bundled":
            return _load_bundled(src, split)
        ds = _load_hub(src.path, src.config, src.splits[split], text_field or src.text_field)
        if src.splits["train"] == src.splits["test"]:  # one hub split serves both: split it by document
            ds = ds.filter(lambda doc: is_test_document(doc["text"]) == (split == "test"))
        return ds
    if spec.startswith("hub:"):
        parts = spec[4:].split(":")
        return _load_hub(parts[0], parts[1] if len(parts) > 1 else None, split, text_field or "text")
    return _load_local(Path(spec).expanduser(), split, text_field or "text")


def check_dataset_spec(spec: str) -> None:
    """Refuse, without reading anything, a spec that names no dataset (a run fails early),
    and a folder that cannot be one (`check_dataset_folder`)."""
    if spec in DATASETS or spec.startswith("hub:"):
        return
    if is_image_spec(spec):  # image:DATASET:CLASSES (selprune.vision)
        parse_image_spec(spec)
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        check_dataset_folder(path)
    if path.exists():
        return
    raise SelpruneError(
        f"unknown dataset {spec!r}: not a name ({', '.join(sorted(DATASETS))}), no file or folder of that "
        "name exists (check the path), and not a hub spec (write hub:ORG/NAME[:CONFIG])"
    )


DATA_DEPTH = 2  # a dataset folder has a data file at most this many levels down
_SCAN_LIMIT = 10_000  # entries looked at, at most, to find one


def check_dataset_folder(path: Path) -> None:
    """Refuse a folder that is no dataset before it is walked: the file system root (every
    file below it would be read, /proc included) or /proc, /sys, /dev, or one without a
    data file in its top `DATA_DEPTH` levels (e.g. /usr given by mistake)."""
    full = path.resolve()
    formats = ", ".join(sorted(LOCAL_FORMATS))
    if full == Path(full.anchor) or (os.name == "posix" and full.parts[1:2] in (("proc",), ("sys",), ("dev",))):
        what = "the root of the file system" if full == Path(full.anchor) else "a system folder, not documents"
        raise SelpruneError(f"dataset folder {path} is {what}; pass the folder (or file) that holds the documents "
                            f"({formats} files)")
    if not _has_data_file(full):
        raise SelpruneError(f"dataset folder {path} holds no data files ({formats}) in its top {DATA_DEPTH} levels; "
                            "pass the folder (or file) that holds the documents")


def _has_data_file(folder: Path) -> bool:
    """Whether a file of a `LOCAL_FORMATS` suffix lies within `DATA_DEPTH` levels of `folder`
    (breadth first, unreadable folders skipped, at most `_SCAN_LIMIT` entries)."""
    level, seen = [folder], 0
    for _ in range(DATA_DEPTH):
        below = []
        for d in level:
            try:
                with os.scandir(d) as entries:
                    for e in entries:
                        seen += 1
                        if seen > _SCAN_LIMIT:
                            return False
                        if e.is_file() and Path(e.name).suffix in LOCAL_FORMATS:
                            return True
                        if e.is_dir(follow_symlinks=False):
                            below.append(Path(e.path))
            except OSError:
                continue
        level = below
    return False
