"""The sweep file and its points (selprune/experiment/sweepfile.py).

Cheap by design: validation, expansion, names and the stop rule are checked on hand-made
input; nothing here loads a model or runs a notebook (tests/experiment/test_sweep.py
runs a real sweep).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selprune.errors import SelpruneError
from selprune.experiment.config import DEFAULTS, resolve
from selprune.experiment.notebooks import kernel_params
from selprune.experiment.sweepfile import expand, load_sweep, run_finished


def _write(path: Path, spec: dict | str) -> Path:
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def _records(retain: list[float], forget: list[float]) -> list[dict]:
    """Step records with the given top-1 curves (step 0 first)."""
    return [{"step": i, "fraction": {"ff": 0.01 * i, "attn": 0.0},
             "forget": {"top1": f}, "retain": {"top1": r}, "seconds": {"eval": 1.0}}
            for i, (r, f) in enumerate(zip(retain, forget, strict=True))]


# ------------------------------------------------------------ the file and its errors
@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must hold a mapping"),
    ("bogus: 1\n", r"unknown keys \['bogus'\]"),
    ("base: [1, 2]\n", "base must be a mapping"),
    ("base: {stepz: 3}\n", r"base: unknown parameters \['stepz'\]; valid ones"),
    ("base: {run_dir: x}\n", "sets run_dir.*remove run_dir"),
    ("variants: {a: 1}\n", "variants must be a non-empty list"),
    ("variants: [3]\n", "variant 1 is 3, not a mapping"),
    ("variants: [{name: 'a b'}]\n", "variant 1 has name 'a b'"),
    ("variants: [{name: a, importance: rms}, {name: a}]\n", "both named 'a'.*distinct names"),
    ("variants: [{name: a, importanc: rms}]\n", r"variant 'a': unknown parameters \['importanc'\]"),
    ("grid: {importance: rms}\n", "grid axis importance is 'rms'; give a non-empty list"),
    ("grid: {importance: [abs, abs]}\n", "repeats a value"),
    ("seeds: [0, 0]\n", "distinct integers"),
    ("seeds: 3\n", "distinct integers"),
    ("keep_models: maybe\n", "keep_models='maybe'; write true or false"),
    ("relearn: 1\n", "relearn=1; write true or false"),
    ("relearn: true\nbase: {window: 64, retrain_window: 128}\n", "retrain_window=128 is longer than window"),
    ("variants: [{name: a, importance: rms}]\ngrid: {importance: [abs, std]}\n",
     "variant 'a' sets importance, which grid"),
    ("variants: [{name: a, seed: 1}]\nseeds: [0, 1]\n", "variant 'a' sets seed, which seeds"),
    ("variants: [{name: a, seed: 1, seeds: [0]}]\n", "variant 'a' sets seed, which seeds"),
    ("variants: [{name: a, relearn: yes please}]\n", "variant 'a': relearn='yes please'; write true or false"),
    ("variants: [{name: a, runs: ga, relearn: true}]\n", "point 'a' relearns, but its runs \\(ga\\) have no selective"),
    ("variants: [{name: a, seeds: [1, 1]}]\n", "variant 'a': seeds is \\[1, 1\\]; give a list of distinct"),
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
        load_sweep(_write(tmp_path / "s.yaml", text), out=tmp_path / "out")


def test_missing_sweep_file_names_the_path(tmp_path):
    with pytest.raises(SelpruneError, match=r"cannot read sweep file .*nope.yaml.*check the path"):
        load_sweep(tmp_path / "nope.yaml")


def test_old_parameter_names_are_renamed_with_a_note(tmp_path, capsys):
    sw = expand({"base": {"scoring": "rms"}, "grid": {"mode": ["iterative", "one-shot"]}}, "s.yaml", tmp_path)
    assert {p.cfg.importance for p in sw.points} == {"rms"}
    assert [p.cfg.prune_mode for p in sw.points] == ["iterative", "one-shot"]
    err = capsys.readouterr().err
    assert "'scoring' is now 'importance'" in err and "'mode' is now 'prune_mode'" in err


# ----------------------------------------------------------------------- expansion
def test_points_expand_variants_by_grid_by_seeds_with_stable_names(tmp_path):
    spec = {"base": {"steps": 3, "runs": "ff"},
            "variants": [{"name": "a"}, {"importance": "rms", "runs": "ff,random"}],
            "grid": {"ff_frac": [0.01, 0.02]}, "seeds": [0, 1]}
    sw = expand(spec, "s.yaml", out=tmp_path / "out")
    names = [p.name for p in sw.points]
    assert names == [f"{v}__ff_frac-{f}__seed-{s}" for v in ("a", "importance-rms__runs-ff_random")
                     for f in (0.01, 0.02) for s in (0, 1)]
    assert names == [p.name for p in expand(spec, "s.yaml", out=tmp_path / "out").points], "stable"
    p = sw.points[-1].params
    assert (p["importance"], p["ff_frac"], p["seed"], p["steps"], p["runs"]) == ("rms", 0.02, 1, 3, "ff,random")
    assert p["run_dir"] == str(tmp_path / "out" / names[-1])
    assert sw.points[0].params["importance"] == DEFAULTS["importance"], "unset parameters keep their defaults"
    assert sw.varied == ["ff_frac", "importance", "seed", "runs"], "schema order, only what differs"
    assert sw.points[-1].notebooks == ("03_prune_ffn.ipynb",), "no statistics or scoring notebook"
    assert sw.points[-1].settings == {"importance": "rms", "runs": "ff,random", "ff_frac": 0.02, "seed": 1}


def test_a_variants_own_seeds_replace_the_files_for_that_variant_only(tmp_path):
    spec = {"base": {"runs": "ff"}, "seeds": [0, 1, 2],
            "variants": [{"name": "tune", "importance": "rms", "seeds": [0]}, {"name": "best"}]}
    sw = expand(spec, "s.yaml", out=tmp_path / "out")
    assert [p.name for p in sw.points] == ["tune__seed-0", "best__seed-0", "best__seed-1", "best__seed-2"]
    assert sw.points[0].settings == {"importance": "rms", "seed": 0}, "seeds is no series parameter"
    alone = expand({"variants": [{"name": "a", "seeds": [3]}, {"name": "b"}]}, "s.yaml", tmp_path / "o2")
    assert [p.name for p in alone.points] == ["a__seed-3", "b"]


def test_a_variants_own_relearn_replaces_the_files_for_its_points(tmp_path):
    spec = {"base": {"runs": "ff"}, "relearn": True, "seeds": [0, 1],
            "variants": [{"name": "plain", "relearn": False}, {"name": "kept"}]}
    sw = expand(spec, "s.yaml", out=tmp_path / "out")
    assert {p.name: p.relearn for p in sw.points} == {"plain__seed-0": False, "plain__seed-1": False,
                                                      "kept__seed-0": True, "kept__seed-1": True}
    assert sw.points[0].settings == {"seed": 0}, "relearn is no series parameter"
    only = expand({"base": {"runs": "ga"}, "variants": [{"name": "ga"}, {"name": "ff", "runs": "ff", "relearn": True}]},
                  "s.yaml", tmp_path / "o2")
    assert [(p.name, p.relearn) for p in only.points] == [("ga", False), ("ff", True)]


def test_a_lone_base_and_a_grid_alone_name_their_points(tmp_path):
    assert [p.name for p in expand({"base": {}}, "s.yaml", tmp_path).points] == ["base"]
    sw = expand({"grid": {"importance": ["abs", "std"], "runs": ["ff", "attn,both"]}}, "s.yaml", tmp_path)
    assert [p.name for p in sw.points] == ["importance-abs__runs-ff", "importance-abs__runs-attn_both",
                                           "importance-std__runs-ff", "importance-std__runs-attn_both"]
    assert sw.points[1].notebooks == ("04_prune_attention.ipynb",)
    assert sw.out == tmp_path


def test_out_defaults_to_the_file_name_and_the_option_wins(tmp_path):
    f = _write(tmp_path / "mine.yaml", {"base": {}})
    assert load_sweep(f).out == Path("runs/sweeps/mine")
    assert load_sweep(_write(tmp_path / "o.yaml", {"out": "x/y"})).out == Path("x/y")
    assert load_sweep(_write(tmp_path / "o.yaml", {"out": "x/y"}), out=tmp_path / "z").out == tmp_path / "z"


# ------------------------------------------------------------- what goes under out
def test_point_folder_names_are_checked_against_the_file_systems_limit(tmp_path, monkeypatch):
    """The limit is the file system's (pathconf NAME_MAX of out, or its nearest existing
    parent), checked when the file is loaded, for names made from a grid too."""
    import os

    spec = {"grid": {"importance": ["abs", "std"], "ff_frac": [0.01, 0.02]}}
    assert len(expand(spec, "s.yaml", tmp_path / "new" / "out").points) == 4  # 28-byte names pass at 255
    monkeypatch.setattr(os, "pathconf", lambda path, name: 20)  # NAME_MAX, the only one asked
    with pytest.raises(SelpruneError, match=r"s.yaml: point 'importance-abs__ff_frac-0.01' has a folder name of "
                                            r"28 bytes, longer than the file system allows \(20\); give its variant a "
                                            "short name"):
        expand(spec, "s.yaml", tmp_path / "new" / "out")


def test_what_the_sweep_writes_beside_its_points_must_be_free(tmp_path):
    (tmp_path / "a" / "leaderboard.csv").mkdir(parents=True)
    with pytest.raises(SelpruneError, match=r"leaderboard.csv is a folder, where the sweep writes its leaderboard "
                                            "file; remove or rename it"):
        expand({"base": {}}, "s.yaml", tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "figures").write_text("x")
    with pytest.raises(SelpruneError, match="figures is a file, where the sweep writes its figures folder"):
        expand({"base": {}}, "s.yaml", tmp_path / "b")
    with pytest.raises(SelpruneError, match="point 'figures' would have the folder .*figures, the sweep's own"):
        expand({"variants": [{"name": "figures"}]}, "s.yaml", tmp_path / "c")
    assert not (tmp_path / "c").exists(), "loading writes nothing"


# ------------------------------------------------------------------ finished runs
def test_run_finished_means_all_steps_or_the_stop_rule():
    cfg = resolve({"steps": 3, "max_retain_drop": 0.2})
    assert run_finished(_records([0.4, 0.39, 0.38, 0.37], [0.5] * 4), cfg)
    assert not run_finished(_records([0.4, 0.39], [0.5] * 2), cfg)
    assert run_finished(_records([0.4, 0.30], [0.5] * 2), cfg), "stopped: retain fell 25% > 20%"
    assert not run_finished(_records([0.4, 0.30], [0.5] * 2), cfg.replace(max_retain_drop=None))
    assert not run_finished([], cfg)


def test_a_baseline_run_is_finished_at_unlearn_steps():
    cfg = resolve({"unlearn_steps": 8, "runs": "ga"})
    records = [{"step": k, "train_step": s, "forget": {"top1": 0.5}, "retain": {"top1": 0.5}}
               for k, s in enumerate([0, 4, 8])]
    assert run_finished(records, cfg) and not run_finished(records[:2], cfg)
    assert not run_finished(records, cfg.replace(unlearn_steps=12)), "a longer run of the same method"


def test_run_finished_counts_the_forget_stop_rule_too():
    """The loop also stops once forget top-1 falls below stop_forget_top1: such a run is
    over, not interrupted (a sweep would otherwise rerun it forever)."""
    cfg = resolve({"steps": 3, "stop_forget_top1": 0.3})
    assert run_finished(_records([0.4, 0.39], [0.5, 0.2]), cfg), "stopped: forget 0.2 < 0.3"
    assert not run_finished(_records([0.4, 0.39], [0.5, 0.35]), cfg)
    assert not run_finished(_records([0.4, 0.39], [0.5, 0.2]), cfg.replace(stop_forget_top1=None))


# ----------------------------------------------------------- a point's results.json
def _results(point, **changes) -> dict:
    params = {k: v for k, v in kernel_params(point.params).items() if k != "run_dir"}
    return {"params": {**params, **changes}, "runs": {"ff": {"records": _records([0.4, 0.3], [0.5, 0.1])}}}


def test_a_point_is_done_only_with_its_own_parameters_and_every_run_finished(tmp_path):
    pt = expand({"base": {"runs": "ff", "steps": 1}}, "s.yaml", tmp_path).points[0]
    assert pt.results() is None and pt.status() == "new"
    pt.run_dir.mkdir(parents=True)
    assert pt.status() == "partial"
    (pt.run_dir / "results.json").write_text(json.dumps(_results(pt)))
    assert pt.results() is not None and pt.status() == "done"
    (pt.run_dir / "results.json").write_text(json.dumps(_results(pt, importance="rms")))
    assert pt.results() is None and pt.status() == "partial", "made with other parameters"
    (pt.run_dir / "results.json").write_text(json.dumps(_results(pt, batch_size=64)))
    assert pt.status() == "done", "batch_size changes speed, not results"
    longer = expand({"base": {"runs": "ff", "steps": 2}}, "s.yaml", tmp_path).points[0]
    (pt.run_dir / "results.json").write_text(json.dumps(_results(longer)))
    assert longer.status() == "partial", "1 of 2 steps done"


def test_results_recorded_under_old_parameter_names_are_recognised(tmp_path):
    """A results.json written before the schema's renames records `scoring`, `mode` and
    `per_layer`, and lacks parameters added since: the point is still done (the same
    run), and an old name with another value still makes it another one."""
    pt = expand({"base": {"runs": "ff", "steps": 1, "selection": "per_layer"}}, "s.yaml", tmp_path).points[0]
    old = _results(pt)
    p = old["params"]
    p["scoring"], p["mode"], p["per_layer"] = p.pop("importance"), p.pop("prune_mode"), True
    del p["selection"], p["stop_forget_top1"]  # added after the folder was made: its default then
    pt.run_dir.mkdir(parents=True)
    (pt.run_dir / "results.json").write_text(json.dumps(old))
    assert pt.results() is not None and pt.status() == "done"
    p["scoring"] = "rms"
    (pt.run_dir / "results.json").write_text(json.dumps(old))
    assert pt.results() is None and pt.status() == "partial"


def test_a_relearning_sweep_point_is_done_only_once_relearned(tmp_path):
    spec = {"base": {"runs": "ff,random", "steps": 1}, "relearn": True}
    pt = expand(spec, "s.yaml", tmp_path).points[0]
    assert pt.relearn and pt.notebooks == ("03_prune_ffn.ipynb",), "06's arms run in the sweep's process"
    pt.run_dir.mkdir(parents=True)
    results = _results(pt)
    results["runs"]["random"] = results["runs"]["ff"]
    (pt.run_dir / "results.json").write_text(json.dumps({**results, "anamnesia": None}))
    assert pt.status() == "partial", "pruned but not relearned"
    (pt.run_dir / "results.json").write_text(json.dumps({**results, "anamnesia": {"arms": {}}}))
    assert pt.status() == "done"
    plain = expand({**spec, "relearn": False}, "s.yaml", tmp_path).points[0]
    assert plain.status() == "done"
