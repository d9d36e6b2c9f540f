"""Every method side by side (selprune/experiment/compare.py, notebook 07): baseline runs
in their folders, the model put back afterwards, every method's output relearned under
the one protocol, compute in every run's records, and one table for all.

On a tiny random Llama and a few short documents, in-process (`Series`); one run
directory per module, filled once (statistics, ff, random, one baseline)."""

from __future__ import annotations

import json

import pytest
import torch

from selprune.errors import SelpruneError
from selprune.experiment.compare import RELEARN_FILE, restored, run_baseline
from selprune.experiment.config import Config
from selprune.experiment.runs import BASELINES, RUN_KINDS
from selprune.experiment.series import Series
from selprune.unlearning import METHODS

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "dtype": "float32",
        "device": "cpu", "retrain_steps": 2, "retrain_batch": 2, "retrain_window": 32, "retrain_eval_tokens": 64,
        "unlearn_steps": 4, "unlearn_checkpoints": 2, "unlearn_batch": 2, "unlearn_lr": 1e-3, "runs": "ff,random,ga"}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def series(tmp_path_factory, shared_tiny_llama_dir) -> Series:
    s = Series(progress=False, model=str(shared_tiny_llama_dir), run_dir=str(tmp_path_factory.mktemp("cmp") / "r"),
               **TINY)
    for run in ("ff", "random"):
        s.prune(run)
    return s


def test_every_baseline_run_kind_names_a_registered_method():
    assert set(BASELINES) == {n for n, k in RUN_KINDS.items() if k.method}
    assert {RUN_KINDS[n].method for n in BASELINES} <= set(METHODS)
    assert all(RUN_KINDS[n].notebook == "07_compare_methods.ipynb" and not RUN_KINDS[n].kinds for n in BASELINES)


def test_a_baseline_run_leaves_records_and_its_relearning_and_puts_the_model_back(series):
    before = _weights(series.model)
    records = series.unlearn("ga")
    assert all(torch.equal(before[k], v) for k, v in series.model.state_dict().items()), "the model is put back"
    assert [r["train_step"] for r in records] == [0, 2, 4], "record 0, then 2 checkpoints over 4 steps"
    assert records[-1]["forget"]["loss"] > records[0]["forget"]["loss"], "gradient ascent raised the forget loss"
    assert records[-1]["compute"]["backward_tokens"] == 4 * 2 * 64, "4 steps x 2 windows x 64 tokens"
    rel = json.loads((series.run_dir / "ga" / RELEARN_FILE).read_text())
    assert [c["step"] for c in rel["curve"]] == [0, 1, 2] and set(rel["index"]) == {"0.5", "0.9"}
    assert series.relearned("ga") == rel
    results = json.loads((series.run_dir / "results.json").read_text())
    assert results["runs"]["ga"]["config"]["method"] == "ga" and results["runs"]["ga"]["relearn"] is not None
    assert "peak_memory_mb" not in json.dumps(results), "memory peaks vary: timings.json keeps them"


def test_a_series_baseline_starts_from_the_series_base_metrics_not_a_second_evaluation(series, tmp_path,
                                                                                     monkeypatch):
    records = series.unlearn("ga")  # the series hands its base.json metrics on as record 0
    assert {s: records[0][s] for s in ("forget", "retain")} == {s: series.base[s] for s in ("forget", "retain")}
    import selprune.experiment.baselines as baselines

    calls = []
    evaluate_both = baselines._evaluate_both
    monkeypatch.setattr(baselines, "_evaluate_both", lambda *a, **k: calls.append(1) or evaluate_both(*a, **k))
    cfg = Config(**{**TINY, "run_dir": str(tmp_path)})
    given = run_baseline(cfg, "ga", tmp_path / "a", series.model, series.data, progress=False, base=series.base)
    assert len(calls) == 2, "with base: only the 2 checkpoints are evaluated, not record 0 again"
    again = run_baseline(cfg, "ga", tmp_path / "b", series.model, series.data, progress=False)
    assert len(calls) == 2 + 3, "without base: record 0 and the 2 checkpoints"
    assert [(r["forget"], r["retain"]) for r in again] == [(r["forget"], r["retain"]) for r in given]


def test_a_finished_baseline_is_read_back_not_trained_again(series, monkeypatch):
    series.unlearn("ga")
    import selprune.experiment.compare as compare

    monkeypatch.setattr(compare, "unlearn", lambda *a, **k: pytest.fail("trained again"))
    assert series.unlearn("ga") == series.records("ga")


def test_a_baseline_folder_is_locked_to_its_parameters(series, tmp_path):
    cfg = Config(**{**TINY, "run_dir": str(tmp_path)})
    run_baseline(cfg, "ga", tmp_path / "ga", series.model, series.data, progress=False)
    with pytest.raises(SelpruneError, match="other parameters.*unlearn_lr"):
        run_baseline(cfg.replace(unlearn_lr=1e-4), "ga", tmp_path / "ga", series.model, series.data, progress=False)
    with pytest.raises(SelpruneError, match="prunes neurons"):
        run_baseline(cfg, "ff", tmp_path / "ff", series.model, series.data, progress=False)


def test_pruning_runs_record_their_compute_step_by_step(series):
    ff, rnd = series.records("ff"), series.records("random")
    per_collection = series.data.forget_train.numel() + series.data.retain_train.numel()
    assert [r["compute"]["forward_tokens"] for r in ff[1:]] == [per_collection, 2 * per_collection], "iterative"
    assert all(r["compute"]["backward_tokens"] == 0 for r in ff[1:])
    assert [r["compute"]["forward_tokens"] for r in rnd[1:]] == [0, 0], "random pruning collects nothing"


def test_a_pruning_run_is_relearned_from_its_last_step_and_the_model_put_back(series):
    before = _weights(series.model)
    rel = series.relearned("ff")
    assert all(torch.equal(before[k], v) for k, v in series.model.state_dict().items())
    assert rel["pruned_fraction"]["ff"] == pytest.approx(series.records("ff")[-1]["fraction"]["ff"])
    assert series.relearned("ff") == rel, "computed once"


def test_the_methods_table_puts_pruning_and_baselines_in_one_frame(series):
    series.unlearn("ga")
    runs = series.compared()
    assert list(runs) == ["ff", "random", "ga"]
    table = series.methods_table(runs, {r: series.relearned(r) for r in runs if r != "random"}).set_index("run")
    assert list(table["kind"]) == ["pruning", "floor", "baseline"]
    assert table.loc["ga", "backward tokens"] == 4 * 2 * 64 and table.loc["ff", "backward tokens"] == 0
    assert table.loc["random", "relearn to 50%"] == "-"
    assert table.loc["ga", "relearn to 50%"] == series.relearned("ga")["index"]["0.5"]["text"]


def test_restored_puts_weights_back_even_after_an_error(series):
    before = _weights(series.model)
    with pytest.raises(RuntimeError), restored(series.model):
        with torch.no_grad():
            next(series.model.parameters()).add_(1.0)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in series.model.state_dict().items())


def test_probes_of_the_unpruned_model_and_a_pruning_runs_last_step_go_into_results(series):
    before = _weights(series.model)
    small = {"code_prompts": 2, "code_tokens": 8}
    unpruned, ff = series.probes(**small), series.probes("ff", **small)
    assert all(torch.equal(before[k], v) for k, v in series.model.state_dict().items()), "the model is put back"
    for out in (unpruned, ff):
        assert out["code_probe"]["n"] == 2 and 0 <= out["code_probe"]["fraction"] <= 1
        assert set(out["membership"]) >= {"auc"} and "skipped" in out["humaneval"], "HumanEval only on request"
    results = json.loads((series.run_dir / "results.json").read_text())
    assert set(results["probes"]) == {"unpruned", "ff"}
    assert results["probes"]["ff"]["membership"] == {k: v for k, v in ff["membership"].items() if k != "seconds"}
    assert series.probes("ff") == json.loads((series.run_dir / "ff" / "probes.json").read_text()), "read back"
    with pytest.raises(SelpruneError, match="finished run"):
        series.probes("npo", **small)  # not run in this series


def test_probes_of_a_baseline_retrain_its_output_and_check_it(series, monkeypatch):
    """A baseline's weights are not stored: its output is trained again, must reproduce the
    recorded curve, and is probed; the model is put back."""
    series.unlearn("ga")
    before = _weights(series.model)
    ga = series.probes("ga", code_prompts=2, code_tokens=8)
    assert all(torch.equal(before[k], v) for k, v in series.model.state_dict().items())
    unpruned = series.probes(code_prompts=2, code_tokens=8)
    assert ga["membership"]["mean_score"] != unpruned["membership"]["mean_score"]  # another model was probed
    import selprune.experiment.compare as compare

    real = compare.unlearn
    monkeypatch.setattr(compare, "unlearn", lambda m, d, cfg, method, progress: real(
        m, d, cfg.replace(unlearn_lr=cfg.unlearn_lr * 2), method, progress))
    (series.run_dir / "ga" / "probes.json").unlink()
    with pytest.raises(SelpruneError, match="does not reproduce its records"):
        series.probes("ga", code_prompts=2, code_tokens=8)


def test_probe_all_takes_the_models_probes_names_and_feeds_table_and_leaderboard(series):
    from selprune.experiment.leaderboard import probe_row
    from selprune.experiment.runs import probe_models

    want = [n for n in probe_models(series.cfg.probes) if n == "unpruned" or n in series.finished_runs()]
    got = series.probe_all()
    assert list(got) == want and "unpruned" in got and "ff" in got
    table = series.probes_table()
    assert list(table["model"]) == want
    assert table.loc[table["model"] == "ff", "code parses"].item() == got["ff"]["code_probe"]["fraction"]
    assert {"MIA AUC loss", "MIA AUC zlib", "MIA AUC mink++"} <= set(table.columns)
    row = probe_row(got["ff"])
    assert row["code_parses"] == got["ff"]["code_probe"]["fraction"] and row["mia_auc_minkpp"] == \
        got["ff"]["membership"]["auc"]["mink++"]
    assert probe_row(None) == {}
    lm = {**got["ff"], "lm_eval": {"tasks": {"selprune_code_next_line": {"acc": 0.25}}}}
    assert probe_row(lm)["lm_eval_code_next_line_acc"] == 0.25
