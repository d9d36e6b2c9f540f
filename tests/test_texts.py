"""load_texts (bundled, local, hub presets) and token_windows / top_tokens (issue #2)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

import selprune.texts as texts
from selprune.errors import SelpruneError
from selprune.texts import DATASETS, TextSource, adds_bos, load_texts, register_dataset, token_windows, top_tokens

BUNDLED = ("prose", "code")
HUB_PRESETS = ("pile", "github-code", "github-python")


def rows(ds) -> list[str]:
    return list(ds["text"])


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def docs(n: int, lines: int = 3) -> list[str]:
    return [
        "\n".join(f"Document {i}, line {j}: the quick brown fox {i * j} jumps." for j in range(lines)) for i in range(n)
    ]


@pytest.fixture
def offline_hub(monkeypatch):
    """No hub, and a loud failure if anything tries to fetch a dataset from it anyway."""
    monkeypatch.setattr(texts, "hub_reachable", lambda *a, **k: False)

    def no_fetch(*args, **kwargs):
        raise AssertionError("load_texts tried to reach the hub although it is unreachable")

    monkeypatch.setattr(texts.datasets, "load_dataset", no_fetch)


@pytest.fixture
def restore_datasets():
    saved = dict(DATASETS)
    yield
    DATASETS.clear()
    DATASETS.update(saved)


# ------------------------------------------------------------------------ bundled
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_splits_load_and_are_disjoint(name):
    train, test = load_texts(name, "train"), load_texts(name, "test")
    for ds in (train, test):
        assert isinstance(ds, datasets.Dataset)
        assert ds.column_names == ["text"]
        assert len(ds) > 0
    train_texts, test_texts = rows(train), rows(test)
    assert all(isinstance(t, str) and t.strip() for t in train_texts + test_texts)
    assert len(train) > len(test)
    assert not set(train_texts) & set(test_texts)


def test_unknown_split_errors():
    with pytest.raises(SelpruneError, match="validation"):
        load_texts("prose", "validation")


# ------------------------------------------------------------------------- local
def test_local_txt_file_is_one_document(tmp_path):
    text = "First line of a book.\n\nSecond paragraph, which spans\ntwo lines.\n"
    path = tmp_path / "book.txt"
    path.write_text(text)
    loaded, refused = {}, {}
    for split in ("train", "test"):
        try:
            loaded[split] = load_texts(str(path), split)
        except SelpruneError as e:
            refused[split] = str(e)
    # one document lands in one split whole; asking for the other names the problem and the fix
    assert len(loaded) == len(refused) == 1
    (ds,) = loaded.values()
    assert ds.column_names == ["text"] and rows(ds) == [text]
    (msg,) = refused.values()
    assert "1 document(s)" in msg and "a folder of .txt files" in msg


def test_local_txt_folder_splits_by_document(tmp_path):
    contents = docs(40)
    for i, text in enumerate(contents):
        (tmp_path / f"doc{i:02d}.txt").write_text(text)
    train, test = rows(load_texts(str(tmp_path), "train")), rows(load_texts(str(tmp_path), "test"))
    assert train and test
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(contents)  # each file whole, none lost or doubled


def test_local_jsonl_with_custom_text_field(tmp_path):
    bodies = docs(40)
    path = tmp_path / "notes.jsonl"
    write_jsonl(path, [{"id": i, "body": b} for i, b in enumerate(bodies)])
    train = load_texts(str(path), "train", text_field="body")
    test = load_texts(str(path), "test", text_field="body")
    assert train.column_names == test.column_names == ["text"]
    assert len(test) > 0 and not set(rows(train)) & set(rows(test))
    assert sorted(rows(train) + rows(test)) == sorted(bodies)


def test_local_parquet_file(tmp_path):
    contents = docs(40)
    path = tmp_path / "corpus.parquet"
    pd.DataFrame({"text": contents, "n": range(40)}).to_parquet(path)
    train, test = load_texts(str(path), "train"), load_texts(str(path), "test")
    assert train.column_names == ["text"]
    assert sorted(rows(train) + rows(test)) == sorted(contents)


def test_local_folder_with_split_files_uses_them(tmp_path):
    train_docs, test_docs = docs(12), [f"held-out document {i}" for i in range(5)]
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in train_docs])
    write_jsonl(tmp_path / "test.jsonl", [{"text": t} for t in test_docs])
    assert rows(load_texts(str(tmp_path), "train")) == train_docs
    assert rows(load_texts(str(tmp_path), "test")) == test_docs


def test_local_folder_missing_one_split_file_errors(tmp_path):
    """A folder with only train.jsonl must not make a test split out of train's documents."""
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in docs(50)])
    assert len(load_texts(str(tmp_path), "train")) == 50
    with pytest.raises(SelpruneError, match="test"):
        load_texts(str(tmp_path), "test")


def test_missing_text_field_names_it(tmp_path):
    path = tmp_path / "notes.jsonl"
    write_jsonl(path, [{"body": t} for t in docs(5)])
    with pytest.raises(SelpruneError, match=r"has no field 'text' \(it has \['body'\]\); pass text_field="):
        load_texts(str(path), "train")
    with pytest.raises(SelpruneError, match="'content'"):
        load_texts(str(path), "train", text_field="content")


def test_mixed_formats_folder_errors(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json text"}])
    with pytest.raises(SelpruneError, match="one format"):
        load_texts(str(tmp_path), "train")


def test_unknown_spec_errors(tmp_path):
    with pytest.raises(SelpruneError) as e:
        load_texts(str(tmp_path / "no-such-corpus"), "train")
    assert "unknown dataset" in str(e.value) and "prose" in str(e.value) and "hub:" in str(e.value)


def test_missing_dataset_names_the_fix(tmp_path):
    missing = str(tmp_path / "no-such-corpus.jsonl")
    with pytest.raises(SelpruneError, match=r"unknown dataset .*no-such-corpus.jsonl.*no file or folder .*check the path"):
        load_texts(missing, "train")
    # the check without reading anything, which parameter validation runs before any work
    with pytest.raises(SelpruneError, match=r"no-such-corpus.jsonl.*check the path"):
        texts.check_dataset_spec(missing)


@pytest.mark.parametrize("folder, what", [("/", "the root of the file system"), ("/proc", "a system folder")])
def test_the_root_and_system_folders_are_refused_before_being_walked(folder, what, monkeypatch):
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder} here")

    def walked(*a, **k):
        raise AssertionError("the folder was walked")

    monkeypatch.setattr(Path, "rglob", walked)
    with pytest.raises(SelpruneError, match=rf"dataset folder {folder} is {what}.*pass the folder \(or file\) "
                                            "that holds the documents"):
        load_texts(folder, "train")


def test_a_dataset_folder_needs_a_data_file_in_its_top_two_levels(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "readme.md").write_text("not data")
    with pytest.raises(SelpruneError, match=r"holds no data files \(.*\.jsonl.*\) in its top 2 levels; pass the "
                                            r"folder \(or file\) that holds the documents"):
        texts.check_dataset_spec(str(tmp_path))
    write_jsonl(tmp_path / "a" / "b" / "deep.jsonl", [{"text": "three levels down"}])
    with pytest.raises(SelpruneError, match="in its top 2 levels"):
        texts.check_dataset_spec(str(tmp_path))
    texts.check_dataset_spec(str(tmp_path / "a"))  # two levels down from a: found
    write_jsonl(tmp_path / "a" / "near.jsonl", [{"text": "two levels down"}])
    texts.check_dataset_spec(str(tmp_path))


def test_series_refuses_a_missing_dataset_before_making_its_run_directory(tmp_path):
    from selprune.experiment.series import Series

    missing = str(tmp_path / "no-such-corpus.jsonl")
    with pytest.raises(SelpruneError, match=r"no-such-corpus.jsonl.*check the path"):
        Series(progress=False, forget=missing, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_empty_dataset_names_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("")
    with pytest.raises(SelpruneError, match=r"dataset .*empty is empty \(no text in docs.jsonl\); add documents"):
        load_texts(str(folder), "train")


def test_malformed_dataset_file_names_the_fix(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(SelpruneError, match=r"cannot read dataset .*broken.jsonl as json.*fix or remove the malformed "
                                            r"file"):
        load_texts(str(path), "train")


# ----------------------------------------------------------------------- hub sets
def test_hub_presets_registered_apart_from_bundled():
    bundled = {name for name, src in DATASETS.items() if src.kind == "bundled"}
    hub = {name for name, src in DATASETS.items() if src.kind == "hub"}
    assert set(BUNDLED) <= bundled and set(HUB_PRESETS) <= hub
    assert not bundled & hub
    for name in HUB_PRESETS:
        src = DATASETS[name]
        assert src.path.count("/") == 1 and set(src.splits) == set(texts.SPLITS)
    assert DATASETS["github-code"].text_field == DATASETS["github-python"].text_field == "code"


def test_a_hub_set_with_one_split_is_split_by_document(restore_datasets, monkeypatch):
    """github-code's hub copy has only a train split: our train and test must not share a
    document (before, test read the same stream as train)."""
    docs = [f"def f{i}():\n    return {i}\n" for i in range(200)]
    seen = []

    def fake_hub(path, config, split, text_field):
        seen.append(split)
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

    monkeypatch.setattr(texts, "_load_hub", fake_hub)
    register_dataset("one-split", TextSource("hub", "org/one", splits={"train": "train", "test": "train"}))
    train = [d["text"] for d in load_texts("one-split", "train")]
    test = [d["text"] for d in load_texts("one-split", "test")]
    assert seen == ["train", "train"] and not set(train) & set(test)
    assert sorted(train + test) == sorted(docs) and 5 <= len(test) <= 40  # ~10% by the hash rule
    register_dataset("two-splits", TextSource("hub", "org/two"))
    assert [d["text"] for d in load_texts("two-splits", "test")] == docs  # a real test split is read whole


def test_register_dataset_refuses_to_shadow(restore_datasets):
    with pytest.raises(SelpruneError, match="already exists"):
        register_dataset("prose", TextSource("hub", "someorg/prose"))
    assert DATASETS["prose"].kind == "bundled"
    register_dataset("my-set", TextSource("hub", "someorg/myset"))
    assert DATASETS["my-set"].path == "someorg/myset"


@pytest.mark.parametrize("spec", [*HUB_PRESETS, "hub:someorg/someset", "hub:someorg/someset:config"])
def test_hub_spec_offline_gives_clear_error(spec, offline_hub):
    with pytest.raises(SelpruneError) as e:
        load_texts(spec, "train")
    msg = str(e.value)
    assert "no network" in msg and "prose" in msg and "local" in msg


def test_hub_spec_offline_without_patching(monkeypatch):
    """With HF_HUB_OFFLINE set (as in this suite) the real probe says no, at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SelpruneError, match="no network"):
        load_texts("pile", "test")


# ------------------------------------------------------------------------ windows
def stream(tokenizer, documents) -> list[int]:
    out: list[int] = []
    for d in documents:
        out += tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return out


def test_smollm_tokenizer_adds_no_bos_and_fixture_does(smollm_tokenizer, bos_tokenizer):
    assert not adds_bos(smollm_tokenizer)
    assert adds_bos(bos_tokenizer)
    assert bos_tokenizer("a").input_ids[0] == bos_tokenizer.bos_token_id


def test_windows_pack_documents_in_order_without_bos(smollm_tokenizer):
    tok, documents = smollm_tokenizer, docs(30)
    w = token_windows(documents, tok, window=32, max_tokens=None, seed=None)
    assert w.dtype == torch.long and w.shape[1] == 32
    expected = stream(tok, documents)
    assert w.flatten().tolist() == expected[: w.numel()]
    assert len(expected) - w.numel() < 32  # only the incomplete tail is dropped
    assert not (w[:, 0] == tok.bos_token_id).all()


def test_windows_start_with_bos_when_tokenizer_adds_it(bos_tokenizer):
    tok, documents = bos_tokenizer, docs(30)
    w = token_windows(documents, tok, window=32, max_tokens=None, seed=None)
    assert w.shape[1] == 32
    assert (w[:, 0] == tok.bos_token_id).all()
    assert not (w[:, 1:] == tok.bos_token_id).any()
    expected = stream(tok, documents)
    assert w[:, 1:].flatten().tolist() == expected[: w.shape[0] * 31]


def test_windows_deterministic_by_seed(smollm_tokenizer):
    ds = load_texts("prose", "test")
    a = token_windows(ds, smollm_tokenizer, window=64, max_tokens=256, seed=0)
    b = token_windows(ds, smollm_tokenizer, window=64, max_tokens=256, seed=0)
    c = token_windows(ds, smollm_tokenizer, window=64, max_tokens=256, seed=1)
    assert torch.equal(a, b)
    assert a.shape == c.shape and not torch.equal(a, c)


def test_windows_of_plain_lists_shuffle_by_seed(smollm_tokenizer):
    documents = [f"Document number {i} has its own words." for i in range(60)]
    a = token_windows(documents, smollm_tokenizer, window=16, max_tokens=160, seed=0)
    assert torch.equal(a, token_windows(documents, smollm_tokenizer, window=16, max_tokens=160, seed=0))
    assert not torch.equal(a, token_windows(documents, smollm_tokenizer, window=16, max_tokens=160, seed=1))
    assert documents == [f"Document number {i} has its own words." for i in range(60)]  # input untouched


@pytest.mark.parametrize(("window", "max_tokens"), [(64, 1000), (64, 64), (128, 1024), (100, 999)])
def test_windows_respect_budget_exactly(smollm_tokenizer, window, max_tokens):
    w = token_windows(load_texts("code", "test"), smollm_tokenizer, window=window, max_tokens=max_tokens, seed=0)
    assert w.shape == (max_tokens // window, window)
    assert w.numel() <= max_tokens


def test_budget_below_one_window_errors(smollm_tokenizer):
    with pytest.raises(SelpruneError, match="budget"):
        token_windows(docs(5), smollm_tokenizer, window=64, max_tokens=63)


def test_strict_shortfall_errors(smollm_tokenizer):
    documents = docs(10)
    available = len(stream(smollm_tokenizer, documents)) // 16
    budget = (available + 5) * 16
    with pytest.raises(SelpruneError) as e:
        token_windows(documents, smollm_tokenizer, window=16, max_tokens=budget, seed=0)
    assert str(budget) in str(e.value) and f"{available} windows" in str(e.value)
    w = token_windows(documents, smollm_tokenizer, window=16, max_tokens=budget, seed=0, strict=False)
    assert w.shape == (available, 16)


def test_dataset_too_small_for_the_token_budget_names_the_fix(smollm_tokenizer):
    with pytest.raises(SelpruneError, match=r"hold only \d+ tokens .*short of the budget of 4096; lower the token "
                                            r"budget"):
        token_windows(["def f(x):\n    return x\n"] * 3, smollm_tokenizer, window=64, max_tokens=4096)


def test_empty_texts_error(smollm_tokenizer):
    with pytest.raises(SelpruneError, match="empty"):
        token_windows(["", ""], smollm_tokenizer, window=16, max_tokens=None)


@pytest.mark.parametrize("window", [1, 0, -3])
def test_window_below_two_errors(smollm_tokenizer, window):
    with pytest.raises(SelpruneError, match="window"):
        token_windows(docs(5), smollm_tokenizer, window=window)


def test_max_doc_tokens_truncates(smollm_tokenizer):
    tok, documents = smollm_tokenizer, docs(20, lines=10)
    w = token_windows(documents, tok, window=8, max_tokens=None, seed=None, max_doc_tokens=5)
    expected: list[int] = []
    for d in documents:
        expected += tok(d, add_special_tokens=False).input_ids[:5] + [tok.eos_token_id]
    assert w.flatten().tolist() == expected[: w.numel()]


# ---------------------------------------------------------------------- top_tokens
def reference_top(windows: torch.Tensor, k: int) -> list[int]:
    counts = Counter(windows.flatten().tolist())
    return sorted(sorted(counts, key=lambda t: (-counts[t], t))[:k])


@pytest.mark.parametrize("k", [1, 5, 50, 10_000])
def test_top_tokens_are_the_most_frequent(k):
    g = torch.Generator().manual_seed(0)
    windows = (torch.randn(40, 64, generator=g).abs() * 40).long()  # skewed: low ids frequent, many ties
    top = top_tokens(windows, k)
    assert top.tolist() == reference_top(windows, k)
    assert len(top) == min(k, len(torch.unique(windows)))


def test_top_tokens_breaks_ties_by_lower_id():
    windows = torch.tensor([[7, 7, 3, 3, 9, 9, 1]])
    assert top_tokens(windows, 2).tolist() == [3, 7]
