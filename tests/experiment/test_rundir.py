"""The run directory (selprune/experiment/rundir.py): the parameter lock and `param_diff`,
JSON files read with a clear error, a pruning run's step files, corrupt files, a folder
made with other parameters, replay, the one-writer hold, and write errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.config import Config
from selprune.experiment.loop import run_pruning
from selprune.experiment.rundir import RunDir, param_diff, read_json
from selprune.experiment.series import Series
from selprune.sites import KINDS

LOOP_CFG = Config(ff_frac=0.1, attn_frac=0.1, steps=1, window=16, collect_tokens=32, eval_tokens=32, batch_size=2,
                  skip_k=1, retrain_window=16)


def random_data(vocab: int = 128, n: int = 2, window: int = 16) -> Data:
    g = torch.Generator().manual_seed(0)
    win = [torch.randint(3, vocab, (n, window), generator=g) for _ in range(4)]
    return Data(*win, skip={"forget": torch.tensor([3]), "retain": torch.tensor([4])})


def prune(cfg: Config, rd: Path, kind: str = "both", model: torch.nn.Module | None = None):
    return run_pruning(cfg, kind, rd, model or tiny_model("llama"), None, random_data(), progress=False)


def _finished_run(tmp_path: Path, steps: int = 1) -> tuple[Config, Path]:
    cfg = LOOP_CFG.replace(steps=steps)
    prune(cfg, tmp_path / "ff")
    return cfg, tmp_path / "ff"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- JSON files
def test_write_and_read_json(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.path.mkdir()
    rd.write_json("a.json", {"x": [1, 2.5, None]})
    assert rd.has("a.json") and rd.read_json("a.json") == {"x": [1, 2.5, None]}
    assert read_json(rd.file("a.json")) == {"x": [1, 2.5, None]}
    assert rd.file("a.json") == tmp_path / "r" / "a.json"


@pytest.mark.parametrize("content", ["{not json", b"\xff\xfe\x00"])
def test_an_unreadable_json_file_names_itself_and_the_fix(tmp_path, content):
    f = tmp_path / "base.json"
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(SelpruneError, match=r"run file .*base.json is corrupt .*delete the run directory and start "
                                            r"again"):
        read_json(f)


def test_a_missing_json_file_names_itself(tmp_path):
    with pytest.raises(SelpruneError, match=r"run file .*nowhere.json is corrupt \(.*No such file"):
        RunDir(tmp_path).read_json("nowhere.json")


# ----------------------------------------------------------------------- the lock
def test_the_first_use_writes_the_parameters(tmp_path):
    rd = RunDir(tmp_path / "new" / "deeper")
    rd.lock({"a": 1, "b": "x"})
    assert json.loads((tmp_path / "new" / "deeper" / "params.json").read_text()) == {"a": 1, "b": "x"}
    rd.lock({"n": 2}, file="config.json")
    assert rd.read_json("config.json") == {"n": 2}


def test_the_same_parameters_pass(tmp_path):
    rd = RunDir(tmp_path)
    rd.lock({"a": 1, "b": "x"})
    before = rd.file("params.json").stat().st_mtime_ns
    rd.lock({"b": "x", "a": 1})
    assert rd.read_json("params.json") == {"a": 1, "b": "x"}
    assert rd.file("params.json").stat().st_mtime_ns == before, "nothing rewritten"


def test_other_parameters_are_refused_naming_the_difference(tmp_path):
    rd = RunDir(tmp_path)
    rd.lock({"a": 1, "b": "x"})
    with pytest.raises(SelpruneError, match=r"run directory .* was made with other parameters \{'b': \('x', 'y'\)\} "
                                            r"\(was, now\); use a new run directory, or delete this one"):
        rd.lock({"a": 1, "b": "y"})
    with pytest.raises(SelpruneError, match=r"other parameters \{'c': \(None, 3\)\}"):
        rd.lock({"a": 1, "b": "x", "c": 3})  # a new name without a default is a difference
    assert rd.read_json("params.json") == {"a": 1, "b": "x"}, "a refused lock leaves the record alone"


def test_ignored_parameters_may_differ(tmp_path):
    rd = RunDir(tmp_path)
    rd.lock({"a": 1, "batch_size": 8})
    rd.lock({"a": 1, "batch_size": 2}, ignore=("batch_size",))
    assert rd.read_json("params.json")["batch_size"] == 8
    with pytest.raises(SelpruneError, match=r"\{'a': \(1, 2\)\}"):
        rd.lock({"a": 2, "batch_size": 2}, ignore=("batch_size",))


def test_extendable_parameters_may_grow_and_are_raised(tmp_path):
    rd = RunDir(tmp_path)
    rd.lock({"a": 1, "steps": 2}, extendable=("steps",))
    rd.lock({"a": 1, "steps": 5}, extendable=("steps",))
    assert rd.read_json("params.json")["steps"] == 5
    rd.lock({"a": 1, "steps": 3}, extendable=("steps",))  # fewer: allowed, the record keeps the most
    assert rd.read_json("params.json")["steps"] == 5
    with pytest.raises(SelpruneError, match=r"\{'a': \(1, 2\)\}"):
        rd.lock({"a": 2, "steps": 9}, extendable=("steps",))
    assert rd.read_json("params.json")["steps"] == 5
    with pytest.raises(SelpruneError, match=r"\{'steps': \(5, 6\)\}"):
        rd.lock({"a": 1, "steps": 6})  # only where the caller says so


def test_a_missing_key_counts_as_its_default(tmp_path):
    rd = RunDir(tmp_path)
    rd.lock({"a": 1})  # a folder made before the parameter `new` existed
    rd.lock({"a": 1, "new": "d"}, defaults={"new": "d"})
    with pytest.raises(SelpruneError, match=r"other parameters \{'new': \('d', 'e'\)\}"):
        rd.lock({"a": 1, "new": "e"}, defaults={"new": "d"})


@pytest.mark.parametrize("content", ["[1, 2]", "null", '"text"'])
def test_a_lock_file_that_is_not_a_mapping_is_corrupt(tmp_path, content):
    (tmp_path / "params.json").write_text(content)
    with pytest.raises(SelpruneError, match=r"run file .*params.json is corrupt; delete the run directory and start "
                                            r"again"):
        RunDir(tmp_path).lock({"a": 1})


def test_param_diff():
    assert param_diff({"a": 1, "b": 2}, {"a": 1, "b": 2}) == {}
    assert param_diff({"a": 1, "b": 2}, {"a": 1, "b": 3}) == {"b": (2, 3)}
    assert param_diff({"a": 1}, {"a": 1, "c": 4}) == {"c": (None, 4)}
    assert param_diff({"a": 1, "c": 4}, {"a": 1}) == {"c": (4, None)}
    assert param_diff({"a": 1, "b": 2}, {"a": 9, "b": 3}, ignore=("b",)) == {"a": (1, 9)}
    assert param_diff({"a": 1}, {"a": 1, "c": 4}, defaults={"c": 4}) == {}
    assert param_diff({"a": 1}, {"a": 1, "c": 5}, defaults={"c": 4}) == {"c": (4, 5)}
    assert param_diff({"a": 1, "c": 5}, {"a": 1, "c": 5}, defaults={"c": 4}) == {}, "recorded values win over defaults"
    assert list(param_diff({"z": 1, "a": 1}, {"z": 2, "a": 2})) == ["a", "z"], "sorted by name"


# ------------------------------------------------------------- a pruning run's files
def test_step_files_round_trip(tmp_path):
    rd = RunDir(tmp_path)
    rd.path.mkdir(exist_ok=True)
    new = {"ff": torch.tensor([[True, False, True]]), "attn": torch.zeros(1, 2, 2, dtype=torch.bool)}
    values = {"ff": torch.tensor([0.5, -1.0]), "attn": None}
    rd.save_step(1, new, values)
    assert rd.has("step_001.safetensors")
    masks, vals = rd.load_step(1)
    assert all(torch.equal(masks[k], new[k]) and masks[k].dtype == torch.bool for k in KINDS)
    assert torch.equal(vals["ff"], values["ff"]) and vals["attn"] is None


def test_records_of_a_new_folder_are_empty(tmp_path):
    assert RunDir(tmp_path / "nothing").records() == []
    rd = RunDir(tmp_path)
    rd.save_records([{"step": 0}, {"step": 1}])
    assert rd.records() == [{"step": 0}, {"step": 1}]


@pytest.mark.parametrize("garbage", ["{not json", "null", '[{"step": 0}, {"step": 5}]', '[{"step": 1}]', "[3]"])
def test_corrupt_records_read_directly(tmp_path, garbage):
    (tmp_path / "records.json").write_text(garbage)
    with pytest.raises(SelpruneError, match=r"run file .*records.json is corrupt .*delete the run directory and start "
                                            r"again"):
        RunDir(tmp_path).records()


@pytest.mark.parametrize("garbage", ["{not json", "null", '[{"step": 0}, {"step": 5}]'])
def test_corrupt_records_file(tmp_path, garbage):
    cfg, rd = _finished_run(tmp_path)
    (rd / "records.json").write_text(garbage)
    with pytest.raises(SelpruneError, match=r"run file .*records.json is corrupt .*delete the run directory and start "
                                            r"again"):
        prune(cfg, rd)


def test_corrupt_records_file_read_by_the_series(tmp_path):
    """What the CLI and notebook 05 read: no bare JSONDecodeError there either."""
    s = Series(progress=False, run_dir=str(tmp_path / "run"), **{"window": 16, "collect_tokens": 32,
                                                                  "eval_tokens": 32, "retrain_window": 16})
    (s.run_dir / "ff").mkdir()
    (s.run_dir / "ff" / "records.json").write_text("{not json")
    with pytest.raises(SelpruneError, match=r"run file .*ff/records.json is corrupt"):
        s.results_table()


def test_corrupt_step_file(tmp_path):
    cfg, rd = _finished_run(tmp_path)
    (rd / "step_001.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(SelpruneError, match=r"run file .*step_001.safetensors is missing or corrupt .*delete the run "
                                            r"directory"):
        prune(cfg.replace(steps=2), rd)


def test_corrupt_step_file_of_a_later_step(tmp_path):
    cfg, rd = _finished_run(tmp_path, steps=2)
    (rd / "step_002.safetensors").write_bytes(b"broken")
    with pytest.raises(SelpruneError, match=r"step_002"):
        prune(cfg, rd)


def test_missing_step_file(tmp_path):
    cfg, rd = _finished_run(tmp_path)
    (rd / "step_001.safetensors").unlink()
    with pytest.raises(SelpruneError, match=r"run file .*step_001.safetensors is missing or corrupt"):
        prune(cfg, rd)


def test_run_directory_made_with_other_parameters(tmp_path):
    cfg, rd = _finished_run(tmp_path)
    with pytest.raises(SelpruneError, match=r"was made with other parameters \{'importance': \('abs', 'rms'\)\} "
                                            r"\(was, now\); use a new run directory"):
        prune(cfg.replace(importance="rms"), rd)
    with pytest.raises(SelpruneError, match=r"other parameters \{'ff_frac': \(0\.1, 0\.05\)\} "):
        prune(cfg.replace(ff_frac=0.05), rd)
    with pytest.raises(SelpruneError, match=r"other parameters \{.*'run': \('both', 'attn'\)\}"):
        prune(cfg.replace(ff_frac=0.0), rd, "attn")  # another run kind in the same folder


def test_series_directory_made_with_other_parameters(tmp_path):
    Series(progress=False, run_dir=str(tmp_path / "run"))
    with pytest.raises(SelpruneError, match=r"other parameters \{'seed': \(0, 1\)\}.*use a new run directory"):
        Series(progress=False, run_dir=str(tmp_path / "run"), seed=1)


# ------------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A 3-step 'both' run with mean ablation (so that replay must restore the ablation
    values too), and the model states after step 1 and after step 3 as the loop left them."""
    tmp = tmp_path_factory.mktemp("replay")
    cfg = LOOP_CFG.replace(steps=3, ablation="mean")
    _, pruner = prune(cfg, tmp / "full")
    after3 = _state(pruner.model)
    _, pruner1 = prune(cfg.replace(steps=1), tmp / "one")  # a run of its own, stopped after step 1
    return tmp / "full", {1: _state(pruner1.model), 3: after3}


@pytest.mark.parametrize("step", [1, 3, None])
def test_replay_reproduces_the_pruned_model_bit_for_bit(three_steps, step):
    rd, states = three_steps
    model = tiny_model("llama")
    pruner = RunDir(rd).replay(model, step)
    assert _same(_state(model), states[step or 3])
    assert pruner.model is model and pruner.fraction("ff") > 0


def test_replay_of_step_0_is_the_unpruned_model(three_steps):
    rd, _ = three_steps
    model = tiny_model("llama")
    before = _state(model)
    RunDir(rd).replay(model, 0)
    assert _same(_state(model), before)


def test_replay_is_undone_by_restore(three_steps):
    rd, _ = three_steps
    model = tiny_model("llama")
    before = _state(model)
    RunDir(rd).replay(model, 2).restore()
    assert _same(_state(model), before)


def test_replay_continues_from_a_pruner(three_steps):
    rd, states = three_steps
    model = tiny_model("llama")
    run_dir = RunDir(rd)
    pruner = run_dir.replay(model, 1)
    assert _same(_state(model), states[1])
    pruner.restore()
    run_dir.replay(model, 3, pruner=pruner)
    assert _same(_state(model), states[3])


@pytest.mark.parametrize("step", [4, -1])
def test_replaying_a_step_past_the_end_is_refused(three_steps, step):
    rd, _ = three_steps
    with pytest.raises(SelpruneError, match=rf"run .* has finished steps 0\.\.3; cannot replay step {step}"):
        RunDir(rd).replay(tiny_model("llama"), step)


def test_replay_of_an_unfinished_run_is_refused(tmp_path):
    with pytest.raises(SelpruneError, match=r"is not a finished pruning run \(no records.json\); run the pruning first"):
        RunDir(tmp_path).replay(tiny_model("llama"))


# ------------------------------------------------------------------ one writer
HOLDER = """
import sys, time
from selprune.experiment.rundir import RunDir
with RunDir(sys.argv[1]).hold():
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_folder_held_by_another_process_is_refused_and_freed_when_it_is_killed(tmp_path):
    """The lock is the kernel's: a second process is refused naming the folder, and a
    SIGKILLed holder leaves nothing that keeps the folder locked."""
    import signal
    import subprocess
    import sys

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SelpruneError, match=rf"run directory {folder} is being written by another selprune "
                                                r"process; wait for it to finish \(or stop it\), or use another"):
            with RunDir(folder).hold():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with RunDir(folder).hold() as rd:  # free again
        rd.write_json("x.json", 1)
    assert rd.read_json("x.json") == 1


def _flock(folder: Path) -> int:
    """Hold `folder` through an open file description of our own, as another process would."""
    import fcntl
    import os

    from selprune.experiment.rundir import LOCK_FILE

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_hold_is_reentrant_and_a_child_of_the_holder_passes(tmp_path, monkeypatch):
    import os

    from selprune.experiment.rundir import HELD_ENV

    folder = tmp_path / "run"
    with RunDir(folder).hold(), RunDir(folder).hold():  # one process, twice: no deadlock
        pass
    fd = _flock(folder)
    try:
        with pytest.raises(SelpruneError, match="another selprune process"):
            with RunDir(folder).hold():
                pass
        monkeypatch.setenv(HELD_ENV, os.pathsep.join(["/elsewhere", str(folder.resolve())]))
        with RunDir(folder).hold():  # a kernel whose parent holds the folder for it
            pass
    finally:
        os.close(fd)


def test_a_failed_hold_leaves_no_folder_it_made_but_keeps_written_work(tmp_path):
    with pytest.raises(RuntimeError):
        with RunDir(tmp_path / "a" / "b" / "run").hold():
            raise RuntimeError("refused before writing anything")
    assert list(tmp_path.iterdir()) == [], "a refused run leaves no trace"
    with pytest.raises(RuntimeError):
        with RunDir(tmp_path / "run").hold() as rd:
            rd.write_json("config.json", {})
            raise RuntimeError("failed after writing")
    assert (tmp_path / "run" / "config.json").is_file(), "written work stays, for the rerun to resume"


# ---------------------------------------------------------------- write errors
def test_a_write_that_fails_midway_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk fails in write(), whose OSError names no file: the message still does."""
    import errno
    import os
    import sys

    from selprune.experiment.rundir import write_errors

    real = os.fsync

    def full(fd):
        if sys._getframe(1).f_code.co_filename.endswith("paths.py"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    rd = RunDir(tmp_path / "run")
    with pytest.raises(SelpruneError, match=rf"cannot write {rd.file('records.json')} \(No space left on device\); "
                                            r"free disk space .* run the same command again"):
        with write_errors(rd.path):
            rd.save_records([{"step": 0}])
    assert list(rd.path.iterdir()) == [], "no temporary file left"


def test_write_error_reads_temporary_names_and_lets_other_errors_pass(tmp_path):
    import errno

    from selprune.experiment.rundir import write_error, write_errors

    tmp = tmp_path / "run" / ".records.json.0123456789ab.tmp"
    msg = write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp)), tmp_path / "run")
    assert msg.startswith(f"cannot write {tmp_path / 'run' / 'records.json'} (Permission denied); make ")
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file or directory", "/models/x/config.json")
    assert write_error(elsewhere, tmp_path / "run") is None, "not an output error: passes unchanged"
    with pytest.raises(FileNotFoundError):
        with write_errors(tmp_path / "run"):
            raise elsewhere
