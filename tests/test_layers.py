"""The package's shape: the method on top, orchestration beneath it, imports flowing one
way; small modules and functions; no global state changed by importing selprune."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "selprune"
METHOD_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "__main__.py")
ALL_MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 60


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_method_modules_never_import_orchestration() -> None:
    assert len(METHOD_MODULES) >= 15  # sites, stats, scoring, ... : the glob found the package
    bad = {p.name: sorted(m for m in imported_modules(p) if m.startswith("selprune.experiment"))
           for p in METHOD_MODULES}
    assert not {k: v for k, v in bad.items() if v}, "the method layer must not import selprune.experiment"


def test_the_import_check_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from selprune.experiment.config import Config\n")
    assert "selprune.experiment.config" in imported_modules(f)


def _long_reason(lines: list[str], first_line: int) -> bool:
    """A `# long: why` comment on the line(s) right above a definition (or its decorators)."""
    i = first_line - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        if lines[i].lstrip().startswith("# long:"):
            return True
        i -= 1
    return False


@pytest.mark.parametrize("path", ALL_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_are_small_or_say_why(path: Path) -> None:
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_MODULE_LINES or "# long module:" in "\n".join(lines[:40]), \
        f"{path.name} has {len(lines)} lines; split it, or say why at its top (# long module: ...)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            assert n <= MAX_FUNCTION_LINES or _long_reason(lines, first), \
                f"{path.name}:{node.lineno} {node.name} has {n} lines; split it or say why (# long: ...)"


_STATE = """
import json, logging, os
import datasets, matplotlib, transformers
def state():
    log = logging.getLogger("selprune")
    mask = os.umask(0o022); os.umask(mask)
    return {"handlers": [type(h).__name__ for h in log.handlers if not isinstance(h, logging.NullHandler)],
            "propagate": log.propagate, "level": log.level, "umask": mask,
            "rc": {k: str(v) for k, v in matplotlib.rcParams.items()},
            "hf_bars": transformers.utils.logging.is_progress_bar_enabled(),
            "ds_bars": not datasets.are_progress_bars_disabled()}
before = state()
import importlib, pkgutil, selprune, selprune.experiment
for m in pkgutil.walk_packages(selprune.__path__, "selprune."):
    if m.name != "selprune.__main__":
        importlib.import_module(m.name)
after = state()
print(json.dumps({k: (before[k], after[k]) for k in before if before[k] != after[k]}))
"""


def test_importing_every_module_changes_no_global_state() -> None:
    out = subprocess.run([sys.executable, "-c", _STATE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    changed = json.loads(out.stdout.strip().splitlines()[-1])
    assert changed == {}, f"importing selprune changed global state: {sorted(changed)}"


def test_no_module_sets_process_wide_state_in_code() -> None:
    """What the import check cannot see (a theme set when a module's function first runs):
    no module calls these at all."""
    banned = ("sns.set_theme(", "sns.set(", "os.umask(", "disable_progress_bar()", "disable_progress_bars()",
              "plt.style.use(")
    offenders = {p.name: [b for b in banned if b in p.read_text()] for p in ALL_MODULES}
    allowed = {"progress.py"}  # switches the libraries' bars off for one block and restores them
    assert not {k: v for k, v in offenders.items() if v and k not in allowed}
