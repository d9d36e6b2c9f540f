"""results.json (selprune/experiment/results.py): assembled from the run directory's
files, with the environment recorded and the wall-clock seconds split off into
timings.json."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest
import series_runs
import torch

from selprune.experiment.config import Config
from selprune.experiment.results import assemble, environment, finished_runs, split_timings, write_results
from selprune.experiment.rundir import RunDir
from selprune.paths import REPO_ROOT


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_tiny_llama_dir) -> tuple[Path, float]:
    return series_runs.uninterrupted(tmp_path_factory, shared_tiny_llama_dir)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def test_results_record_the_environment(uninterrupted):
    import transformers

    import selprune

    env = json.loads((uninterrupted[0] / "results.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["selprune"] == selprune.__version__ and env["python"] == platform.python_version()
    assert env["git_commit"] == git_commit()
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] >= 1


def test_environment_reads_the_models_device_and_dtype(tiny_llama):
    env = environment(tiny_llama().to(torch.bfloat16))
    assert env["device"] == "cpu" and env["dtype"] == "bfloat16"
    assert env["git_commit"] == git_commit() and env["machine"] == platform.machine()


# ------------------------------------------------------------------- timings
def test_split_timings_moves_every_seconds_entry_out():
    result = {"seconds": 9.0, "a": {"seconds": 1.5, "x": 1}, "arms": [{"seconds": 2.0, "y": 2}, {"z": 3}]}
    clean, timings = split_timings(result)
    assert clean == {"a": {"x": 1}, "arms": [{"y": 2}, {"z": 3}]}
    assert timings == {".": 9.0, "/a": 1.5, "/arms/0": 2.0}
    assert "seconds" in result["a"], "the input is left as it was"


# -------------------------------------------------------------- assembly
def records(n: int) -> list[dict]:
    return [{"step": i, "fraction": {"ff": 0.01 * i, "attn": 0.0}, "forget": {"top1": 0.5 - 0.1 * i},
             "retain": {"top1": 0.3 - 0.01 * i}} for i in range(n)]


def fill(path: Path) -> RunDir:
    rd = RunDir(path)
    rd.write_json("base.json", {"forget": {"top1": 0.5}, "retain": {"top1": 0.3}, "seconds": 1.0})
    RunDir(path / "random").save_records(records(3))
    RunDir(path / "ff").save_records(records(2))
    return rd


def test_finished_runs_come_in_registry_order(tmp_path):
    rd = fill(tmp_path / "run")
    (tmp_path / "run" / "attn").mkdir()  # a run folder without records is not finished
    assert list(finished_runs(rd)) == ["ff", "random"]


def test_assemble_reads_the_folder_and_leaves_out_where_it_is(tmp_path, tiny_llama):
    model = tiny_llama()
    a = assemble(Config(run_dir=str(tmp_path / "a")), fill(tmp_path / "a"), model)
    b = assemble(Config(run_dir=str(tmp_path / "b")), fill(tmp_path / "b"), model)
    assert a == b, "identical runs in two folders give identical results"
    assert "run_dir" not in a["params"] and a["anamnesia"] is None
    assert a["runs"]["ff"]["records"] == records(2) and a["runs"]["ff"]["config"]["run"] == "ff"


def test_write_results_keeps_seconds_in_timings_json(tmp_path, tiny_llama):
    rd = fill(tmp_path / "run")
    results = write_results(Config(run_dir=str(rd.path)), rd, tiny_llama())
    assert rd.read_json("results.json") == results and "seconds" not in (rd.path / "results.json").read_text()
    assert rd.read_json("timings.json") == {"/base": 1.0}
