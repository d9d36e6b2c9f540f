"""The notebook series' facade (selprune/experiment/series.py): its steps in-process on a
tiny model, the run directory's parameter lock, and what a step must leave alone.

The steps share one run directory, filled once per module (statistics, the ff and random
runs) and only read by the tests after it, so that one failing step does not hide the
others and none pays for the pruning again.
"""

from __future__ import annotations

import json

import pytest

from selprune.errors import SelpruneError
from selprune.experiment.config import DEFAULTS
from selprune.experiment.series import Series

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "attn_frac": 0.05,
        "retrain_steps": 2, "retrain_batch": 2, "retrain_window": 32, "retrain_eval_tokens": 64, "dtype": "float32",
        "device": "cpu"}
RUNS = ("ff", "random")


def make_series(model_dir, run_dir, **params) -> Series:
    return Series(progress=False, model=str(model_dir), run_dir=str(run_dir), **{**TINY, "runs": ",".join(RUNS),
                                                                               **params})


@pytest.fixture(scope="module")
def series(tmp_path_factory, shared_tiny_llama_dir) -> Series:
    """A series whose statistics and ff and random runs are done (01 and 03)."""
    s = make_series(shared_tiny_llama_dir, tmp_path_factory.mktemp("series") / "run")
    s.collect()
    for run in RUNS:
        s.prune(run)
    return s


# ------------------------------------------------------------------ parameters, lock
def test_series_refuses_a_run_dir_made_with_other_parameters(tmp_path, shared_tiny_llama_dir):
    make_series(shared_tiny_llama_dir, tmp_path / "r")
    with pytest.raises(SelpruneError, match=r"other parameters \{'seed': \(0, 1\)\}.*use a new run directory"):
        make_series(shared_tiny_llama_dir, tmp_path / "r", seed=1)


def test_series_accepts_rerun_safe_changes_on_one_run_dir(tmp_path, shared_tiny_llama_dir):
    make_series(shared_tiny_llama_dir, tmp_path / "r")
    make_series(shared_tiny_llama_dir, tmp_path / "r", batch_size=3, runs="ff")  # neither changes a result


def test_from_globals_names_missing_parameters_and_the_fix(tmp_path):
    namespace = {**DEFAULTS, "run_dir": str(tmp_path / "nb")}
    del namespace["eps_ff"]
    with pytest.raises(SelpruneError, match=r"parameters cell lacks \['eps_ff'\].*make notebooks"):
        Series.from_globals(namespace)
    assert not (tmp_path / "nb").exists(), "a refused series must not create its run directory"


# ------------------------------------------------------------------- steps in-process
def test_collect_keeps_statistics_of_both_datasets(series):
    forget, retain = series.statistics()
    assert forget.n_tokens == TINY["collect_tokens"] and retain.n_tokens == TINY["collect_tokens"]
    assert forget.hist, "01 keeps a histogram, so peak ablation and the mode are available"
    for side in ("forget", "retain"):
        assert (series.run_dir / "stats" / f"{side}.safetensors").is_file()


def test_scores_cover_every_importance_function_and_agree_with_themselves(series):
    scores = series.scores_by_importance()
    assert set(scores) >= {"abs", "rms", "std", "freq", "sqrt", "rand"}
    top = series.top_sets(scores, "ff", 0.1)
    agreement = series.agreement(top)
    assert list(agreement.index) == list(scores)
    assert (agreement.values.diagonal() == 1).all() and ((agreement.values >= 0) & (agreement.values <= 1)).all()


@pytest.mark.parametrize("run", RUNS)
def test_prune_records_every_step_from_the_shared_base(series, run):
    records = series.records(run)
    assert [r["step"] for r in records] == list(range(TINY["steps"] + 1))
    assert records[0]["forget"] == series.base["forget"], "step 0 reuses the shared base evaluation"
    assert records[-1]["fraction"]["ff"] > 0 and records[-1]["fraction"]["attn"] == 0


def test_prune_is_resumed_not_redone(series):
    before = (series.run_dir / "ff" / "records.json").read_bytes()
    assert series.prune("ff") == json.loads(before)
    assert (series.run_dir / "ff" / "records.json").read_bytes() == before


def test_ff_run_exports_the_pruned_model(series):
    assert (series.run_dir / "pruned-model" / "config.json").is_file()


def test_results_table_has_a_row_per_run_and_dataset(series):
    table = series.results_table()
    assert set(table["run"]) == set(RUNS) and len(table) == 2 * len(RUNS)


def test_summary_of_a_run_not_done_names_its_notebook(series):
    with pytest.raises(SelpruneError, match=r"run 'attn' has not been done .*run notebook 04_prune_attention"):
        series.summary("attn")


def test_generations_restore_the_model(series):
    before = {k: v.clone() for k, v in series.model.state_dict().items()}
    gen = series.generations({"code": "def f(x):"}, max_new_tokens=4)
    assert list(gen["model"]) == ["unpruned", "pruned (ff)"]
    after = series.model.state_dict()
    assert all((before[k] == after[k]).all() for k in before), "generations must restore the model"


def test_neuron_report_ranks_the_neuron_and_shows_snippets(series):
    report = series.neuron_report("ff", 1, 3, top=2)
    assert 1 <= report["rank"] <= report["of"] and len(report["snippets"]) == 4
    with pytest.raises(SelpruneError, match="out of range"):
        series.neuron_report("ff", 99, 0)


def test_neuron_report_does_not_rewrite_results_json(series):
    """The explorer widget calls it on every move: it reads, and writes nothing."""
    results = series.run_dir / "results.json"
    before = (results.stat().st_mtime_ns, results.read_bytes())
    files = sorted(p for p in series.run_dir.rglob("*") if p.is_file())
    series.neuron_report("ff", 0, 1, top=1)
    series.neuron_report("attn", 1, 2, top=1)
    assert (results.stat().st_mtime_ns, results.read_bytes()) == before
    assert sorted(p for p in series.run_dir.rglob("*") if p.is_file()) == files, "nor any other file"


def test_anamnesia_has_three_arms_and_a_table_row_each(series):
    result = series.anamnesia()
    assert set(result["arms"]) == {"unpruned", "selective", "random"}
    assert result["selective_run"] == "ff"
    assert len(series.anamnesia_table(result)) == 3
    stored = json.loads((series.run_dir / "results.json").read_text())["anamnesia"]
    assert stored["arms"].keys() == result["arms"].keys(), "06 writes its result into results.json"


def test_results_json_summarises_the_run_directory(series):
    results = json.loads((series.run_dir / "results.json").read_text())
    assert set(results) >= {"params", "environment", "base", "runs", "anamnesia"}
    assert set(results["runs"]) == set(RUNS)
    assert results["environment"]["dtype"] == "float32"
    assert "run_dir" not in results["params"], "where a run lives is no result"


# --------------------------------------------------------------------- side effects
def test_series_leaves_the_libraries_progress_bars_as_they_were(tmp_path, shared_tiny_llama_dir):
    """progress=False silences transformers and datasets while the series loads, but must
    not switch their bars off for the rest of the caller's session."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    s = make_series(shared_tiny_llama_dir, tmp_path / "r")
    assert s.model is not None and s.data.forget_train.numel() > 0  # loads the model and reads the data
    assert hf_logging.is_progress_bar_enabled(), "transformers' progress bars were switched off process-wide"
    assert not datasets.are_progress_bars_disabled(), "datasets' progress bars were switched off process-wide"
