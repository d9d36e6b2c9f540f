"""Experiment tracking (selprune/experiment/tracking.py): what a pruning run, a series and a
sweep point log, read back with each library's own reader (MlflowClient on the file
store, TensorBoard's EventAccumulator on the event files); W&B only where it is installed.
Everything is offline, under the run's folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import matplotlib
import pytest
from tiny_models import loop_data, tiny_model

from selprune.errors import SelpruneError
from selprune.experiment import tracking
from selprune.experiment.config import Config, resolve
from selprune.experiment.loop import run_pruning
from selprune.experiment.series import Series

# the tiny llama's run of test_loop.py: 3 steps of 10% FF neurons
CFG = Config(ff_frac=0.1, attn_frac=0.05, steps=3, window=16, collect_tokens=64, eval_tokens=64, batch_size=4,
             skip_k=5, retrain_window=16)
# test_series.py's tiny series, runs ff and random
TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "attn_frac": 0.05,
        "dtype": "float32", "device": "cpu", "runs": "ff,random"}
TRACKED = ("mlruns", "tensorboard", "wandb", tracking.STATE_FILE)  # what a tracker may write in a folder


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapters set these for their process; here they are put back after each test."""
    for name in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY", "WANDB_MODE"):
        monkeypatch.setenv(name, "true" if name.startswith("MLFLOW") else "offline")


def prune(cfg: Config, run_dir: Path, run: str = "ff") -> list[dict]:
    return run_pruning(cfg, run, run_dir, tiny_model("llama"), None, loop_data(), progress=False)[0]


def mlflow_run(folder: Path, name: str):
    """(client, run) of the tracker run `name` in `folder`'s file store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.mlflow_uri(folder))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def artifact_json(client, run, path: str, dst: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run.info.run_id, path, str(dst))).read_text())


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_a_prune_run_logs_params_and_every_step_to_mlflow(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    records = prune(CFG.replace(tracker="mlflow"), tmp_path / "out")
    client, run = mlflow_run(tmp_path / "out", "ff")  # outside a series: a run of its own in its folder
    assert run.data.params["ff_frac"] == str(CFG.ff_frac) and run.data.params["run"] == "ff"
    assert run.info.status == "FINISHED"
    for key, side, metric in (("ff/forget_top1", "forget", "top1"), ("ff/retain_loss", "retain", "loss")):
        assert history(client, run, key) == [(r["step"], r[side][metric]) for r in records]
    assert history(client, run, "ff/fraction_ff") == [(r["step"], r["fraction"]["ff"]) for r in records]
    assert len(records) == CFG.steps + 1


def test_a_prune_run_logs_params_and_every_step_to_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = prune(CFG.replace(tracker="tensorboard"), tmp_path / "out", run="random")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard" / "random"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("random/forget_top1")]
    assert logged == [(r["step"], pytest.approx(r["forget"]["top1"], rel=1e-6)) for r in records]  # float32 there
    assert [e.step for e in events.Scalars("random/fraction_ff")] == list(range(CFG.steps + 1))
    params = events.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| ff_frac | 0.1 |" in params and "| run | random |" in params


def test_a_resumed_run_logs_only_its_new_steps(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    prune(CFG.replace(tracker="mlflow", steps=2), tmp_path / "out")
    records = prune(CFG.replace(tracker="mlflow", steps=3), tmp_path / "out")  # extends the run by one step
    client, run = mlflow_run(tmp_path / "out", "ff")  # the same tracker run, reopened
    assert history(client, run, "ff/forget_top1") == [(r["step"], r["forget"]["top1"]) for r in records]


def test_a_prune_run_logs_offline_to_wandb(tmp_path: Path) -> None:
    pytest.importorskip("wandb")  # not a dev dependency: tested where it is installed
    prune(CFG.replace(tracker="wandb"), tmp_path / "out")
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*")), "no offline run folder"


def test_tracker_none_writes_nothing(tmp_path: Path) -> None:
    prune(CFG, tmp_path / "out")
    assert CFG.tracker == "none"
    assert not [p for p in tmp_path.rglob("*") if p.name in TRACKED]


def test_an_unknown_tracker_is_refused_by_the_schema() -> None:
    with pytest.raises(SelpruneError, match=r"tracker='comet' is not one of none, mlflow, tensorboard, wandb"):
        resolve({"tracker": "comet"})


@pytest.mark.parametrize(("tracker", "module", "package"), [("mlflow", "mlflow.tracking", "mlflow-skinny"),
                                                            ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                            ("wandb", "wandb", "wandb")])
def test_a_missing_library_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: str,
                                             module: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(SelpruneError, match=rf"tracker={tracker} needs {package}.*pip install {package}.*tracker=none"):
        tracking.open_tracker(tracker, "x", {}, tmp_path)
    assert not (tmp_path / "mlruns").exists()


def test_a_series_logs_its_runs_key_metrics_tables_and_figures(tmp_path_factory, shared_tiny_llama_dir) -> None:
    """Series.prune -> run_pruning (steps into the series' tracker run) and write_results
    (key metrics, the results table, figures); a sweep point's leaderboard rows too."""
    pytest.importorskip("mlflow")
    from matplotlib import pyplot as plt

    from selprune.experiment.leaderboard import leaderboard
    from selprune.experiment.sweepfile import Point, Sweep

    run_dir = tmp_path_factory.mktemp("tracked") / "series-a"
    s = Series(progress=False, model=str(shared_tiny_llama_dir), run_dir=str(run_dir), tracker="mlflow", **TINY)
    matplotlib.use("Agg")
    (run_dir / "figures").mkdir(parents=True)
    plt.plot([0, 1], [1, 0])
    plt.savefig(run_dir / "figures" / "03_curve.png")
    plt.close()
    for run in ("ff", "random"):
        s.prune(run)
    results = s.write_results()
    client, run = mlflow_run(run_dir, "series-a")  # one tracker run for the whole series
    assert run.data.params["tracker"] == "mlflow" and run.data.params["steps"] == "2"
    for name in ("ff", "random"):
        records = results["runs"][name]["records"]
        assert history(client, run, f"{name}/forget_top1") == [(r["step"], r["forget"]["top1"]) for r in records]
    assert history(client, run, "key/base/forget/top1") == [(0, results["base"]["forget"]["top1"])]
    last = results["runs"]["ff"]["records"][-1]["retain"]["top1"]
    assert history(client, run, "key/ff/final/retain/top1") == [(0, last)]  # logged once, not per rewrite
    table = artifact_json(client, run, "tables/results.json", tmp_path_factory.mktemp("artifacts"))
    assert {r[0] for r in table["data"]} == {"ff", "random"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/03_curve.png"]

    pt = Point("series-a", s.cfg, {})
    sweep = Sweep("sweep.yaml", run_dir.parent, [pt], [])
    # the tiny random model's top-1 on real text is near 0 and pruning moves nothing, so no run is ranked
    # by itself: rank the real rows by hand, the logging is what is tested
    rows = [{**r, "rank": i, "forget_drop_at_10": 0.5 / i} for i, r in enumerate(leaderboard(sweep), 1)]
    tracking.log_leaderboard(sweep, rows)
    tracking.log_leaderboard(sweep, rows)  # the same rows again: nothing new
    board = artifact_json(client, run, "tables/leaderboard.json", tmp_path_factory.mktemp("artifacts"))
    assert [r[board["columns"].index("run")] for r in board["data"]] == [r["run"] for r in rows]
    ranked = [r for r in rows if r.get("rank") is not None]
    assert ranked and (run_dir / tracking.STATE_FILE).exists()
    for r in ranked:
        assert history(client, run, f"leaderboard/{r['run']}/rank") == [(0, r["rank"])]


def test_tracking_overhead_per_step_is_small(tmp_path: Path) -> None:
    """The cost of logging one step's record (about 20 metrics), per tracker; printed, and
    bounded loosely: the machine is shared and noisy, so the bound is 0.5 s, not a figure."""
    record = prune(CFG.replace(steps=1), tmp_path / "plain")[-1]
    for name in ("mlflow", "tensorboard"):
        pytest.importorskip(name)
        t = tracking.RunTracking(tracking.open_tracker(name, "overhead", {"a": 1}, tmp_path / name), "ff/")
        t0 = time.perf_counter()
        for step in range(20):
            t.record({**record, "step": step})
        per_step = (time.perf_counter() - t0) / 20
        t.finish()
        print(f"{name}: {1000 * per_step:.1f} ms per step")
        assert per_step < 0.5
