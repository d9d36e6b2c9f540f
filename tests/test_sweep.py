"""Sweeps and the selectivity leaderboard (selprune/sweep.py, `selprune sweep`).

Cheap by design: file validation, expansion and ranking are pure functions checked on
hand-made input; one real two-point sweep (the pruning notebook in papermill kernels on a
tiny random Llama and a few short documents) is shared by the tests that need finished
points, each of which works on its own copy of it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from selprune import cli, sweep
from selprune.errors import SelpruneError
from selprune.loop import forget_drop_at_retain_drop
from selprune.paths import REPO_ROOT
from selprune.series import PARAMS, RUNS, Series, active_runs, prune_config, resolve_params
from selprune.texts import load_texts

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "attn_frac": 0.05,
        "batch_size": 4, "dtype": "float32", "device": "cpu"}


def _write(path: Path, spec: dict | str) -> Path:
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _records(retain: list[float], forget: list[float]) -> list[dict]:
    """Step records with the given top-1 curves (step 0 first)."""
    return [{"step": i, "fraction": {"ff": 0.01 * i, "attn": 0.0},
             "forget": {"top1": f}, "retain": {"top1": r}, "seconds": {"eval": 1.0}}
            for i, (r, f) in enumerate(zip(retain, forget, strict=True))]


# ------------------------------------------------------------ the file and its points
@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must hold a mapping"),
    ("bogus: 1\n", r"unknown keys \['bogus'\]"),
    ("base: [1, 2]\n", "base must be a mapping"),
    ("base: {stepz: 3}\n", r"base: unknown parameters \['stepz'\]; valid ones"),
    ("base: {run_dir: x}\n", "sets run_dir.*remove run_dir"),
    ("variants: {a: 1}\n", "variants must be a non-empty list"),
    ("variants: [3]\n", "variant 1 is 3, not a mapping"),
    ("variants: [{name: 'a b'}]\n", "variant 1 has name 'a b'"),
    ("variants: [{name: a, scoring: rms}, {name: a}]\n", "both named 'a'.*distinct names"),
    ("variants: [{name: a, scorin: rms}]\n", r"variant 'a': unknown parameters \['scorin'\]"),
    ("grid: {scoring: rms}\n", "grid axis scoring is 'rms'; give a non-empty list"),
    ("grid: {scoring: [abs, abs]}\n", "repeats a value"),
    ("seeds: [0, 0]\n", "distinct integers"),
    ("seeds: 3\n", "distinct integers"),
    ("keep_models: maybe\n", "keep_models='maybe'; write true or false"),
    ("variants: [{name: a, scoring: rms}]\ngrid: {scoring: [abs, std]}\n", "variant 'a' sets scoring, which grid"),
    ("variants: [{name: a, seed: 1}]\nseeds: [0, 1]\n", "variant 'a' sets seed, which seeds"),
    ("base: {prune_mode: sideways}\n", "point 'base'.*prune_mode='sideways' is not one of iterative, one-shot"),
    ("base: {selection: local}\n", "selection='local' is not one of global, per_layer"),
    ("base: {max_retain_drop: 2}\n", r"max_retain_drop=2.0 is outside \(0, 1\]"),
    ("variants: [{name: big, ff_frac: 0.5, steps: 5}]\n", "point 'big'.*prunes more than all neurons"),
    ("base: {runs: attn, attn_frac: 0.0}\n", "no pruning run has a fraction above 0"),
    ("base: {runs: both, attn_frac: 0.0}\n", "no pruning run has a fraction above 0"),
    ("base: {forget: /nonexistent/corpus}\n", "unknown dataset '/nonexistent/corpus'"),
    ("base: [\n", "not valid YAML"),
])
def test_sweep_file_errors_name_the_problem_and_the_fix(tmp_path, text, message):
    with pytest.raises(SelpruneError, match=message):
        sweep.load_sweep(_write(tmp_path / "s.yaml", text), out=tmp_path / "out")


def test_missing_sweep_file_and_cli_exit_status(tmp_path, capsys):
    with pytest.raises(SelpruneError, match="cannot read sweep file"):
        sweep.load_sweep(tmp_path / "nope.yaml")
    assert cli.main(["sweep", "-f", str(_write(tmp_path / "s.yaml", "base: {stepz: 1}\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selprune: error:") and "stepz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_points_expand_variants_by_grid_by_seeds_with_stable_names(tmp_path):
    spec = {"base": {"steps": 3, "runs": "ff"},
            "variants": [{"name": "a"}, {"scoring": "rms", "runs": "ff,random"}],
            "grid": {"ff_frac": [0.01, 0.02]}, "seeds": [0, 1]}
    sw = sweep.expand(spec, "s.yaml", out=tmp_path / "out")
    names = [p.name for p in sw.points]
    assert names == [f"{v}__ff_frac-{f}__seed-{s}" for v in ("a", "scoring-rms__runs-ff_random")
                     for f in (0.01, 0.02) for s in (0, 1)]
    assert names == [p.name for p in sweep.expand(spec, "s.yaml", out=tmp_path / "out").points], "stable"
    p = sw.points[-1].params
    assert (p["scoring"], p["ff_frac"], p["seed"], p["steps"], p["runs"]) == ("rms", 0.02, 1, 3, "ff,random")
    assert p["run_dir"] == str(tmp_path / "out" / names[-1])
    assert sw.points[0].params["scoring"] == PARAMS["scoring"][0], "unset parameters keep their defaults"
    assert sw.varied == ["ff_frac", "scoring", "seed", "runs"], "PARAMS order, only what differs"
    assert sw.points[-1].notebooks == ("03_prune_ffn.ipynb",), "no statistics or scoring notebook"
    assert sw.points[-1].settings == {"scoring": "rms", "runs": "ff,random", "ff_frac": 0.02, "seed": 1}


def test_a_lone_base_and_a_grid_alone_name_their_points(tmp_path):
    assert [p.name for p in sweep.expand({"base": {}}, "s.yaml", tmp_path).points] == ["base"]
    sw = sweep.expand({"grid": {"scoring": ["abs", "std"], "runs": ["ff", "attn,both"]}}, "s.yaml", tmp_path)
    assert [p.name for p in sw.points] == ["scoring-abs__runs-ff", "scoring-abs__runs-attn_both",
                                           "scoring-std__runs-ff", "scoring-std__runs-attn_both"]
    assert sw.points[1].notebooks == ("04_prune_attention.ipynb",)
    assert sw.out == tmp_path


def test_out_defaults_to_the_file_name_and_the_option_wins(tmp_path):
    f = _write(tmp_path / "mine.yaml", {"base": {}})
    assert sweep.load_sweep(f).out == Path("runs/sweeps/mine")
    assert sweep.load_sweep(_write(tmp_path / "o.yaml", {"out": "x/y"})).out == Path("x/y")
    assert sweep.load_sweep(_write(tmp_path / "o.yaml", {"out": "x/y"}), out=tmp_path / "z").out == tmp_path / "z"


def test_cost_estimate_counts_collections_only_where_the_loop_makes_them():
    rate = {"collect_tokens": int(sweep.COLLECT_TOKENS_PER_S), "eval_tokens": int(sweep.EVAL_TOKENS_PER_S)}
    # with these budgets one collection (forget + retain) and one evaluation cost 2 s each
    base = resolve_params({**rate, "window": 64, "steps": 3, "runs": "ff,random"})
    over = sweep.NOTEBOOK_OVERHEAD_S  # one notebook (03) for ff and random
    assert sweep.estimate_seconds(base) == pytest.approx(2 + over + 3 * (2 + 2) + 3 * 2)
    one_shot = {**base, "prune_mode": "one-shot"}
    assert sweep.estimate_seconds(one_shot) == pytest.approx(2 + over + (3 * 2 + 2) + 3 * 2)
    mean = {**base, "ablation": "mean"}  # random with mean ablation collects for the constants
    assert sweep.estimate_seconds(mean) == pytest.approx(2 + over + 3 * (2 + 2) + 3 * (2 + 2))
    both = {**base, "runs": "ff,attn"}  # two notebooks
    assert sweep.estimate_seconds(both) == pytest.approx(2 + 2 * over + 2 * 3 * (2 + 2))


# ----------------------------------------------------------- headline, rows, ranking
def test_headline_never_reached_is_none_flagged_and_unranked():
    # retain falls at most 5% (0.40 -> 0.38): the 10% read-out does not exist
    rec = _records(retain=[0.40, 0.39, 0.38], forget=[0.50, 0.30, 0.20])
    row = sweep.run_row(rec)
    assert row["forget_drop_at_10"] is None and row["forget_drop_at_20"] is None and row["reached"] is False
    assert row["retain_drop_max"] == pytest.approx(0.05) and row["forget_drop_final"] == pytest.approx(0.6)
    assert "not reached" in row["note"] and "5.0%" in row["note"] and "60.0%" in row["note"]
    # retain falls 20% in one step, forget 80%: at 10% retain damage, forget has lost 40%
    reached = sweep.run_row(_records(retain=[0.40, 0.32], forget=[0.50, 0.10]))
    assert reached["forget_drop_at_10"] == pytest.approx(0.4) and "note" not in reached
    rows = sweep.rank([{"point": "low", "run": "ff", "status": "done", **row},
                       {"point": "high", "run": "ff", "status": "done", **reached}])
    assert [(r["point"], r["rank"]) for r in rows] == [("high", 1), ("low", None)]
    text = sweep.leaderboard_csv(rows)
    low = next(r for r in csv.DictReader(io.StringIO(text)) if r["point"] == "low")
    assert low["forget_drop_at_10"] == "" and low["rank"] == "" and low["reached"] == "False"


def test_ranking_by_hand():
    def row(point, headline, status="done", area=0.0, floor=False):
        return {"point": point, "run": "random" if floor else "ff", "floor": floor, "status": status,
                "forget_drop_at_10": headline, "selectivity_area": area}

    rows = sweep.rank([row("a", 0.30, area=0.1), row("b", 0.70, area=0.1), row("floor", 0.50, floor=True),
                       row("c", None), row("d", None, status="failed"), row("e", 0.70, area=0.2),
                       row("f", 0.90, status="incomplete")])
    # e and b tie on the headline; e has the larger area. The floor's headline is 0.5.
    assert [r["point"] for r in rows] == ["e", "b", "floor", "a", "c", "d", "f"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, None, None, None]
    assert [r["above_floor"] for r in rows[:4]] == pytest.approx([0.2, 0.2, 0.0, -0.2])
    assert all(r["above_floor"] is None for r in rows[4:])
    assert sweep.floor_headline(rows) == pytest.approx(0.5)
    assert all(r["above_floor"] is None for r in sweep.rank([row("a", 0.3)])), "no floor, no comparison"


def test_run_finished_means_all_steps_or_the_stop_rule():
    p = resolve_params({"steps": 3, "max_retain_drop": 0.2})
    assert sweep.run_finished(_records([0.4, 0.39, 0.38, 0.37], [0.5] * 4), p)
    assert not sweep.run_finished(_records([0.4, 0.39], [0.5] * 2), p)
    assert sweep.run_finished(_records([0.4, 0.30], [0.5] * 2), p), "stopped: retain fell 25% > 20%"
    assert not sweep.run_finished(_records([0.4, 0.30], [0.5] * 2), {**p, "max_retain_drop": None})
    assert not sweep.run_finished([], p)


def test_frontier_plot_draws_each_curve_and_the_floor_dashed():
    curves = {"p / ff": _records([0.4, 0.38, 0.3], [0.5, 0.2, 0.1]), "p / random": _records([0.4, 0.3], [0.5, 0.45])}
    fig = sweep.plot_frontier(curves, floor={"p / random"})
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert set(lines) == {"p / ff", "p / random", "headline: 10% retain drop"}
    x, y = lines["p / ff"].get_data()
    assert x == pytest.approx([0, 0.05, 0.25]) and y == pytest.approx([0, 0.6, 0.8]), "drops, not ratios"
    assert lines["p / random"].get_linestyle() == "--" and lines["p / ff"].get_linestyle() == "-"
    assert fig.axes[0].get_xlim()[1] == pytest.approx(0.26)


def test_leaderboard_plot_draws_every_kind_of_row():
    rows = sweep.rank([
        {"point": "p", "run": "ff", "floor": False, "status": "done", **sweep.run_row(_records([0.4, 0.3], [0.5, 0.1]))},
        {"point": "p", "run": "random", "floor": True, "status": "done",
         **sweep.run_row(_records([0.4, 0.3], [0.5, 0.45]))},
        {"point": "q", "run": "attn", "floor": False, "status": "done",
         **sweep.run_row(_records([0.4, 0.39], [0.5, 0.4]))},
        {"point": "r", "run": "ff", "floor": False, "status": "failed", "error": "boom"},
    ])
    fig = sweep.plot_leaderboard(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["p / ff", "p / random", "q / attn", "r / ff"]
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("not reached") for t in texts) and "failed" in texts
    assert any(line.get_linestyle() == "--" for line in ax.lines), "the random floor"
    fig2 = sweep.plot_leaderboard(rows[2:])  # nothing ranked: labels only, no bars
    assert [t.get_text() for t in fig2.axes[0].get_yticklabels()] == ["q / attn", "r / ff"]


# ------------------------------------------------- series parameters the grid needs
def test_new_parameters_map_onto_the_prune_config():
    p = resolve_params({"prune_mode": "one-shot", "selection": "per_layer", "max_retain_drop": 0.25,
                        "runs": "ff,random,both"})
    ff, rnd, both = (prune_config(p, r) for r in ("ff", "random", "both"))
    assert (ff.mode, ff.per_layer, ff.max_retain_drop, ff.attn_frac) == ("one-shot", True, 0.25, 0.0)
    assert rnd.mode == "random" and rnd.per_layer, "the floor stays random, with the same selection"
    assert both.ff_frac == p["ff_frac"] > 0 and both.attn_frac == p["attn_frac"] > 0 and both.heads is None
    assert active_runs({**p, "attn_frac": 0.0}) == ["ff", "random"], "'both' needs both fractions"
    assert resolve_params({"max_retain_drop": 1})["max_retain_drop"] == 1.0
    assert set(sweep.RUN_NOTEBOOKS) == set(RUNS), "every run has a notebook that does it"


def test_a_run_directory_from_before_the_new_parameters_still_resumes(tmp_path):
    s = Series(progress=False, run_dir=str(tmp_path / "r"), runs="ff")
    f = tmp_path / "r" / "params.json"
    old = {k: v for k, v in json.loads(f.read_text()).items() if k not in ("prune_mode", "selection", "max_retain_drop")}
    f.write_text(json.dumps(old))
    Series(progress=False, run_dir=str(tmp_path / "r"), runs="ff")  # defaults of the new ones: the same run
    with pytest.raises(SelpruneError, match="other parameters"):
        Series(progress=False, run_dir=str(tmp_path / "r"), runs="ff", prune_mode="one-shot")
    assert s.p["max_retain_drop"] is None


def test_both_prunes_ff_and_attention_in_one_run(tmp_path, tiny_llama_dir):
    s = Series(progress=False, model=str(tiny_llama_dir), run_dir=str(tmp_path / "r"),
               **{**TINY, "steps": 1, "runs": "both"})
    last = s.prune("both")[-1]
    assert last["fraction"]["ff"] > 0 and last["fraction"]["attn"] > 0
    summary = json.loads((s.run_dir / "results.json").read_text())["runs"]["both"]
    assert set(summary) >= {"forget_drop_at_retain_drop", "selectivity_area", "retain_drop_max", "final_drop"}


# ---------------------------------------------------------------- the shipped sweeps
def test_shipped_sweeps_cover_the_issue_grid_within_the_budget(tmp_path):
    sw = sweep.load_sweep(REPO_ROOT / "sweeps" / "default.yaml", out=tmp_path)
    values = {k: {p.params[k] for p in sw.points} for k in PARAMS}
    assert values["scoring"] >= {"abs", "rms", "std", "sqrt", "freq"}
    assert values["ff_frac"] >= {0.005, 0.01, 0.02}
    assert values["prune_mode"] == {"iterative", "one-shot"} and values["selection"] == {"global", "per_layer"}
    assert values["ablation"] == {"zero", "mean", "peak"}
    runs = [r for p in sw.points for r in p.runs]
    assert {"ff", "attn", "both"} <= set(runs) and runs.count("random") == 1, "the floor runs once"
    for p in sw.points:
        assert p.params["max_retain_drop"] is not None, p.name
        for run in p.runs:
            cfg = prune_config(p.params, run)
            frac = cfg.ff_frac if run != "attn" else cfg.attn_frac
            assert frac * cfg.steps >= 0.2 - 1e-9, f"{p.name}/{run} stops short of 20% pruned"
    assert sum(sweep.estimate_seconds(p.params) for p in sw.points) <= 90 * 60
    seeds = sweep.load_sweep(REPO_ROOT / "sweeps" / "seeds.yaml", out=tmp_path)
    assert {p.params["seed"] for p in seeds.points} == {0, 1, 2}
    assert "selprune sweep" in (REPO_ROOT / "README.md").read_text()


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
            "variants": [{"name": "recipe", "runs": "ff,random"}, {"name": "std", "scoring": "std"}, *(extra or [])]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_tiny_llama_dir, small_sets) -> tuple[Path, dict, list[str]]:
    """A real two-point sweep, run once: its out folder, its spec and its log lines."""
    root = tmp_path_factory.mktemp("sweep")
    spec = _spec(shared_tiny_llama_dir, small_sets, root / "out")
    log: list[str] = []
    sw = sweep.load_sweep(_write(root / "s.yaml", spec))
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


def test_real_sweep_writes_a_ranked_leaderboard_and_its_figure(finished):
    out, _, log = finished
    rows = _csv(out / "leaderboard.csv")
    assert [(r["point"], r["run"], r["floor"]) for r in sorted(rows, key=lambda r: (r["point"], r["run"]))] == [
        ("recipe", "ff", "False"), ("recipe", "random", "True"), ("std", "ff", "False")]
    assert all(r["status"] == "done" for r in rows), rows
    assert "scoring" in rows[0] and "runs" in rows[0], "the varied parameters are columns"
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
    assert (out / "figures" / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures" / "frontier.png").exists() == bool(ranked), "the curves of the ranked runs"
    for point in ("recipe", "std"):
        executed = sorted(p.name for p in (out / point / "notebooks").glob("*.ipynb"))
        assert executed == ["03_prune_ffn.ipynb"], "only the pruning notebook runs"
        assert not (out / point / "pruned-model").exists(), "keep_models is off by default"
    assert any("recipe: done" in line for line in log) and any("std: running ff" in line for line in log)


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
    assert "done    recipe" in sweep.describe(sweep.load_sweep(f))


def test_a_changed_point_is_not_taken_as_finished(finished, tmp_path):
    out, f = _copy(finished, tmp_path)
    spec = yaml.safe_load(f.read_text())
    spec["base"]["steps"] = 3  # the finished runs have 2 steps of other parameters
    sw = sweep.load_sweep(_write(f, spec))
    assert [sweep.point_status(p) for p in sw.points] == ["partial", "partial"]


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
