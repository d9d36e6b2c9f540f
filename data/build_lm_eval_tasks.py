#!/usr/bin/env python3
"""Build the two offline lm-evaluation-harness tasks from the bundled corpora, bit-identically.

Usage::

    python data/build_lm_eval_tasks.py           # (re)write data/lm_eval/*.jsonl + manifest.json
    python data/build_lm_eval_tasks.py --check   # rebuild in memory, compare, exit 1 on mismatch

Why: unlearning is judged by benchmark accuracy through lm-evaluation-harness, and the
usual benchmarks live on the Hugging Face hub. These two multiple-choice cloze tasks need
no network and measure the two capabilities of the default experiment directly, from the
test splits of the bundled corpora (text no collection or training window ever reads):

* ``selprune_code_next_line`` (forget side): a few lines of a Python file, then the true
  next line among four lines of the same file (distractors with the true line's
  indentation where the file has enough of them, so that indentation alone does not give
  the answer).
* ``selprune_prose_next_sentence`` (retain side): two sentences of an Austen chapter, then
  the true next sentence among four sentences of the same chapter.

Everything is a function of the corpus bytes: targets and distractors are picked by
SHA-256 of the document id and position, never by a random generator's state, so a
rebuild on any machine gives the same files. The task definitions (``*.yaml``, lm-eval's
format, reading ``dataset_path: json``) sit beside the data; ``selprune.harness`` points
their ``data_files`` at this folder. Output: one JSON object per line,
``json.dumps(obj, ensure_ascii=False, sort_keys=True)``, items in document order.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
OUT_DIR = DATA_DIR / "lm_eval"
MANIFEST_FORMAT = "selprune-lm-eval-tasks/1"
CHOICES = 4

CODE_PER_FILE = 4  # targets per file (36 test files: at most 144 items)
CODE_CONTEXT_LINES = 8  # lines of context before the target, blank ones included
CODE_MIN, CODE_MAX = 12, 100  # characters of a candidate line, stripped

PROSE_PER_CHAPTER = 8  # targets per chapter (19 test chapters: at most 152 items)
PROSE_CONTEXT = 2  # sentences of context
PROSE_MIN, PROSE_MAX = 30, 240  # characters of a candidate sentence
# a sentence ends at . ! or ? (and a closing quote) before a capital or an opening quote, but
# not after the titles Austen abbreviates ("Mr. Weston")
_SENTENCE_END = re.compile(r"(?<=[.!?][\"'])\s+(?=[\"'A-Z])"
                           r"|(?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)\s+(?=[\"'A-Z])")


def _rank(*parts: object) -> int:
    """A fixed pseudo-random rank of a position: the SHA-256 of its parts."""
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest(), 16)


def _documents(name: str) -> Iterator[tuple[str, str]]:
    with gzip.open(DATA_DIR / name / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield doc["id"], doc["text"]


def _item(doc_id: str, pos: int, context: str, target: str, pool: list[str]) -> dict | None:
    """A four-way item: `target` among three distinct members of `pool` (ranked by hash),
    in an order fixed by hash; None if the pool has too few."""
    others = sorted({p for p in pool if p.strip() != target.strip()}, key=lambda p: _rank(doc_id, pos, p))
    if len(others) < CHOICES - 1:
        return None
    choices = sorted([target, *others[: CHOICES - 1]], key=lambda c: _rank(doc_id, pos, "order", c))
    return {"id": f"{doc_id}:{pos}", "context": context, "choices": choices, "label": choices.index(target)}


def code_items() -> Iterator[dict]:
    for doc_id, text in _documents("code"):
        lines = text.split("\n")
        ok = [i for i, line in enumerate(lines)
              if CODE_MIN <= len(line.strip()) <= CODE_MAX and not line.strip().startswith("#")]
        targets = [i for i in ok if i >= CODE_CONTEXT_LINES and sum(bool(s.strip()) for s in lines[i - 3:i]) >= 2]
        for i in sorted(sorted(targets, key=lambda i: _rank(doc_id, i))[:CODE_PER_FILE]):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            same = [lines[j] for j in ok if j != i and lines[j].startswith(indent) and not lines[j][len(indent)].isspace()]
            pool = same if len({s.strip() for s in same} - {lines[i].strip()}) >= CHOICES - 1 else [lines[j] for j in ok]
            context = "\n".join(lines[i - CODE_CONTEXT_LINES:i]) + "\n"
            item = _item(doc_id, i, context, lines[i], pool)
            if item:
                yield item


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def prose_items() -> Iterator[dict]:
    for doc_id, text in _documents("prose"):
        sents = _sentences(text)
        ok = [i for i, s in enumerate(sents) if PROSE_MIN <= len(s) <= PROSE_MAX]
        targets = [i for i in ok if i >= PROSE_CONTEXT]
        for i in sorted(sorted(targets, key=lambda i: _rank(doc_id, i))[:PROSE_PER_CHAPTER]):
            context = " ".join(sents[i - PROSE_CONTEXT:i])
            item = _item(doc_id, i, context, " " + sents[i], [" " + sents[j] for j in ok if j != i])
            if item:
                yield item


TASKS: dict[str, Callable[[], Iterator[dict]]] = {
    "code_next_line": code_items,
    "prose_next_sentence": prose_items,
}


def build() -> dict[str, bytes]:
    """File name -> bytes of every data file and the manifest."""
    files = {f"{name}.jsonl": "".join(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n"
                                      for it in make()).encode("utf-8")
             for name, make in TASKS.items()}
    manifest = {"format": MANIFEST_FORMAT, "files": {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "items": data.count(b"\n")} for name, data in files.items()}}
    files["manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rebuild in memory and compare with data/lm_eval/")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        bad = [n for n, data in files.items() if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_bytes() != data]
        for n in bad:
            print(f"data/lm_eval/{n}: differs from a rebuild (run python data/build_lm_eval_tasks.py)", file=sys.stderr)
        return 1 if bad else 0
    OUT_DIR.mkdir(exist_ok=True)
    for name, data in files.items():
        (OUT_DIR / name).write_bytes(data)
        lines = data.count(b"\n")
        print(f"wrote data/lm_eval/{name} ({lines} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
