"""Running a sweep (selprune/experiment/sweep.py, `selprune sweep`): the cost estimate,
resuming, failures, and one real sweep end to end.

One real two-point sweep (the pruning notebook in papermill kernels on a tiny random
Llama and a few short documents) is shared by the tests that need finished points, each
of which works on its own copy of it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selprune.errors import SelpruneError
from selprune.experiment import cli, sweep
from selprune.experiment.config import FIELDS, resolve
from selprune.experiment.runs import RUN_KINDS
from selprune.experiment.series import Series
from selprune.experiment.sweepfile import load_sweep
from selprune.paths import REPO_ROOT
from selprune.selectivity import forget_drop_at_retain_drop
from selprune.texts import load_texts

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "retrain_window": 32, "steps": 2, "ff_frac": 0.05,
        "attn_frac": 0.05, "batch_size": 4, "dtype": "float32", "device": "cpu"}


def _write(path: Path, spec: dict | str) -> Path:
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_a_bad_sweep_file_exits_2_with_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "-f", str(_write(tmp_path / "s.yaml", "base: {stepz: 1}\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selprune: error:") and "stepz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- the estimate
def test_cost_estimate_counts_collections_only_where_the_loop_makes_them():
    rate = {"collect_tokens": int(sweep.COLLECT_TOKENS_PER_S), "eval_tokens": int(sweep.EVAL_TOKENS_PER_S)}
    # with these budgets one collection (forget + retain) and one evaluation cost 2 s each
    base = resolve({**rate, "window": 64, "retrain_window": 32, "steps": 3, "runs": "ff,random"})
    over = sweep.NOTEBOOK_OVERHEAD_S  # one notebook (03) for ff and random
    assert sweep.estimate_seconds(base) == pytest.approx(2 + over + 3 * (2 + 2) + 3 * 2)
    one_shot = base.replace(prune_mode="one-shot")
    assert sweep.estimate_seconds(one_shot) == pytest.approx(2 + over + (3 * 2 + 2) + 3 * 2)
    mean = base.replace(ablation="mean")  # random with mean ablation collects for the constants
    assert sweep.estimate_seconds(mean) == pytest.approx(2 + over + 3 * (2 + 2) + 3 * (2 + 2))
    both = base.replace(runs="ff,attn")  # two notebooks
    assert sweep.estimate_seconds(both) == pytest.approx(2 + 2 * over + 2 * 3 * (2 + 2))
    # relearning (in the sweep's process): per arm its fine-tuning steps and an evaluation at each log_schedule step
    train = {"retrain_steps": 8, "retrain_batch": 2, "retrain_window": 32}  # 8 x 64 tokens
    rel = base.replace(**train, retrain_eval_tokens=int(sweep.EVAL_TOKENS_PER_S) // 2)  # one evaluation = 1 s
    per_arm = 8 * 64 / sweep.TRAIN_TOKENS_PER_S + 5  # evaluations at steps 0, 1, 2, 4, 8
    assert sweep.estimate_seconds(rel, relearn=True) == pytest.approx(sweep.estimate_seconds(rel) + 3 * per_arm)
    # a baseline: its training steps (graddiff: forget and retain windows), an evaluation per checkpoint, and
    # (notebook 07) its output relearned once
    for method, windows in (("ga", 2), ("graddiff", 4)):
        cfg = rel.replace(runs=method, unlearn_steps=4, unlearn_batch=2, unlearn_checkpoints=2)
        train = 4 * windows * 64 / sweep.TRAIN_TOKENS_PER_S
        assert sweep.estimate_seconds(cfg) == pytest.approx(2 + over + train + 2 * 2 + per_arm), method


# ---------------------------------------------------------------- the shipped sweeps
def test_shipped_sweeps_cover_the_issue_grid_within_the_budget(tmp_path):
    sw = load_sweep(REPO_ROOT / "sweeps" / "default.yaml", out=tmp_path)
    values = {k: {p.params[k] for p in sw.points} for k in FIELDS}
    assert values["importance"] >= {"abs", "rms", "std", "sqrt", "freq"}
    assert values["ff_frac"] >= {0.005, 0.01, 0.02}
    assert values["prune_mode"] == {"iterative", "one-shot"} and values["selection"] == {"global", "per_layer"}
    assert values["ablation"] == {"zero", "mean", "peak"}
    runs = [r for p in sw.points for r in p.runs]
    assert {"ff", "attn", "both"} <= set(runs) and runs.count("random") == 1, "the floor runs once"
    for p in sw.points:
        assert p.params["max_retain_drop"] is not None, p.name
        for run in p.runs:
            for kind in RUN_KINDS[run].kinds:
                frac = getattr(p.cfg, f"{kind}_frac")
                assert frac * p.cfg.steps >= 0.2 - 1e-9, f"{p.name}/{run} stops short of 20% of {kind} pruned"
    assert sum(sweep.estimate_seconds(p.cfg) for p in sw.points) <= 90 * 60
    seeds = load_sweep(REPO_ROOT / "sweeps" / "seeds.yaml", out=tmp_path)
    assert {p.params["seed"] for p in seeds.points} == {0, 1, 2}
    assert "selprune sweep" in (REPO_ROOT / "README.md").read_text()


def test_shipped_methods_sweep_tunes_every_baseline_beside_the_best_pruning_recipe(tmp_path):
    sw = load_sweep(REPO_ROOT / "sweeps" / "methods.yaml", out=tmp_path)
    lrs: dict[str, set] = {}
    for p in sw.points:
        for run in p.runs:
            lrs.setdefault(run, set()).add(p.params["unlearn_lr"])
    assert {"ga", "graddiff", "npo", "rmu"} <= set(lrs) and all(len(lrs[m]) >= 3 for m in ("ga", "npo", "rmu"))
    assert {"ff", "both", "random"} <= set(lrs), "pruning recipes and the floor on the same leaderboard"
    assert {p.params["seed"] for p in sw.points} == {0, 1, 2}
    assert len({(p.params["eval_tokens"], p.params["window"]) for p in sw.points}) == 1, "one evaluation set for all"
    seeds: dict[tuple[str, float], set] = {}  # (run, lr) -> seeds: a grid on seed 0, each method's best on 0-2
    for p in sw.points:
        for run in p.runs:
            seeds.setdefault((run, p.params["unlearn_lr"]), set()).add(p.params["seed"])
    for m in ("ga", "graddiff", "npo", "rmu"):
        mine = [s for (run, _), s in seeds.items() if run == m]
        assert sorted(map(len, mine)) == [1] * (len(mine) - 1) + [3], f"{m}: one rate on every seed, the rest on 0"
        assert all(0 in s for s in mine), "every rate has seed 0, where the grid was tuned"
    assert {p.name for p in sw.points if p.relearn} == {f"prune-ff__seed-{i}" for i in range(3)}


def test_shipped_relearning_sweep_relearns_every_point_at_a_bigger_budget(tmp_path):
    sw = load_sweep(REPO_ROOT / "sweeps" / "relearning.yaml", out=tmp_path)
    assert sw.relearn and all(p.relearn for p in sw.points)
    assert all(p.params["retrain_steps"] > resolve({}).retrain_steps for p in sw.points)
    varied = {(p.params["retrain_data"], p.params["retrain_mode"], p.params["retrain_hold_pruned"]) for p in sw.points}
    assert len(varied) == len(sw.points), "each point one variant of the protocol"


def test_shipped_sweeps_use_the_current_parameter_names(tmp_path, capsys):
    """Every shipped sweep file loads without a note about an old name (scoring, mode, per_layer)."""
    files = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"default.yaml", "seeds.yaml", "budget.yaml"}
    for f in files:
        assert load_sweep(f, out=tmp_path / f.stem).points, f.name
    assert "note" not in capsys.readouterr().err


# ------------------------------------------------- a run kind the grid needs: both
def test_both_prunes_ff_and_attention_in_one_run(tmp_path, tiny_llama_dir):
    s = Series(progress=False, model=str(tiny_llama_dir), run_dir=str(tmp_path / "r"),
               **{**TINY, "steps": 1, "runs": "both"})
    last = s.prune("both")[-1]
    assert last["fraction"]["ff"] > 0 and last["fraction"]["attn"] > 0
    summary = json.loads((s.run_dir / "results.json").read_text())["runs"]["both"]
    assert set(summary) >= {"forget_drop_at_retain_drop", "selectivity_area", "retain_drop_max", "final_drop"}


# ------------------------------------------------------------------ a real sweep
@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> dict[str, Path]:
    """Forget and retain folders of a few short bundled documents (cheap to tokenise)."""
    root = tmp_path_factory.mktemp("sets")
    out = {}
    for name, corpus in (("forget", "code"), ("retain", "prose")):
        for split in ("train", "test"):
            (root / name).mkdir(exist_ok=True)
            docs = load_texts(corpus, split)["text"][:6]
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps({"text": d[:1500]}) + "\n" for d in docs))
        out[name] = root / name
    tiny = root / "tiny"  # too little text for one collection window: a point that fails
    tiny.mkdir()
    for split in ("train", "test"):
        (tiny / f"{split}.jsonl").write_text(json.dumps({"text": "x = 1"}) + "\n")
    out["tiny"] = tiny
    return out


def _spec(model: Path, sets: dict[str, Path], out: Path, extra: list[dict] | None = None) -> dict:
    base = {**TINY, "model": str(model), "forget": str(sets["forget"]), "retain": str(sets["retain"]), "runs": "ff"}
    return {"out": str(out), "base": base,
            "variants": [{"name": "recipe", "runs": "ff,random"}, {"name": "std", "importance": "std"}, *(extra or [])]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_tiny_llama_dir, small_sets) -> tuple[Path, dict, list[str]]:
    """A real two-point sweep, run once: its out folder, its spec and its log lines."""
    root = tmp_path_factory.mktemp("sweep")
    spec = _spec(shared_tiny_llama_dir, small_sets, root / "out")
    log: list[str] = []
    sw = load_sweep(_write(root / "s.yaml", spec))
    sweep.run_sweep(sw, progress=False, log=log.append)
    assert not sw.failed, sw.failed
    return root / "out", spec, log


def _copy(finished, tmp_path: Path, extra: list[dict] | None = None) -> tuple[Path, Path]:
    """A copy of the finished sweep's folder and a sweep file pointing at it."""
    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    spec = {**finished[1], "out": str(out)}
    spec["variants"] = [*spec["variants"], *(extra or [])]
    return out, _write(tmp_path / "s.yaml", spec)


def test_real_sweep_writes_a_ranked_leaderboard(finished):
    out, _, log = finished
    rows = _csv(out / "leaderboard.csv")
    assert [(r["point"], r["run"], r["floor"]) for r in sorted(rows, key=lambda r: (r["point"], r["run"]))] == [
        ("recipe", "ff", "False"), ("recipe", "random", "True"), ("std", "ff", "False")]
    assert all(r["status"] == "done" for r in rows), rows
    assert "importance" in rows[0] and "runs" in rows[0], "the varied parameters are columns"
    for r in rows:  # the headline is the one interpolated from the point's own results
        results = json.loads((out / r["point"] / "results.json").read_text())
        want = forget_drop_at_retain_drop(results["runs"][r["run"]]["records"], 0.10)
        assert (r["forget_drop_at_10"] == "") == (want is None)
        if want is not None:
            assert float(r["forget_drop_at_10"]) == pytest.approx(want)
        assert int(r["steps"]) == len(results["runs"][r["run"]]["records"]) - 1 and float(r["seconds"]) > 0
        assert set(results["runs"][r["run"]]) >= {"retain_drop_max", "final_drop", "forget_drop_at_retain_drop"}
    ranked = [r for r in rows if r["rank"]]
    assert [int(r["rank"]) for r in ranked] == list(range(1, len(ranked) + 1))
    assert rows[:len(ranked)] == ranked, "ranked rows come first"
    heads = [float(r["forget_drop_at_10"]) for r in ranked]
    assert heads == sorted(heads, reverse=True)
    assert all(r["note"].startswith("not reached") for r in rows if not r["rank"])
    assert any("recipe: done" in line for line in log) and any("std: running ff" in line for line in log)


def test_real_sweep_draws_its_figures_and_runs_only_the_pruning_notebook(finished):
    out = finished[0]
    done = [r for r in _csv(out / "leaderboard.csv") if r["status"] == "done"]
    assert (out / "figures" / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures" / "frontier.png").exists() == bool(done), "the curves of the finished runs, ranked or not"
    summary = {(r["variant"], r["run"]): r for r in _csv(out / "summary.csv")}
    assert set(summary) == {("recipe", "ff"), ("recipe", "random"), ("std", "ff")}, "no seeds: one row per point"
    assert all(r["seeds"] == "1" for r in summary.values())
    for r in _csv(out / "leaderboard.csv"):
        assert summary[(r["point"], r["run"])]["forget_drop_at_10"] == r["forget_drop_at_10"]
    for point in ("recipe", "std"):
        executed = sorted(p.name for p in (out / point / "notebooks").glob("*.ipynb"))
        assert executed == ["03_prune_ffn.ipynb"], "only the pruning notebook runs"
        assert not (out / point / "pruned-model").exists(), "keep_models is off by default"


def test_rerun_skips_finished_points(finished, tmp_path, monkeypatch, capsys):
    out, f = _copy(finished, tmp_path)
    results = {p: (out / p / "results.json").stat().st_mtime_ns for p in ("recipe", "std")}
    before = (out / "leaderboard.csv").read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(sweep, "run_series", fail)
    assert cli.main(["sweep", "-f", str(f)]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("finished earlier, skipped") == 2
    assert "rank" in cap.out and "leaderboard.csv" in cap.out
    assert {p: (out / p / "results.json").stat().st_mtime_ns for p in ("recipe", "std")} == results
    assert (out / "leaderboard.csv").read_bytes() == before
    assert "done    recipe" in sweep.describe(load_sweep(f))


def test_a_changed_point_is_not_taken_as_finished(finished, tmp_path):
    out, f = _copy(finished, tmp_path)
    spec = yaml.safe_load(f.read_text())
    spec["base"]["steps"] = 3  # the finished runs have 2 steps of other parameters
    sw = load_sweep(_write(f, spec))
    assert [p.status() for p in sw.points] == ["partial", "partial"]
    assert "partial recipe" in sweep.describe(sw)


def test_a_relearning_sweep_puts_the_anamnesia_index_beside_its_runs(tmp_path, shared_tiny_llama_dir, small_sets):
    spec = _spec(shared_tiny_llama_dir, small_sets, tmp_path / "out")
    spec.update(relearn=True, variants=[{"name": "relearn", "runs": "ff,random", "retrain_steps": 2,
                                         "retrain_eval_tokens": 64}])
    sw = load_sweep(_write(tmp_path / "s.yaml", spec))
    assert "+relearn" in sweep.describe(sw)
    sweep.run_sweep(sw, progress=False, log=lambda msg: None)
    assert not sw.failed, sw.failed
    rows = {r["run"]: r for r in _csv(tmp_path / "out" / "leaderboard.csv")}
    result = json.loads((tmp_path / "out" / "relearn" / "anamnesia.json").read_text())
    for run, arm in (("ff", "selective"), ("random", "random")):
        index = result["arms"][arm]["index"]
        assert rows[run]["relearn_50"] == index["0.5"]["text"] and rows[run]["relearn_90"] == index["0.9"]["text"]
        assert rows[run]["relearn_control_holds"] == str(result["control"]["holds"])
    assert sw.points[0].status() == "done"
    assert [p.name for p in (tmp_path / "out" / "relearn" / "notebooks").glob("*.ipynb")] == ["03_prune_ffn.ipynb"]


def test_failing_point_is_recorded_and_the_exit_status_names_it(finished, tmp_path, small_sets, capsys):
    out, f = _copy(finished, tmp_path, extra=[{"name": "starved", "forget": str(small_sets["tiny"])}])
    assert cli.main(["sweep", "-f", str(f), "--quiet"]) == 1
    cap = capsys.readouterr()
    assert "1 of 3 points failed: starved" in cap.err
    rows = {(r["point"], r["run"]): r for r in _csv(out / "leaderboard.csv")}
    bad = rows["starved", "ff"]
    assert bad["status"] == "failed" and bad["rank"] == "" and "03_prune_ffn.ipynb" in bad["error"]
    assert all(rows[k]["status"] == "done" and not rows[k]["error"] for k in rows if k[0] != "starved")
    assert (out / "starved" / "notebooks" / "FAILED-03_prune_ffn.ipynb").is_file()
    assert "failed" in cap.out, "the printed table shows the failed point too"


# ------------------------------------------------------- points in parallel (#19)
HEADLINE_COLUMNS = ("point", "run", "floor", "status", "rank", "steps", "forget_drop_at_05", "forget_drop_at_10",
                    "forget_drop_at_20", "selectivity_area", "retain_drop_max", "forget_drop_final",
                    "retain_drop_final", "ff_fraction", "attn_fraction", "note", "error")


def _headlines(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["point"], r["run"]): {k: r[k] for k in HEADLINE_COLUMNS} for r in _csv(out / "leaderboard.csv")}


def test_two_workers_give_the_sequential_leaderboard(finished, tmp_path):
    """The same two points over two worker processes: the same numbers as the sequential sweep
    (the kernels run with fewer threads, so the float sums may group differently: compared to 1e-6)."""
    spec = {**finished[1], "out": str(tmp_path / "out")}
    log: list[str] = []
    sw = load_sweep(_write(tmp_path / "s.yaml", spec))
    sweep.run_sweep(sw, progress=False, log=log.append, workers=2)
    assert not sw.failed, sw.failed
    want, got = _headlines(finished[0]), _headlines(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for key, row in want.items():
        for col, value in row.items():
            try:
                assert float(got[key][col]) == pytest.approx(float(value), rel=1e-6, abs=1e-9), (key, col)
            except ValueError:  # not a number: text, empty
                assert got[key][col] == value, (key, col)
    assert [line.split(":")[0] for line in log if "running" in line] == ["[1/2] recipe", "[2/2] std"]
    assert sorted(line.split(":")[0] for line in log if ": done in" in line) == ["[1/2] recipe", "[2/2] std"]
    for pt in sw.points:
        assert pt.status() == "done" and not (pt.run_dir / "pruned-model").exists(), pt.name


def test_a_parallel_rerun_submits_only_the_unfinished_points_and_records_a_failure(finished, tmp_path, small_sets,
                                                                                  capsys, monkeypatch):
    out, f = _copy(finished, tmp_path, extra=[{"name": "starved", "forget": str(small_sets["tiny"])}])
    results = {p: (out / p / "results.json").stat().st_mtime_ns for p in ("recipe", "std")}
    submitted: list[str] = []
    submit = sweep._Pool.submit

    def spy(self, pt, *args):
        submitted.append(pt.name)
        return submit(self, pt, *args)

    monkeypatch.setattr(sweep._Pool, "submit", spy)
    assert cli.main(["sweep", "-f", str(f), "--workers", "2"]) == 1
    cap = capsys.readouterr()
    assert submitted == ["starved"], "the finished points are skipped before submitting"
    assert cap.err.count("finished earlier, skipped") == 2 and "[3/3] starved: FAILED (SelpruneError" in cap.err
    assert "1 of 3 points failed: starved" in cap.err
    assert {p: (out / p / "results.json").stat().st_mtime_ns for p in ("recipe", "std")} == results
    rows = {(r["point"], r["run"]): r for r in _csv(out / "leaderboard.csv")}
    bad = rows["starved", "ff"]
    assert bad["status"] == "failed" and bad["rank"] == "" and "03_prune_ffn.ipynb" in bad["error"]
    assert all(rows[k]["status"] == "done" and not rows[k]["error"] for k in rows if k[0] != "starved")
    assert (out / "starved" / "notebooks" / "FAILED-03_prune_ffn.ipynb").is_file()


def test_the_submitit_local_launcher_runs_a_point_as_a_job(finished, tmp_path):
    pytest.importorskip("submitit")
    out, f = _copy(finished, tmp_path, extra=[{"name": "rms", "importance": "rms"}])
    log: list[str] = []
    sw = load_sweep(f)
    sweep.run_sweep(sw, progress=False, log=log.append, launcher="local", slurm=sweep.SlurmOptions(time_min=10))
    assert not sw.failed, sw.failed
    assert any(line.startswith("[3/3] rms: running ff (03_prune_ffn.ipynb) as job ") for line in log), log
    rows = {(r["point"], r["run"]): r for r in _csv(out / "leaderboard.csv")}
    assert rows["rms", "ff"]["status"] == "done" and rows["rms", "ff"]["importance"] == "rms"
    results = json.loads((out / "rms" / "results.json").read_text())
    assert int(rows["rms", "ff"]["steps"]) == len(results["runs"]["ff"]["records"]) - 1 == 2
    assert list((out / sweep.SUBMITIT_DIR).glob("*_log.err")), "submitit's job logs are under the sweep's out"


def test_parallel_options_are_checked_before_anything_runs(tmp_path, monkeypatch, shared_tiny_llama_dir, small_sets):
    sw = load_sweep(_write(tmp_path / "s.yaml", _spec(shared_tiny_llama_dir, small_sets, tmp_path / "out")))
    with pytest.raises(SelpruneError, match=r"workers=0 is below 1; pass --workers 1"):
        sweep.run_sweep(sw, workers=0)
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SelpruneError, match=r"needs submitit.*pip install submitit.*selprune\[cluster\]"):
        sweep.run_sweep(sw, launcher="local")
    monkeypatch.delitem(sys.modules, "submitit")
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(SelpruneError, match=r"needs SLURM's sbatch.*--launcher local or --workers N"):
        sweep.run_sweep(sw, launcher="slurm")
    assert not (tmp_path / "out").exists(), "a refused sweep leaves no folder"


def test_workers_split_the_cores_between_them(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    # both variables through monkeypatch, so that both are put back: a MKL_NUM_THREADS=1 left in
    # this process's environment would reach every notebook kernel nbval starts later (1 thread)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("MKL_NUM_THREADS", "8")
    threads = torch.get_num_threads()
    try:
        assert [sweep.split_threads(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
