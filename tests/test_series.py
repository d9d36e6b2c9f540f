"""The notebook series: Series steps in-process on a tiny model, and the papermill runner.

The papermill tests execute the real notebooks in kernels, on a tiny random Llama saved
as a local model directory (with the embedded tokenizer), so they cost mostly kernel
start-ups, not forward passes.
"""

from __future__ import annotations

import json
import os

import pytest

from selprune import cli
from selprune.errors import SelpruneError
from selprune.notebooks import NOTEBOOK_DIR, clean, kernel_manager_class, run_series
from selprune.series import NOTEBOOKS, PARAMS, RUNS, Series, resolve_params

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "attn_frac": 0.05,
        "retrain_steps": 2, "retrain_batch": 2, "retrain_window": 32, "retrain_eval_tokens": 64, "dtype": "float32",
        "device": "cpu"}


@pytest.fixture
def series(tmp_path, tiny_llama_dir) -> Series:
    return Series(progress=False, model=str(tiny_llama_dir), run_dir=str(tmp_path / "run"), **TINY)


# ------------------------------------------------------------------------ parameters
def test_every_notebook_has_the_same_parameters_cell():
    import nbformat

    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
        names = {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line and not line.startswith("#")}
        assert names == set(PARAMS), f"{name}: parameters {sorted(names ^ set(PARAMS))} differ from PARAMS"


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


def test_resolve_params_rejects_unknown_names_and_types():
    with pytest.raises(SelpruneError, match="unknown parameters.*valid ones"):
        resolve_params({"stepz": 3})
    with pytest.raises(SelpruneError, match="steps must be an integer"):
        resolve_params({"steps": "five"})
    with pytest.raises(SelpruneError, match="unknown runs"):
        resolve_params({"runs": "ff,bogus"})
    with pytest.raises(SelpruneError, match="steps must be an integer, not None"):
        resolve_params({"steps": None})
    assert resolve_params({"ff_frac": 1})["ff_frac"] == 1.0
    assert resolve_params({"retrain_lr": "1e-5"})["retrain_lr"] == 1e-5  # YAML 1.1 reads 1e-5 as text
    assert resolve_params({"max_retain_drop": None})["max_retain_drop"] is None
    assert resolve_params({"max_retain_drop": 1})["max_retain_drop"] == 1.0


def test_series_refuses_a_run_dir_made_with_other_parameters(tmp_path, tiny_llama_dir):
    Series(progress=False, model=str(tiny_llama_dir), run_dir=str(tmp_path / "r"), **TINY)
    with pytest.raises(SelpruneError, match="other parameters.*new run_dir"):
        Series(progress=False, model=str(tiny_llama_dir), run_dir=str(tmp_path / "r"), **{**TINY, "seed": 1})


def test_series_needs_something_to_prune(tmp_path):
    with pytest.raises(SelpruneError, match="fraction above 0"):
        Series(progress=False, run_dir=str(tmp_path / "r"), ff_frac=0.0, runs="ff,random")


# ------------------------------------------------------------------- steps in-process
def test_series_steps_fill_the_run_directory(series):
    forget, retain = series.collect()
    assert forget.n_tokens == TINY["collect_tokens"] and retain.n_tokens == TINY["collect_tokens"]
    assert forget.hist, "01 keeps a histogram, so peak ablation and the mode are available"
    scores = series.scores_by_importance()
    assert set(scores) >= {"abs", "rms", "std", "freq", "sqrt", "rand"}
    top = series.top_sets(scores, "ff", 0.1)
    agreement = series.agreement(top)
    assert (agreement.values.diagonal() == 1).all() and ((agreement.values >= 0) & (agreement.values <= 1)).all()
    for run in ("ff", "random"):
        records = series.prune(run)
        assert [r["step"] for r in records] == [0, 1, 2]
        assert records[0]["forget"] == series.base["forget"], "step 0 reuses the shared base evaluation"
    before = {k: v.clone() for k, v in series.model.state_dict().items()}
    table = series.results_table()
    assert set(table["run"]) == {"ff", "random"} and len(table) == 4
    assert (series.run_dir / "pruned-model" / "config.json").is_file()
    gen = series.generations({"code": "def f(x):"}, max_new_tokens=4)
    assert list(gen["model"]) == ["unpruned", "pruned (ff)"]
    after = series.model.state_dict()
    assert all((before[k] == after[k]).all() for k in before), "generations must restore the model"
    report = series.neuron_report("ff", 1, 3, top=2)
    assert 1 <= report["rank"] <= report["of"] and len(report["snippets"]) == 4
    with pytest.raises(SelpruneError, match="out of range"):
        series.neuron_report("ff", 99, 0)
    result = series.anamnesia()
    assert set(result["arms"]) == {"unpruned", "selective", "random"}
    assert len(series.anamnesia_table(result)) == 3
    results = json.loads((series.run_dir / "results.json").read_text())
    assert set(results) >= {"params", "environment", "base", "runs", "anamnesia"}
    assert set(results["runs"]) == {"ff", "random"}
    assert results["environment"]["dtype"] == "float32"


# ----------------------------------------------------------------------- papermill
def test_papermill_series_with_other_scoring_and_attention_only(tmp_path, tiny_llama_dir):
    params = {**TINY, "model": str(tiny_llama_dir), "scoring": "std", "runs": "attn,attn_heads",
              "run_dir": str(tmp_path / "run")}
    run_dir = run_series(params, progress=False)
    for name in NOTEBOOKS:
        assert (run_dir / "notebooks" / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["params"]["scoring"] == "std"
    assert set(results["runs"]) == {"attn", "attn_heads", "random"}  # random: anamnesia's control
    for run in ("attn", "attn_heads"):
        records = results["runs"][run]["records"]
        assert len(records) == TINY["steps"] + 1
        assert records[-1]["fraction"]["attn"] > 0 and records[-1]["fraction"]["ff"] == 0
        assert results["runs"][run]["config"]["scoring"] == "std"
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


def test_runs_registry_names_a_kind_for_each_run():
    assert all(kind in ("ff", "attn") for _, kind in RUNS.values())


def test_readme_documents_every_parameter_and_the_two_commands():
    from selprune.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    missing = [k for k in PARAMS if f"`{k}`" not in readme]
    assert not missing, f"README.md does not document parameters {missing}"
    assert "make run" in readme and "make test" in readme


def test_anamnesia_table_shows_whole_steps_and_not_reached():
    def arm(step, top1, index):
        return {"pruned_step": step, "curve": [{"forget": {"top1": top1}}], "retain_drop": 0.1, "forget_drop": 0.8,
                "index": {"0.5": {"step": index[0]}, "0.9": {"step": index[1]}}, "recovery_auc": 0.3}

    table = Series.anamnesia_table({"arms": {"selective": arm(5, 0.1, (3.4, None)), "unpruned": arm(None, 0.5, (0, 0))}})
    sel = table.set_index("arm").loc["selective"]
    assert sel["steps to 50%"] == 3 and sel["steps to 90%"] == "not reached"
    assert sel["retain drop %"] == pytest.approx(10) and sel["forget top1 at start"] == 0.1


@pytest.mark.skipif(os.name != "posix", reason="IPC transport needs Unix sockets")
def test_kernels_use_private_ipc_sockets_where_the_path_fits(monkeypatch):
    import tempfile

    import jupyter_core.paths

    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # pytest's tmp_path may be too long for a socket
        runtime = os.path.join(short, "rt")
        monkeypatch.setattr(jupyter_core.paths, "jupyter_runtime_dir", lambda: runtime)
        a, b = kernel_manager_class()(), kernel_manager_class()()
        assert a.transport == b.transport == "ipc"
        # each kernel its own socket prefix in the runtime folder, not "kernel-ipc" in the working directory
        assert os.path.dirname(a.ip) == os.path.dirname(b.ip) == runtime and a.ip != b.ip
        assert os.stat(runtime).st_mode & 0o077 == 0, "a private folder"
    monkeypatch.setattr(jupyter_core.paths, "jupyter_runtime_dir", lambda: "/" + "d" * 80)  # no room for a socket name
    assert kernel_manager_class()().transport == "tcp"
