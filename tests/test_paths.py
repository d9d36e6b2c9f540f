"""Where selprune writes, and how (selprune/paths.py): every output write in the package
is atomic, and an interrupted one keeps the old file."""

from __future__ import annotations

import ast
import json
import os
import stat

import pytest

from selprune.paths import REPO_ROOT, atomic_write_bytes, atomic_write_json, cache_dir, data_dir

PACKAGE = REPO_ROOT / "selprune"
# Calls that write files, and the functions allowed to make them because they write a
# temporary file or folder that they then rename into place (or write into memory).
WRITERS = {"write", "write_text", "write_bytes", "save_pretrained", "savefig", "save_file", "to_csv", "to_json",
           "to_parquet", "dump", "execute_notebook"}
ALLOWED = {
    ("paths.py", "atomic_write_bytes", "write"),  # the temporary file itself, then os.replace
    ("models.py", "convert_gguf", "save_pretrained"),  # a temporary folder, then os.replace
    ("prune.py", "export_pruned", "save_pretrained"),  # .NAME.tmp, then rename
    ("vit_train.py", "_save", "save_pretrained"),  # a hidden folder beside `out`, then rename
    ("experiment/notebooks.py", "run_series", "execute_notebook"),  # .tmp-NAME, then replace
    ("experiment/notebooks.py", "regenerate", "write"),  # nbformat.write into NAME.tmp, then replace
    ("plots.py", "save_figure", "savefig"),  # a BytesIO, then atomic_write_bytes
}
NOT_OUTPUTS = {  # writes that leave no result file behind
    ("experiment/baselines.py", "_reset_cpu_peak", "open"),  # /proc/self/clear_refs: a kernel control file
    ("experiment/baselines.py", "_reset_cpu_peak", "write"),
    ("humaneval.py", "run_program", "write_text"),  # the program to run, in a throw-away temporary folder
    ("experiment/tracking.py", "log_results", "to_json"),  # DataFrame.to_json() with no path: a string
}


class _Writes(ast.NodeVisitor):
    """(file, innermost function, call) for every call that may write a file."""

    def __init__(self, file: str) -> None:
        self.file, self.stack, self.found = file, ["<module>"], set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        torch_save = name == "save" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch"
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        writes_open = name == "open" and isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+")
        if name in WRITERS or torch_save or writes_open:
            self.found.add((self.file, self.stack[-1], "open" if writes_open else name))
        self.generic_visit(node)


def test_every_output_write_is_atomic():
    """Every module of the package, subpackages included (selprune/experiment/)."""
    found, sources = set(), {}
    files = sorted(PACKAGE.rglob("*.py"))
    assert any(p.parent != PACKAGE for p in files), "the walk must reach the subpackages"
    for path in files:
        name, text = path.relative_to(PACKAGE).as_posix(), path.read_text()
        tree = ast.parse(text)
        visitor = _Writes(name)
        visitor.visit(tree)
        found |= visitor.found
        sources.update({(name, f.name): ast.get_source_segment(text, f)
                        for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)})
    assert not found - ALLOWED - NOT_OUTPUTS, (f"non-atomic writes {sorted(found - ALLOWED - NOT_OUTPUTS)}: write with "
                                               "selprune.paths.atomic_write_* or into a temporary path renamed into "
                                               "place")
    assert NOT_OUTPUTS <= found, f"{sorted(NOT_OUTPUTS - found)} are gone; update NOT_OUTPUTS"
    for file, fn, _ in ALLOWED:
        assert (file, fn) in sources, f"{file}:{fn} is gone; update ALLOWED"
        assert any(k in sources[file, fn] for k in ("os.replace(", ".replace(", ".rename(", "atomic_write_bytes(")), \
            f"{file}:{fn} no longer renames its output into place"


def test_the_write_finder_sees_each_kind_of_write():
    code = ("def a(p):\n    p.write_text('x')\n"
            "def b(t):\n    torch.save(t, 'f')\n"
            "def c():\n    open('f', 'w')\n"
            "def d():\n    open('f')\n    open('f', 'rb')\n")
    visitor = _Writes("x.py")
    visitor.visit(ast.parse(code))
    assert visitor.found == {("x.py", "a", "write_text"), ("x.py", "b", "save"), ("x.py", "c", "open")}


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "results.json"
    atomic_write_json(f, {"v": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, "outputs get the usual permissions, not mkstemp's 0600"

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(f, {"v": 2, "long": "x" * 100_000})
    assert json.loads(f.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file is left behind"


def test_atomic_write_makes_the_folder_and_replaces_the_file(tmp_path):
    f = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(f, b"one")
    atomic_write_bytes(f, b"two")
    assert f.read_bytes() == b"two" and [p.name for p in f.parent.iterdir()] == ["out.bin"]


def test_atomic_write_json_is_sorted_and_stable(tmp_path):
    f = tmp_path / "x.json"
    atomic_write_json(f, {"b": 1, "a": [1, 2]})
    first = f.read_bytes()
    atomic_write_json(f, {"a": [1, 2], "b": 1})
    assert f.read_bytes() == first and first.decode().index('"a"') < first.decode().index('"b"')


def test_cache_and_data_dirs_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SELPRUNE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SELPRUNE_DATA", str(tmp_path / "d"))
    assert cache_dir() == tmp_path / "c" and data_dir() == tmp_path / "d"
    monkeypatch.delenv("SELPRUNE_CACHE")
    monkeypatch.delenv("SELPRUNE_DATA")
    assert cache_dir().name == "selprune" and data_dir() == REPO_ROOT / "data"
