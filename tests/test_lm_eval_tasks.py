"""The offline lm-eval tasks in data/lm_eval/: rebuilt bit for bit from the bundled corpora,
and every item a well-formed four-way choice whose answer is the document's true next
line (code) or sentence (prose)."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
import yaml

from selprune.harness import LOCAL_TASKS, local_task
from selprune.paths import data_dir

spec = importlib.util.spec_from_file_location("build_lm_eval_tasks", data_dir() / "build_lm_eval_tasks.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir() / "lm_eval" / f"{name}.jsonl").read_text().splitlines()]


def _docs(corpus: str) -> dict[str, str]:
    with gzip.open(data_dir() / corpus / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        return {d["id"]: d["text"] for d in map(json.loads, f)}


def test_rebuild_is_bit_identical() -> None:
    files = build.build()
    assert set(files) == {"code_next_line.jsonl", "prose_next_sentence.jsonl", "manifest.json"}
    for name, data in files.items():
        assert (data_dir() / "lm_eval" / name).read_bytes() == data, f"{name} differs from a rebuild"
    assert build.main(["--check"]) == 0


@pytest.mark.parametrize(("name", "corpus", "minimum"), [("code_next_line", "code", 100),
                                                         ("prose_next_sentence", "prose", 100)])
def test_items_are_four_distinct_choices_with_the_true_continuation(name, corpus, minimum) -> None:
    items, docs = _items(name), _docs(corpus)
    assert len(items) >= minimum and len({it["id"] for it in items}) == len(items)
    labels = [it["label"] for it in items]
    assert all(labels.count(k) > len(items) / 8 for k in range(4))  # no position gives the answer away
    for it in items:
        doc_id, pos = it["id"].rsplit(":", 1)
        assert len(it["choices"]) == 4 and len({c.strip() for c in it["choices"]}) == 4
        answer, text = it["choices"][it["label"]], docs[doc_id]
        if corpus == "code":  # the context is the lines just before, the answer the next line
            lines = text.split("\n")
            assert answer == lines[int(pos)]
            assert it["context"] + answer in text
            assert all(c in lines for c in it["choices"])  # distractors: lines of the same file
        else:  # prose: the answer sentence follows the context in the chapter (whitespace folded)
            flat = " ".join(text.split())
            assert it["context"] + answer in flat
            assert all(c.strip() in flat for c in it["choices"])


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_task_definitions_point_at_the_shipped_data(task) -> None:
    cfg = local_task(task)
    raw = yaml.safe_load((data_dir() / "lm_eval" / f"{task}.yaml").read_text())
    assert cfg["task"] == raw["task"] == task and cfg["output_type"] == "multiple_choice"
    path = cfg["dataset_kwargs"]["data_files"]["test"]
    assert path.startswith(str(data_dir())) and path.endswith(raw["dataset_kwargs"]["data_files"]["test"])
