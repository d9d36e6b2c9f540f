"""The run-kind registry (selprune/experiment/runs.py): what each pruning run prunes, the
`runs` parameter's parsing, and the notebooks that do each run."""

from __future__ import annotations

import pytest

from selprune.errors import SelpruneError
from selprune.experiment.notebooks import NOTEBOOK_DIR, NOTEBOOKS
from selprune.experiment.runs import (
    FLOOR,
    RUN_KINDS,
    RunKind,
    parse_runs,
    register_run_kind,
    run_kind,
    runs_of_notebook,
)
from selprune.sites import KINDS


@pytest.mark.parametrize(("text", "names"), [
    ("ff", ["ff"]),
    ("ff,random", ["ff", "random"]),
    ("ff, random", ["ff", "random"]),
    ("  attn_heads ,  both ", ["attn_heads", "both"]),
    ("ff,random,", ["ff", "random"]),
    ("", []),
])
def test_parse_runs_accepts_spaces(text, names):
    assert parse_runs(text) == names


def test_parse_runs_keeps_the_given_order():
    assert parse_runs("both,ff") == ["both", "ff"]


def test_parse_runs_refuses_unknown_names():
    with pytest.raises(SelpruneError, match=r"runs='ff, bogus' names unknown runs \['bogus'\]; choose among "
                                            r"ff, random, attn, attn_heads, both"):
        parse_runs("ff, bogus")


@pytest.mark.parametrize("text", ["ff,ff", "ff, random, ff "])
def test_parse_runs_refuses_duplicates(text):
    with pytest.raises(SelpruneError, match=r"names a run twice; list each once"):
        parse_runs(text)


def test_run_kind():
    assert run_kind("attn_heads") is RUN_KINDS["attn_heads"]
    with pytest.raises(SelpruneError, match=r"unknown run 'heads'; choose among ff, random, attn, attn_heads, both"):
        run_kind("heads")


def test_runs_registry_names_a_kind_for_each_run():
    assert set(RUN_KINDS) >= {"ff", "random", "attn", "attn_heads", "both"}
    for name, kind in RUN_KINDS.items():
        assert kind.name == name
        assert set(kind.kinds) <= set(KINDS), name
        assert bool(kind.kinds) != bool(kind.method), f"{name}: prunes neurons or trains a baseline, one of the two"
        assert len(set(kind.kinds)) == len(kind.kinds)
        assert kind.axis == (kind.kinds[0] if kind.kinds else "ff")
        if kind.whole_heads:
            assert "attn" in kind.kinds, f"{name} scores whole heads but prunes no attention neurons"


def test_the_kinds_of_the_registered_runs():
    kinds = {n: (k.kinds, k.random, k.whole_heads) for n, k in RUN_KINDS.items()}
    assert kinds["ff"] == (("ff",), False, False)
    assert kinds["random"] == (("ff",), True, False)
    assert kinds["attn"] == (("attn",), False, False)
    assert kinds["attn_heads"] == (("attn",), False, True)
    assert kinds["both"] == (("ff", "attn"), False, False)
    assert [n for n, k in RUN_KINDS.items() if k.exports] == ["ff"], "one run writes pruned-model/"


def test_the_floor_is_a_random_run():
    assert RUN_KINDS[FLOOR].random


@pytest.mark.parametrize("name", list(RUN_KINDS))
def test_each_run_kinds_notebook_exists(name):
    notebook = RUN_KINDS[name].notebook
    assert (NOTEBOOK_DIR / notebook).is_file(), f"run {name}: notebooks/{notebook} is missing"
    assert notebook in NOTEBOOKS, f"run {name}: {notebook} is not in the series"


def test_runs_of_notebook_in_registry_order():
    names = ["both", "attn", "random", "ff", "attn_heads"]
    assert runs_of_notebook("03_prune_ffn.ipynb", names) == ["ff", "random"]
    assert runs_of_notebook("04_prune_attention.ipynb", names) == ["attn", "attn_heads", "both"]
    assert runs_of_notebook("04_prune_attention.ipynb", ["ff"]) == []
    assert sorted(r for nb in NOTEBOOKS for r in runs_of_notebook(nb, list(RUN_KINDS))) == sorted(RUN_KINDS)


def test_register_run_kind_refuses_a_duplicate():
    original = RUN_KINDS["ff"]
    with pytest.raises(SelpruneError, match=r"run kind 'ff' is already registered; pass overwrite=True to replace it"):
        register_run_kind(RunKind("ff", ("attn",), "04_prune_attention.ipynb"))
    assert RUN_KINDS["ff"] is original, "a refused registration changes nothing"


def test_a_registered_run_kind_is_known_everywhere():
    probe = RunKind("probe", ("ff", "attn"), "04_prune_attention.ipynb", random=True)
    try:
        register_run_kind(probe)
        assert parse_runs("ff, probe") == ["ff", "probe"] and run_kind("probe") is probe
        replacement = RunKind("probe", ("attn",), "04_prune_attention.ipynb")
        register_run_kind(replacement, overwrite=True)
        assert RUN_KINDS["probe"] is replacement
    finally:
        RUN_KINDS.pop("probe", None)
    with pytest.raises(SelpruneError, match="unknown runs"):
        parse_runs("probe")
