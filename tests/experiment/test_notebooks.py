"""Running the notebook series (selprune/experiment/notebooks.py): papermill into a run
directory, the kernels' parameters, failing cells, cleaning, and the
pruning steps shown on stderr while a notebook runs.

The papermill tests execute the real notebooks in kernels, on a tiny random Llama saved
as a local model directory (with the embedded tokenizer), so they cost mostly kernel
start-ups, not forward passes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from series_runs import RUN, TINY, snapshot

from selprune.errors import SelpruneError
from selprune.experiment import cli
from selprune.experiment.notebooks import NOTEBOOK_DIR, NOTEBOOKS, clean, run_series


# ------------------------------------------------------------------ stored notebooks
def test_stored_notebooks_carry_no_volatile_metadata():
    import nbformat

    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        assert "papermill" not in nb.metadata and "widgets" not in nb.metadata, name
        for c in nb.cells:
            assert "execution" not in c.metadata and "papermill" not in c.metadata, name


def test_clean_strips_timings_and_papermill_metadata():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    nb.metadata["papermill"] = {"duration": 1.0}
    nb.cells[0].metadata["execution"] = {"iopub.status.busy": "2026-01-01"}
    out = clean(nb)
    assert "papermill" not in out.metadata and "execution" not in out.cells[0].metadata


# ------------------------------------------------------------------------ kernels
def test_local_paths_reach_the_kernels_absolute(tmp_path, shared_tiny_llama_dir, monkeypatch):
    """Kernels run in notebooks/: a dataset or model path relative to where `selprune run`
    was started must still name the same file there."""
    import papermill

    seen = []

    def fake(src, out, parameters, **kw):
        seen.append(parameters)
        Path(out).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    shutil.copytree(shared_tiny_llama_dir, tmp_path / "model")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"text": "print(1)"}) + "\n")
    monkeypatch.chdir(tmp_path)
    run_series({**TINY, "model": "model", "forget": "mine.jsonl", "run_dir": "run"}, progress=False,
               notebooks=("01_collect_activations.ipynb",))
    p = seen[0]
    assert p["model"] == str(tmp_path / "model") and p["forget"] == str(tmp_path / "mine.jsonl")
    assert p["retain"] == "prose" and p["run_dir"] == str(tmp_path / "run")


# ----------------------------------------------------------------------- papermill
def test_papermill_series_with_other_importance_and_attention_only(tmp_path, tiny_llama_dir):
    params = {**TINY, "model": str(tiny_llama_dir), "importance": "std", "runs": "attn,attn_heads",
              "run_dir": str(tmp_path / "run")}
    run_dir = run_series(params, progress=False)
    for name in NOTEBOOKS:
        assert (run_dir / "notebooks" / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["params"]["importance"] == "std"
    assert set(results["runs"]) == {"attn", "attn_heads", "random"}  # random: anamnesia's control
    for run in ("attn", "attn_heads"):
        records = results["runs"][run]["records"]
        assert len(records) == TINY["steps"] + 1
        assert records[-1]["fraction"]["attn"] > 0 and records[-1]["fraction"]["ff"] == 0
        assert results["runs"][run]["config"]["importance"] == "std"
    assert results["anamnesia"]["selective_run"] == "attn"
    assert sorted(p.name for p in (run_dir / "figures").glob("*.png"))


def test_failing_cell_names_the_notebook_and_exits_nonzero(tmp_path, tiny_llama_dir, capsys):
    small = tmp_path / "small"
    small.mkdir()
    (small / "train.jsonl").write_text(json.dumps({"text": "x = 1"}) + "\n")
    (small / "test.jsonl").write_text(json.dumps({"text": "y = 2"}) + "\n")
    argv = ["run", "--quiet", "--out", str(tmp_path / "run"), "-p", "model", str(tiny_llama_dir), "-p", "forget",
            str(small)] + [x for k, v in TINY.items() for x in ("-p", k, str(v))]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert "01_collect_activations.ipynb" in err and "cell" in err and "budget" in err
    assert (tmp_path / "run" / "notebooks" / "FAILED-01_collect_activations.ipynb").is_file()


def test_failing_notebook_leaves_earlier_outputs_intact(tmp_path, shared_tiny_llama_dir, small_sets, uninterrupted):
    """Notebook 03 fails (its run folder cannot be created) in a copy of a finished run:
    everything already written, results.json and the earlier notebooks included, stays
    byte for byte, and the failed notebook is kept apart for inspection."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    shutil.rmtree(run_dir / "ff")
    (run_dir / "ff").write_text("in the way")
    before = snapshot(run_dir)
    params = {**RUN, "model": str(shared_tiny_llama_dir), "forget": str(small_sets["forget"]),
              "retain": str(small_sets["retain"]), "run_dir": str(run_dir)}
    with pytest.raises(SelpruneError, match=r"notebook 03_prune_ffn.ipynb failed in cell \d+ \(FileExistsError"):
        run_series(params, progress=False, notebooks=("03_prune_ffn.ipynb",))
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "notebooks/FAILED-03_prune_ffn.ipynb"} == before
    assert (run_dir / "notebooks" / "FAILED-03_prune_ffn.ipynb").is_file()
    assert after["results.json"][1] == (uninterrupted[0] / "results.json").read_bytes()
    import nbformat

    for name in ("01_collect_activations.ipynb", "02_score_neurons.ipynb"):
        nbformat.validate(nbformat.read(run_dir / "notebooks" / name, as_version=4))


# ----------------------------------------------------------------------- progress
STEP_LINE = re.compile(r"^selprune:   (\w+) step (\d+)/(\d+): pruned ff [\d.]+% attn [\d.]+%, top-1 forget [\d.]+ "
                       r"retain [\d.]+ \(\d+ s\)$")


def _record(step: int) -> dict:
    return {"step": step, "fraction": {"ff": 0.05 * step, "attn": 0.0}, "forget": {"top1": 0.5}, "retain": {"top1": 0.6},
            "seconds": {"collect": 1.0, "eval": 2.0}}


def test_step_lines_reach_stderr_only_with_progress_on(monkeypatch, capsys):
    """The kernels' side (loop.announce_step) and the parent's (the relay of
    run_series): a line per step with progress on; nothing with SELPRUNE_PROGRESS=0 (make
    notebooks), and nothing outside `selprune run` (no address to send to)."""
    from selprune.experiment import loop, notebooks

    with notebooks._step_lines(True) as env:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", env[loop.PROGRESS_ADDR_ENV]), "loopback only"
        monkeypatch.setenv(loop.PROGRESS_ADDR_ENV, env[loop.PROGRESS_ADDR_ENV])
        monkeypatch.setenv("SELPRUNE_PROGRESS", "1")
        loop.announce_step("ff", _record(1), 2)
        loop.announce_step("ff", _record(2), 2)
        monkeypatch.setenv("SELPRUNE_PROGRESS", "0")
        loop.announce_step("ff", _record(3), 3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(STEP_LINE.match(line) for line in lines), lines
    assert lines[1] == "selprune:   ff step 2/2: pruned ff 10.00% attn 0.00%, top-1 forget 0.500 retain 0.600 (3 s)"
    monkeypatch.setenv("SELPRUNE_PROGRESS", "1")
    monkeypatch.delenv(loop.PROGRESS_ADDR_ENV)
    loop.announce_step("ff", _record(1), 2)  # a notebook opened by hand, a plain python: silent
    with notebooks._step_lines(False) as env:
        assert env == {}
    assert capsys.readouterr().err == ""


def test_run_series_with_progress_prints_a_line_per_pruning_step(tmp_path, tiny_llama_dir, capsys):
    """A real kernel: notebook 03 on the tiny model, with progress on. Its pruning steps
    show on the parent's stderr as they finish; the executed notebook holds none of it."""
    run_dir = run_series({**TINY, "model": str(tiny_llama_dir), "run_dir": str(tmp_path / "run")}, progress=True,
                         notebooks=("03_prune_ffn.ipynb",))
    lines = [m.groups() for line in capsys.readouterr().err.splitlines() if (m := STEP_LINE.match(line))]
    results = json.loads((run_dir / "results.json").read_text())
    want = [(run, str(r["step"]), str(TINY["steps"])) for run in ("ff", "random")
            for r in results["runs"][run]["records"][1:]]
    assert lines == want and want
    stored = (run_dir / "notebooks" / "03_prune_ffn.ipynb").read_text()
    assert "step 1/" not in stored, "no step lines in the notebook"


def test_retraining_rules_are_checked_before_any_kernel(tmp_path, monkeypatch):
    """A series that runs notebook 06 refuses retrain_window > window before a kernel
    starts; one that stops before 06 does not need it."""
    import papermill

    def started(*a, **k):
        raise AssertionError("a kernel was started although the run should have been refused first")

    monkeypatch.setattr(papermill, "execute_notebook", started)
    params = {"window": 64, "collect_tokens": 256, "eval_tokens": 256, "run_dir": str(tmp_path / "run")}
    with pytest.raises(SelpruneError, match=r"retrain_window=128 is longer than window \(64\); lower it"):
        run_series(params, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(AssertionError, match="a kernel was started"):
        run_series(params, progress=False, notebooks=NOTEBOOKS[:1])
