"""`selprune prune` (selprune/experiment/prune_command.py): the schema's names, a note for
those a pruning run does not use, hostile values refused as one line naming the
parameter; and a killed `selprune run` resumes its pruning runs to the same results."""

from __future__ import annotations

import json
import random
import re
import subprocess

import pytest
import series_runs
from series_runs import RUN, command, kill_everything, snapshot

from selprune.errors import SelpruneError
from selprune.experiment import cli
from selprune.experiment.config import DEFAULTS, FIELDS, resolve, stage_of
from selprune.experiment.loop import RUN_STAGES
from selprune.experiment.prune_command import config_from

# retraining and series parameters (tracker is a series parameter that selprune prune uses too)
UNUSED = sorted(n for n in FIELDS if stage_of(n) not in RUN_STAGES and n != "tracker")


# ----------------------------------------------------------------- config_from
def test_config_from_accepts_every_schema_name_and_notes_the_unused_ones():
    notes = []
    cfg = config_from(dict(DEFAULTS), "ff", note=notes.append)
    assert cfg == resolve(DEFAULTS, require_runs=False)
    assert len(notes) == 1
    assert all(n in notes[0] for n in UNUSED), notes[0]
    assert not [n for n in FIELDS if (stage_of(n) in RUN_STAGES or n == "tracker") and re.search(rf"\b{n}\b", notes[0])], \
        notes[0]


def test_a_retraining_name_gives_a_note_naming_it_not_an_error():
    notes = []
    cfg = config_from({"retrain_steps": 3}, "ff", note=notes.append)
    assert cfg.retrain_steps == 3
    assert notes == ["selprune prune does not use retrain_steps (retraining and series parameters)"]
    assert config_from({"steps": 2}, "ff", note=notes.append).steps == 2 and len(notes) == 1, "no note for a used name"


@pytest.mark.parametrize("run, kind", [("attn", "attn"), ("attn_heads", "attn"), ("ff", "ff"), ("both", "ff")])
def test_a_run_whose_fraction_is_zero_is_refused_naming_it(run, kind):
    with pytest.raises(SelpruneError, match=rf"--run-kind {run} prunes {kind} neurons, but {kind}_frac=0.0; "
                                            rf"set {kind}_frac above 0"):
        config_from({f"{kind}_frac": 0.0}, run)


def test_other_runs_need_no_fraction_they_do_not_prune():
    assert config_from({"attn_frac": 0.0}, "ff").attn_frac == 0.0
    assert config_from({"ff_frac": 0.0}, "attn").ff_frac == 0.0


def test_unknown_names_are_refused():
    with pytest.raises(SelpruneError, match=r"unknown parameters \['stepz'\].*did you mean steps"):
        config_from({"stepz": 3}, "ff")


# ------------------------------------------------------------ hostile input, main
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import selprune.models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded for parameters that should have been refused")

    monkeypatch.setattr(selprune.models, "load_model", loaded)


def prune_error(capsys, argv: list[str]) -> str:
    """Run `selprune prune ARGV`; check exit status 2 and one error line; return it."""
    assert cli.main(["prune", "--quiet", *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selprune: error: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


@pytest.mark.parametrize("name, value, match", [
    ("max_retain_drop", "nan", r"max_retain_drop=nan is outside \(0, 1\]"),
    ("eps_ff", "-0.5", r"eps_ff=-0.5 must be a positive number"),
    ("skip_k", "-5", r"skip_k=-5 is below 0"),
    ("stop_forget_top1", "2", r"stop_forget_top1=2.0 is outside \(0, 1\]; it is an accuracy"),
    ("attn_frac", "0", r"--run-kind attn prunes attn neurons, but attn_frac=0.0; set attn_frac above 0"),
])
def test_hostile_values_are_one_line_naming_the_parameter(tmp_path, capsys, no_model, name, value, match):
    line = prune_error(capsys, ["--run-kind", "attn", "--out", str(tmp_path / "p"), "-p", name, value])
    assert re.search(match, line), line
    assert not (tmp_path / "p").exists(), "a refused run must not create its folder"


def test_a_parameter_file_giving_one_key_twice_is_refused(tmp_path, capsys, no_model):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 3\nff_frac: 0.05\nsteps: 4\n")
    line = prune_error(capsys, ["-f", str(f), "--out", str(tmp_path / "p")])
    assert re.search(rf"parameter file {re.escape(str(f))} gives steps twice; keep one", line), line


# ---------------------------------------------------------- papermill: kill, resume


def test_killed_run_resumes_to_the_same_results(tmp_path, shared_tiny_llama_dir, small_sets, uninterrupted):
    """Kill a run at a random moment (a fixed seed draws 20-80% of an uninterrupted run's
    duration), rerun the same command: it keeps every step finished before the kill, and
    its results.json is byte-identical to the uninterrupted run's, made in another folder
    (so this also checks reproducibility: same parameters and seed, CPU, fp32)."""
    ref_dir, duration = uninterrupted
    run_dir = tmp_path / "run"
    cmd = command(run_dir, shared_tiny_llama_dir, small_sets)
    delay = random.Random(9).uniform(0.2, 0.8) * duration
    with (tmp_path / "killed.txt").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=delay)
            pytest.fail(f"the run ended within {delay:.0f} s, before the kill (uninterrupted: {duration:.0f} s)")
        except subprocess.TimeoutExpired:
            kill_everything(proc)
    at_kill = snapshot(run_dir)
    records_at_kill = {r: json.loads(at_kill[f"{r}/records.json"][1])
                       for r in series_runs.PRUNING_RUNS if f"{r}/records.json" in at_kill}

    series_runs.run(cmd, tmp_path / "resumed.txt")
    after = snapshot(run_dir)
    where = f"killed after {delay:.0f} s of {duration:.0f} s with {sorted(at_kill)}"
    # resumed, not redone: finished steps, their records and the statistics stay as they were
    for run, records in records_at_kill.items():
        assert json.loads(after[f"{run}/records.json"][1])[: len(records)] == records, where
        for step in range(1, len(records)):
            f = f"{run}/step_{step:03d}.safetensors"
            assert after[f] == at_kill[f], f"{f} was redone; {where}"
    for f in ("stats/forget.safetensors", "stats/retain.safetensors", "base.json", "anamnesia.json"):
        if f in at_kill:
            assert after[f] == at_kill[f], f"{f} was redone; {where}"
    assert after["results.json"][1] == (ref_dir / "results.json").read_bytes(), where

    results = json.loads(after["results.json"][1])
    assert set(results["runs"]) == {*series_runs.PRUNING_RUNS, "ga"} and results["anamnesia"]
    assert all(len(results["runs"][r]["records"]) == RUN["steps"] + 1 for r in series_runs.PRUNING_RUNS)
    assert len(results["runs"]["ga"]["records"]) == RUN["unlearn_checkpoints"] + 1 and results["runs"]["ga"]["relearn"]
    assert "seconds" not in after["results.json"][1].decode(), "wall-clock times belong in timings.json"
    assert json.loads(after["timings.json"][1]), "timings.json keeps them"
