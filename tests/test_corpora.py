"""The bundled corpora (data/<name>/<split>.jsonl.gz) are present, well formed and reproducible.

Experiments are only comparable if everybody evaluates on the same bytes, so these tests
pin the committed files to data/manifest.json and, where the pinned interpreter and the
Debian archive are available, rebuild everything from source and demand identical output.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
NAMES = ("prose", "code")
SPLITS = ("train", "test")
ID_PREFIX = {"prose": "austen/", "code": "cpython-3.11.7/Lib/"}


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_corpora", DATA / "build_corpora.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def corpora() -> dict[tuple[str, str], tuple[bytes, list[dict]]]:
    """(name, split) -> (decompressed bytes, documents), read once for all tests."""
    return {(n, s): builder.read_jsonl_gz(DATA / n / f"{s}.jsonl.gz") for n in NAMES for s in SPLITS}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_committed_file_exists_with_deterministic_gzip_header(name: str, split: str) -> None:
    path = DATA / name / f"{split}.jsonl.gz"
    assert path.is_file(), f"{path} missing; run `python data/build_corpora.py`"
    header = path.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0, "gzip header stores a file name"
    assert header[4:8] == b"\0\0\0\0", "gzip header stores an mtime"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_documents_are_well_formed(corpora, name: str, split: str) -> None:
    raw, docs = corpora[name, split]
    assert docs, f"{name}/{split} is empty"
    for doc in docs:
        assert set(doc) == {"id", "text"}
        assert isinstance(doc["id"], str) and doc["id"].startswith(ID_PREFIX[name])
        assert isinstance(doc["text"], str) and doc["text"].strip(), f"{doc['id']} is empty"
        assert builder.split_of(doc["id"]) == split, f"{doc['id']} is in the wrong split"
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids must be unique and sorted"
    assert builder.jsonl_bytes(docs) == raw, "lines are not in the canonical json.dumps format"


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint_by_id_and_content(corpora, name: str) -> None:
    train, test = corpora[name, "train"][1], corpora[name, "test"][1]
    assert not {d["id"] for d in train} & {d["id"] for d in test}
    assert not {d["text"] for d in train} & {d["text"] for d in test}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_manifest_matches_files(manifest, corpora, name: str, split: str) -> None:
    raw, docs = corpora[name, split]
    entry = manifest["corpora"][name][split]
    assert entry["path"] == f"{name}/{split}.jsonl.gz"
    assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert entry["documents"] == len(docs)
    assert entry["characters"] == sum(len(d["text"]) for d in docs)
    assert entry["tokens"] > 0


def test_committed_files_match_manifest_via_builder() -> None:
    """The same integrity check `build_corpora.py --check` starts with (includes code/LICENSE.txt)."""
    assert builder.verify_committed(DATA) == []


def test_rebuild_is_bit_identical(tmp_path: Path, manifest) -> None:
    """Rebuilding from the pinned sources reproduces the committed corpora exactly (~40 s)."""
    want = ".".join(map(str, builder.REQUIRED_PYTHON))
    if sys.implementation.name != "cpython" or sys.version_info[:3] != builder.REQUIRED_PYTHON:
        pytest.skip(f"the code corpus is CPython {want}'s stdlib; this is Python {sys.version.split()[0]}")
    try:
        rebuilt = builder.build(tmp_path)
    except builder.SourceUnavailableError as exc:
        pytest.skip(f"pinned source unavailable (no network for apt-get?): {exc}")
    differences = builder._diff(builder._comparable(manifest), builder._comparable(rebuilt))
    assert not differences, "rebuilt manifest differs:\n" + "\n".join(differences)
    for name in NAMES:
        for split in SPLITS:
            rel = Path(name) / f"{split}.jsonl.gz"
            old, new = (DATA / rel).read_bytes(), (tmp_path / rel).read_bytes()
            assert gzip.decompress(old) == gzip.decompress(new), f"{rel}: content differs after rebuild"
            if old != new:  # same content; only the compressor differs (another zlib build)
                warnings.warn(f"{rel}: identical content but different gzip bytes", stacklevel=1)
    assert (tmp_path / "manifest.json").read_bytes() == builder.manifest_bytes(rebuilt)
    assert (tmp_path / builder.CODE_LICENSE_FILE).read_bytes() == (DATA / builder.CODE_LICENSE_FILE).read_bytes()
