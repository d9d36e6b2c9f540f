"""Hostile paths, processes and networks against `selprune prune`, `run` and `sweep`
(issue 20, items 3, 4, 5 and 7): each is refused with one line on stderr naming the
problem and the fix, exit status 2, no traceback, and nothing half-written.

The cases: a dataset folder that is the root or holds no data; an output path that is
a file, under a file, read-only, or on a full disk (a real RLIMIT_FSIZE); a sweep whose
point folder name is too long, whose out holds a folder leaderboard.csv, is a file, or
names a point like the sweep's own files; a distributed launch whose other rank never
comes (and the other way round); a second writer into a run directory, a series' run
directory, a sweep point and a sweep folder; a hub model or dataset that cannot be
reached in `selprune run`. Most are refused before any model is loaded or kernel
started, which the `no_model` and `no_kernel` fixtures make sure of.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tiny_models import small_datasets

from selprune.experiment import cli
from selprune.experiment.rundir import LOCK_FILE

SELPRUNE = Path(sys.executable).parent / "selprune"
SMALL = {"steps": "2", "ff_frac": "0.1", "collect_tokens": "160", "eval_tokens": "96", "window": "32",
         "batch_size": "2", "dtype": "float32"}
SERIES = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "retrain_window": 32, "steps": 2,
          "ff_frac": 0.05, "attn_frac": 0.05, "dtype": "float32", "device": "cpu"}


# ------------------------------------------------------------------- helpers
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import selprune.models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded although the run should have been refused first")

    monkeypatch.setattr(selprune.models, "load_model", loaded)


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if papermill is asked to run a notebook."""
    import papermill

    def started(*a, **k):
        raise AssertionError("a kernel was started although the run should have been refused first")

    monkeypatch.setattr(papermill, "execute_notebook", started)


@pytest.fixture
def data(tmp_path) -> Path:
    """Small pre-split datasets `code` and `prose` (12 short documents per split)."""
    return small_datasets(tmp_path / "data")


def prune_argv(model: Path, data: Path, out: Path, **params: str) -> list[str]:
    given = {"model": str(model), "forget": str(data / "code"), "retain": str(data / "prose"), **SMALL, **params}
    return ["prune", "--quiet", "--device", "cpu", "--out", str(out)] + [x for k, v in given.items()
                                                                         for x in ("-p", k, v)]


def run_argv(model: Path, out: Path, **params) -> list[str]:
    given = {"model": str(model), **SERIES, **params}
    return ["run", "--quiet", "--out", str(out)] + [x for k, v in given.items() for x in ("-p", k, str(v))]


def error_line(err: str) -> str:
    """The one error line of a refused command (notes and progress bars aside), checked."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("selprune: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def cli_error(capsys, argv: list[str]) -> str:
    """Run `selprune ARGV` in this process: exit status 2, one line on stderr, nothing on stdout."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    return error_line(err)


@contextlib.contextmanager
def other_writer(folder: Path) -> Iterator[None]:
    """Hold `folder` as another selprune process would: an exclusive flock on its lock file
    through an open file description of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------ item 3: datasets
def test_the_root_as_dataset_folder_is_refused_before_walking_it(tmp_path, capsys, no_model):
    line = cli_error(capsys, ["prune", "--quiet", "--out", str(tmp_path / "p"), "-p", "forget", "/"])
    assert re.search(r"dataset folder / is the root of the file system; pass the folder \(or file\) that holds "
                     r"the documents", line), line
    assert not (tmp_path / "p").exists()


def test_a_dataset_folder_without_data_files_near_its_top_is_refused(tmp_path, capsys, no_model):
    folder = tmp_path / "not-a-dataset"
    (folder / "a" / "b" / "c").mkdir(parents=True)
    (folder / "a" / "b" / "c" / "deep.jsonl").write_text('{"text": "too deep"}\n')
    (folder / "notes.csv").write_text("x,y\n")
    line = cli_error(capsys, ["prune", "--quiet", "--out", str(tmp_path / "p"), "-p", "forget", str(folder)])
    assert re.search(rf"dataset folder {re.escape(str(folder))} holds no data files .* in its top 2 levels; pass "
                     r"the folder \(or file\) that holds the documents", line), line
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------ item 3: outputs
def test_prune_out_that_is_a_file(tmp_path, capsys, shared_tiny_llama_dir, data, no_model):
    out = tmp_path / "out"
    out.write_text("mine")
    line = cli_error(capsys, prune_argv(shared_tiny_llama_dir, data, out))
    assert f"output folder {out} is a file, where a folder is needed; remove it, or choose another output " \
           "folder (--out)" in line, line
    assert out.read_text() == "mine"


def test_prune_out_under_a_file(tmp_path, capsys, shared_tiny_llama_dir, data, no_model):
    blocker = tmp_path / "results"
    blocker.write_text("mine")
    line = cli_error(capsys, prune_argv(shared_tiny_llama_dir, data, blocker / "run"))
    assert f"cannot write {blocker / 'run'}: {blocker} is a file, where a folder is needed; remove it" in line, line
    assert blocker.read_text() == "mine"


def test_prune_out_in_a_read_only_folder(tmp_path, capsys, monkeypatch, shared_tiny_llama_dir, data, no_model):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root writes anywhere: make the folder read-only as the check sees it
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out else real(p, mode, **k))
    try:
        line = cli_error(capsys, prune_argv(shared_tiny_llama_dir, data, out))
        assert f"cannot write {out} (Permission denied); make {out} writable, or choose another output folder" \
               in line, line
        assert list(out.iterdir()) == [], "nothing written in it"
    finally:
        out.chmod(0o755)


def test_prune_on_a_full_disk_names_the_file_and_resumes(tmp_path, shared_tiny_llama_dir, data, capsys):
    """A real file-size limit (RLIMIT_FSIZE, as `ulimit -f`) in a subprocess: a step's
    records.json cannot be written. One line names it and the fix; the finished steps'
    files stay whole; the same command without the limit resumes and finishes."""
    out = tmp_path / "run"
    assert cli.main(prune_argv(shared_tiny_llama_dir, data, out, steps="1")) == 0  # also warms the dataset cache
    capsys.readouterr()
    before = files(out)
    limit = len(before["records.json"]) + 200  # step 2 adds a record of ~800 bytes

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([str(SELPRUNE), *prune_argv(shared_tiny_llama_dir, data, out, steps="2")],
                          preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert f"cannot write {out / 'records.json'} (File too large); free disk space (or raise the file-size limit, " \
           "ulimit -f) and run the same command again" in line, line
    after = files(out)
    assert not [f for f in after if f.endswith(".tmp")], "no temporary file left behind"
    assert after["records.json"] == before["records.json"], "the records of the finished steps stay whole"
    assert cli.main(prune_argv(shared_tiny_llama_dir, data, out, steps="2")) == 0
    records = json.loads((out / "records.json").read_text())
    assert [r["step"] for r in records] == [0, 1, 2] and records[:2] == json.loads(before["records.json"])


def test_run_out_that_is_a_file(tmp_path, capsys, shared_tiny_llama_dir, no_kernel):
    out = tmp_path / "out"
    out.write_text("mine")
    line = cli_error(capsys, run_argv(shared_tiny_llama_dir, out))
    assert f"output folder {out} is a file, where a folder is needed" in line, line
    assert out.read_text() == "mine"


def test_run_whose_kernel_finds_the_disk_full_names_the_fix(tmp_path, capsys, monkeypatch, shared_tiny_llama_dir):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    def full(src, out, **kw):
        Path(out).write_text("{}")
        raise PapermillExecutionError(3, 4, "s.collect()", "OSError", "[Errno 28] No space left on device", [])

    monkeypatch.setattr(papermill, "execute_notebook", full)
    out = tmp_path / "run"
    line = cli_error(capsys, run_argv(shared_tiny_llama_dir, out))
    assert re.search(r"notebook 01_collect_activations.ipynb failed in cell 4 \(OSError: \[Errno 28\] No space left "
                     rf"on device\); it could not write in {re.escape(str(out))}: free disk space .* run the same "
                     "command again", line), line
    assert not list((out / "notebooks").glob(".tmp-*")), "the partial notebook is kept apart as FAILED-"


# -------------------------------------------------------------- item 3: sweeps
def _sweep_file(tmp_path: Path, model: Path, **spec) -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"out": str(tmp_path / "sweep"), "base": {**SERIES, "model": str(model)}, **spec}))
    return f


def test_sweep_point_folder_name_too_long(tmp_path, capsys, shared_tiny_llama_dir):
    name = "x" * 300
    f = _sweep_file(tmp_path, shared_tiny_llama_dir, variants=[{"name": name, "importance": "rms"}])
    line = cli_error(capsys, ["sweep", "-f", str(f)])
    assert re.search(r"point 'x{60}\.\.\.' has a folder name of 300 bytes, longer than the file system allows "
                     r"\(\d+\); give its variant a short name", line), line
    assert not (tmp_path / "sweep").exists()


def test_sweep_out_holding_a_folder_named_leaderboard_csv(tmp_path, capsys, shared_tiny_llama_dir):
    (tmp_path / "sweep" / "leaderboard.csv").mkdir(parents=True)
    line = cli_error(capsys, ["sweep", "-f", str(_sweep_file(tmp_path, shared_tiny_llama_dir))])
    assert f"{tmp_path / 'sweep' / 'leaderboard.csv'} is a folder, where the sweep writes its leaderboard file; " \
           "remove or rename it, or choose another out" in line, line
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["leaderboard.csv"]


def test_sweep_out_that_is_a_file(tmp_path, capsys, shared_tiny_llama_dir):
    (tmp_path / "sweep").write_text("mine")
    line = cli_error(capsys, ["sweep", "-f", str(_sweep_file(tmp_path, shared_tiny_llama_dir))])
    assert f"out {tmp_path / 'sweep'} is a file, not a folder; remove or rename it" in line, line


@pytest.mark.parametrize("name", ["figures", "leaderboard.csv"])
def test_sweep_point_named_like_the_sweeps_own_files(tmp_path, capsys, shared_tiny_llama_dir, name):
    f = _sweep_file(tmp_path, shared_tiny_llama_dir, variants=[{"name": name}])
    line = cli_error(capsys, ["sweep", "-f", str(f)])
    assert f"point {name!r} would have the folder {tmp_path / 'sweep' / name}, the sweep's own" in line, line
    assert "give the variant another name" in line


# ------------------------------------------------------- item 4: distributed
def _lonely_rank(tmp_path: Path, model: Path, rank: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "SELPRUNE_DIST_TIMEOUT": "3"}
    t0 = time.monotonic()
    proc = subprocess.run([str(SELPRUNE), "prune", "--quiet", "-p", "model", str(model), "--out",
                           str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def test_a_rank_that_never_joins_is_named_after_the_stated_timeout(tmp_path, shared_tiny_llama_dir):
    proc, seconds = _lonely_rank(tmp_path, shared_tiny_llama_dir, rank=0)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert re.search(r"rank 0 waited 3 s for WORLD_SIZE=2 processes; rank 1 never joined; start one process per "
                     r"rank, RANK=0\.\.1, .* or launch with torchrun --nproc_per_node 2; SELPRUNE_DIST_TIMEOUT", line)
    assert seconds < 60, f"took {seconds:.0f} s"
    assert not (tmp_path / "run").exists()


def test_a_rank_whose_rank_0_never_comes_is_told_so(tmp_path, shared_tiny_llama_dir):
    proc, seconds = _lonely_rank(tmp_path, shared_tiny_llama_dir, rank=1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert re.search(r"rank 1 could not reach rank 0 at 127\.0\.0\.1:\d+ within 3 s: rank 0 never joined; start one "
                     "process per rank", line), line
    assert seconds < 60, f"took {seconds:.0f} s"


# ------------------------------------------------------- item 5: two writers
def test_a_second_prune_into_a_held_run_directory_is_refused(tmp_path, capsys, shared_tiny_llama_dir, data,
                                                            no_model):
    out = tmp_path / "run"
    with other_writer(out):
        line = cli_error(capsys, prune_argv(shared_tiny_llama_dir, data, out))
    assert f"run directory {out} is being written by another selprune process; wait for it to finish (or stop " \
           "it), or use another run directory" in line, line
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_a_second_run_into_a_held_series_directory_is_refused(tmp_path, capsys, shared_tiny_llama_dir, no_kernel):
    out = tmp_path / "run"
    with other_writer(out):
        line = cli_error(capsys, run_argv(shared_tiny_llama_dir, out))
    assert f"run directory {out} is being written by another selprune process" in line, line
    assert [p.name for p in out.iterdir()] == [LOCK_FILE], "not even params.json"


def test_a_sweep_point_held_by_another_process_fails_alone(tmp_path, capsys, shared_tiny_llama_dir, no_kernel):
    f = _sweep_file(tmp_path, shared_tiny_llama_dir, variants=[{"name": "busy"}])
    with other_writer(tmp_path / "sweep" / "busy"):
        assert cli.main(["sweep", "-f", str(f), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of 1 points failed: busy" in err, err
    board = (tmp_path / "sweep" / "leaderboard.csv").read_text()
    assert "being written by another selprune process" in board


def test_a_second_sweep_into_a_held_sweep_folder_is_refused(tmp_path, capsys, shared_tiny_llama_dir, no_kernel):
    with other_writer(tmp_path / "sweep"):
        line = cli_error(capsys, ["sweep", "-f", str(_sweep_file(tmp_path, shared_tiny_llama_dir))])
    assert f"run directory {tmp_path / 'sweep'} is being written by another selprune process" in line, line


# ------------------------------------------------------ item 7: unreachable hub
def test_run_with_an_unreachable_hub_model_fails_before_any_kernel(tmp_path, capsys, monkeypatch, no_kernel):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(capsys, run_argv(Path("someorg/no-such-model"), tmp_path / "run"))
    assert "model 'someorg/no-such-model' is a Hugging Face hub id, it is not in the local cache, and the hub " \
           "cannot be reached (no network)" in line and "--local-dir DIR" in line, line
    assert not (tmp_path / "run").exists()


def test_run_with_an_unreachable_hub_dataset_fails_before_any_kernel(tmp_path, capsys, monkeypatch,
                                                                    shared_tiny_llama_dir, no_kernel):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(capsys, run_argv(shared_tiny_llama_dir, tmp_path / "run", forget="hub:someorg/someset"))
    assert "forget dataset 'hub:someorg/someset' is on the Hugging Face hub, which cannot be reached (no network). " \
           "Use a bundled set (prose, code) or a local" in line, line
    assert not (tmp_path / "run").exists()
