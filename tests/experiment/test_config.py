"""The parameter schema (selprune/experiment/config.py): one validation for every entry point.

Every hostile value is refused with a `SelpruneError` whose message names the parameter
and the fix, whichever way it comes in: `resolve` (the CLI), `Series(...)` (notebook API),
a notebook's parameters cell (`Series.from_globals`), `selprune prune`
(`config_from`), a sweep file (`expand`) and a hand-built `Config` given to the loop
(`run_pruning`), and a refused input never creates its run directory. Then presets,
old names, coercion, unknown names, and the schema itself (help, stage, defaults).
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest

from selprune.errors import SelpruneError
from selprune.experiment.config import (
    ALIASES,
    DEFAULTS,
    FIELDS,
    HINTS,
    PRESETS,
    STAGES,
    Config,
    choices_of,
    help_of,
    rename_aliases,
    resolve,
    stage_of,
    validate,
)
from selprune.experiment.loop import run_pruning
from selprune.experiment.param_args import read_params
from selprune.experiment.prune_command import config_from
from selprune.experiment.series import Series
from selprune.experiment.sweepfile import check_devices, expand
from selprune.models import load_model


# ------------------------------------------------------------------- entry points
def _resolve(tmp: Path, params: dict) -> Config:
    return resolve(params)


def _series(tmp: Path, params: dict) -> Config:
    return Series(progress=False, **{"run_dir": str(tmp / "run"), **params}).cfg


def _notebook(tmp: Path, params: dict) -> Config:  # a notebook's parameters cell defines every name
    return Series.from_globals({**DEFAULTS, "run_dir": str(tmp / "run"), **params}).cfg


def _prune(tmp: Path, params: dict) -> Config:  # selprune prune --run-kind both
    return config_from(params, "both", note=lambda msg: None)


def _sweep(tmp: Path, params: dict) -> Config:
    """A sweep run on this machine: loaded (its device left to where it runs), then checked
    as `run_sweep` checks it before a local point runs."""
    sweep = expand({"base": params}, out=tmp / "run")
    check_devices(sweep)
    return sweep.points[0].cfg


def _loop(tmp: Path, params: dict) -> Config:  # a Config built by hand, straight into the loop
    cfg = Config(**{**DEFAULTS, **params})
    run_pruning(cfg, "both", tmp / "run", None, None, progress=False)  # refused before the model is touched
    return cfg


ENTRY_POINTS = {"resolve": _resolve, "series": _series, "notebook": _notebook, "prune": _prune, "sweep": _sweep,
                "loop": _loop}

# (parameters, what the message must say: the parameter, its value, and the fix)
HOSTILE = [
    ({"max_retain_drop": float("nan")}, r"max_retain_drop=nan is outside \(0, 1\]; use e\.g\. 0\.25, or None"),
    ({"max_retain_drop": -1}, r"max_retain_drop=-1(\.0)? is outside \(0, 1\]; use e\.g\. 0\.25, or None"),
    ({"max_retain_drop": 0}, r"max_retain_drop=0(\.0)? is outside \(0, 1\]; use e\.g\. 0\.25"),
    ({"eps_ff": 0}, r"eps_ff=0(\.0)? must be a positive number; the reference value is 1e-3"),
    ({"eps_ff": -0.5}, r"eps_ff=-0\.5 must be a positive number; the reference value is 1e-3"),
    ({"eps_attn": float("inf")}, r"eps_attn=inf must be a positive number; the reference value is 1e-4"),
    ({"skip_k": -5}, r"skip_k=-5 is below 0; use 0 or more"),
    ({"stop_forget_top1": 2}, r"stop_forget_top1=2(\.0)? is outside \(0, 1\]; it is an accuracy, e\.g\. 0\.05"),
    ({"seed": -1}, r"seed=-1 is outside \[0, 2\^63\); use e\.g\. 0, 1, 2"),
    ({"seed": 2**63}, r"seed=9223372036854775808 is outside \[0, 2\^63\); use e\.g\. 0, 1, 2"),
    ({"window": 2048}, r"collect_tokens=1024 is below one window \(2048 tokens\); raise it or lower window"),
    ({"window": 64, "eval_tokens": 32}, r"eval_tokens=32 is below one window \(64 tokens\); raise it or lower window"),
    ({"window": 1}, r"window=1 is below 2 \(one input and one target token\); use 2 or more"),
    ({"retrain_lr": 0}, r"retrain_lr=0(\.0)? must be a positive number; e\.g\. 1e-5"),
    ({"forget": "code", "retain": "code"}, r"forget and retain are both 'code'; pick two different datasets"),
    ({"ff_frac": 1.5}, r"ff_frac=1\.5 is outside \[0, 1\); use e\.g\. 0\.02"),
    ({"ff_frac": 1.0}, r"ff_frac=1(\.0)? is outside \[0, 1\); use e\.g\. 0\.02"),
    ({"ff_frac": -0.1}, r"ff_frac=-0\.1 is outside \[0, 1\); use e\.g\. 0\.02"),
    ({"attn_frac": 1.5}, r"attn_frac=1\.5 is outside \[0, 1\); use e\.g\. 0\.02"),
    ({"attn_frac": 0.4, "steps": 3}, r"attn_frac=0\.4 x steps=3 prunes more than all neurons; lower either"),
    ({"ff_frac": 0.3, "steps": 4}, r"ff_frac=0\.3 x steps=4 prunes more than all neurons; lower either"),
    ({"steps": 0}, r"steps=0 is below 1; use 1 or more"),
    ({"steps": -3}, r"steps=-3 is below 1; use 1 or more"),
    ({"collect_tokens": 8}, r"collect_tokens=8 is below one window \(256 tokens\); raise it or lower window"),
    ({"importance": "l3"}, r"importance='l3' is not one of abs, freq, rand, rms, sqrt, std; pick one of those"),
    ({"score": "quotient"}, r"score='quotient' is not one of mean_diff, ratio; pick one of those"),
    ({"prune_mode": "greedy"}, r"prune_mode='greedy' is not one of iterative, one-shot; pick one of those"),
    ({"ablation": "median"}, r"ablation='median' is not one of mean, peak, zero; pick one of those"),
    ({"heads": "max"}, r"heads='max' is not one of mean, median; pick one of those"),
    ({"selection": "per-layer"}, r"selection='per-layer' is not one of global, per_layer; pick one of those"),
    ({"retrain_mode": "qlora"}, r"retrain_mode='qlora' is not one of full, lora; pick one of those"),
    ({"dtype": "fp64"}, r"dtype='fp64' is not one of auto, float32, bfloat16, float16; pick one of those"),
    ({"device": "tpu"}, r"unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    ({"device": "cuda:99"}, r"device 'cuda:99' asked for, but torch sees (no CUDA GPU|only \d+ CUDA GPU).*cpu"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("params", "match"), HOSTILE, ids=[repr(p)[:50] for p, _ in HOSTILE])
def test_hostile_values_are_refused_at_every_entry_point(tmp_path, entry, params, match):
    with pytest.raises(SelpruneError, match=match):
        ENTRY_POINTS[entry](tmp_path, params)
    assert not (tmp_path / "run").exists(), "a refused input must not create its run directory"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_defaults_pass_every_entry_point(tmp_path, entry):
    if entry == "loop":  # the loop validates what it is given (running it needs a model: tests/experiment/test_loop.py)
        validate(Config(), runs=["both"], require_runs=False)
        return
    cfg = ENTRY_POINTS[entry](tmp_path, {})
    expected = Config(run_dir=str(tmp_path / "run")) if entry in ("series", "notebook") else Config()
    if entry == "sweep":  # a sweep point runs in its own folder under `out`
        expected = Config(run_dir=cfg.run_dir)
        assert Path(cfg.run_dir).parent == tmp_path / "run"
    assert cfg == expected


def test_retraining_rules_apply_only_where_the_work_retrains(tmp_path):
    """retrain_window > window is refused for work that retrains (the whole series, notebook
    06), and accepted by pruning-only entry points (selprune prune, sweeps, the loop)."""
    params = {"window": 64, "collect_tokens": 256, "eval_tokens": 256}  # retrain_window stays 128
    with pytest.raises(SelpruneError, match=r"retrain_window=128 is longer than window \(64\); lower it"):
        resolve(params, relearn=True)
    with pytest.raises(SelpruneError, match=r"retrain_window=128 is longer than window \(64\); lower it"):
        validate(resolve(params), relearn=True)
    assert resolve(params).retrain_window == 128
    assert config_from(params, "ff", note=lambda msg: None).window == 64
    assert expand({"base": params}, out=tmp_path / "sw").points[0].cfg.window == 64
    resolve({**params, "retrain_window": 64}, relearn=True)


# ------------------------------------------------------- nothing to prune, per entry point
def test_nothing_to_prune_in_a_series():
    none = {"ff_frac": 0.0, "attn_frac": 0.0, "runs": "ff,random,attn,both"}
    with pytest.raises(SelpruneError, match=r"no pruning run has a fraction above 0.*set ff_frac or attn_frac above 0"):
        resolve(none)
    resolve(none, require_runs=False)  # a command that prunes nothing asks for this
    # the baselines prune nothing: with no fraction above 0 they are what is left to do
    assert resolve({"ff_frac": 0.0, "attn_frac": 0.0}).active_runs() == ["ga", "graddiff", "npo", "rmu"]


def test_series_needs_something_to_prune(tmp_path):
    with pytest.raises(SelpruneError, match=r"fraction above 0.*set ff_frac"):
        Series(progress=False, run_dir=str(tmp_path / "r"), ff_frac=0.0, runs="ff,random")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("run", "params", "kind"), [
    ("ff", {"ff_frac": 0.0}, "ff"),
    ("random", {"ff_frac": 0.0}, "ff"),
    ("attn_heads", {"attn_frac": 0.0}, "attn"),
    ("both", {"attn_frac": 0.0}, "attn"),
])
def test_a_run_with_nothing_to_prune_is_refused(run, params, kind):
    cfg = Config(**params)
    with pytest.raises(SelpruneError, match=rf"run {run} prunes {kind} neurons, but {kind}_frac=0\.0: nothing to "
                                            rf"prune; set {kind}_frac above 0"):
        validate(cfg, runs=[run], require_runs=False)
    validate(cfg, runs=[r for r in ("ff", "attn") if r != kind], require_runs=False)  # the other kind's run is fine


def test_steps_below_one_in_a_notebooks_parameters_cell(tmp_path):
    namespace = {**DEFAULTS, "steps": -2, "run_dir": str(tmp_path / "nb")}
    with pytest.raises(SelpruneError, match=r"steps=-2 is below 1; use 1 or more"):
        Series.from_globals(namespace)
    assert not (tmp_path / "nb").exists()


def test_a_parameters_cell_missing_a_name_is_refused(tmp_path):
    namespace = {k: v for k, v in DEFAULTS.items() if k != "seed"}
    with pytest.raises(SelpruneError, match=r"the parameters cell lacks \['seed'\]; restore it"):
        Series.from_globals(namespace)


def test_unknown_dtype_and_device_from_the_loader_too():
    """The model loader, called directly, refuses them before loading anything."""
    with pytest.raises(SelpruneError, match=r"unknown dtype 'float8'; use auto or one of \[.*'float32'.*\]"):
        load_model("smollm2-135m", dtype="float8", device="cpu")
    with pytest.raises(SelpruneError, match=r"unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"):
        load_model("smollm2-135m", dtype="float32", device="tpu")


# ------------------------------------------------------------------------ names
@pytest.mark.parametrize("entry", ["resolve", "series", "prune"])
def test_unknown_names_get_a_did_you_mean(tmp_path, entry):
    with pytest.raises(SelpruneError, match=r"unknown parameters \['stepz'\] \(stepz: did you mean steps\?\); "
                                            r"valid ones: .*\bsteps\b"):
        ENTRY_POINTS[entry](tmp_path, {"stepz": 3})
    assert not (tmp_path / "run").exists()


def test_unknown_names_in_a_sweep_file(tmp_path):
    # the sweep file checks names itself first (sweepfile._check_names), without the did-you-mean
    with pytest.raises(SelpruneError, match=r"base: unknown parameters \['stepz'\].*valid ones: .*\bsteps\b"):
        _sweep(tmp_path, {"stepz": 3})


def test_an_unknown_name_with_no_near_one_lists_the_valid_ones():
    with pytest.raises(SelpruneError) as e:
        resolve({"zzzz": 1})
    msg = str(e.value)
    assert "unknown parameters ['zzzz']" in msg and "did you mean" not in msg
    assert all(name in msg for name in FIELDS)


def test_allow_limits_the_names_a_command_accepts():
    allowed = {n for n in FIELDS if stage_of(n) != "relearn"}
    resolve({"steps": 2}, allow=allowed)
    with pytest.raises(SelpruneError, match=r"parameters \['retrain_steps'\] are not used by this command \(stages "
                                            r"\['relearn'\]\); remove them"):
        resolve({"retrain_steps": 3}, allow=allowed)


@pytest.mark.parametrize("runs", ["ff, random", " ff ,random ", "ff,random,"])
def test_runs_with_spaces_are_accepted(tmp_path, runs):
    assert resolve({"runs": runs}).active_runs() == ["ff", "random"]
    assert Series(progress=False, run_dir=str(tmp_path / "r"), runs=runs).active_runs() == ["ff", "random"]


@pytest.mark.parametrize(("runs", "match"), [
    ("ff,bogus", r"runs='ff,bogus' names unknown runs \['bogus'\]; choose among ff, random, attn, attn_heads, both"),
    ("ff, ff", r"runs='ff, ff' names a run twice; list each once"),
])
def test_bad_runs_are_refused(tmp_path, runs, match):
    for entry in ("resolve", "series", "prune", "sweep"):
        with pytest.raises(SelpruneError, match=match):
            ENTRY_POINTS[entry](tmp_path, {"runs": runs})
    assert not (tmp_path / "run").exists()


def test_active_runs_need_a_fraction_above_0_for_every_kind_they_prune():
    every = "ff,random,attn,attn_heads,both"
    assert resolve({"runs": every}).active_runs() == ["ff", "random", "attn", "attn_heads", "both"]
    assert resolve({"runs": every, "attn_frac": 0.0}).active_runs() == ["ff", "random"], "'both' needs both"
    assert resolve({"runs": every, "ff_frac": 0.0}).active_runs() == ["attn", "attn_heads"]


# ------------------------------------------------------------------------ presets
def test_preset_paper_sets_the_papers_budgets():
    assert PRESETS["paper"] == {"collect_tokens": 100_000, "eval_tokens": 100_000, "steps": 10}
    cfg = resolve({}, preset="paper")
    assert (cfg.collect_tokens, cfg.eval_tokens, cfg.steps) == (100_000, 100_000, 10)
    assert cfg == Config(collect_tokens=100_000, eval_tokens=100_000, steps=10), "nothing else changes"


def test_p_values_override_the_preset():
    given = read_params(None, [["steps", "3"], ["eval_tokens", "2048"]])  # as `-p steps 3 -p eval_tokens 2048`
    cfg = resolve(given, preset="paper")
    assert (cfg.steps, cfg.eval_tokens, cfg.collect_tokens) == (3, 2048, 100_000)


@pytest.mark.parametrize("entry", ["resolve", "series", "prune"])
def test_the_preset_reaches_every_command(tmp_path, entry):
    call = {"resolve": lambda: resolve({"steps": 4}, preset="paper"),
            "series": lambda: Series(progress=False, preset="paper", run_dir=str(tmp_path / "r"), steps=4).cfg,
            "prune": lambda: config_from({"steps": 4}, "ff", preset="paper", note=lambda m: None)}[entry]
    cfg = call()
    assert (cfg.collect_tokens, cfg.eval_tokens, cfg.steps) == (100_000, 100_000, 4)


def test_unknown_preset():
    with pytest.raises(SelpruneError, match=r"unknown preset 'tiny'; choose among paper"):
        resolve({}, preset="tiny")
    with pytest.raises(SelpruneError, match=r"unknown preset 'tiny'; choose among paper"):
        config_from({}, "ff", preset="tiny", note=lambda m: None)


def test_presets_name_schema_fields_with_valid_values():
    for name, values in PRESETS.items():
        assert set(values) <= set(FIELDS), name
        resolve({}, preset=name)


# -------------------------------------------------------------------- old names
def test_an_alias_is_renamed_with_a_note(capsys):
    cfg = resolve({"scoring": "rms"})
    assert cfg.importance == "rms"
    err = capsys.readouterr().err
    assert "'scoring' is now 'importance'" in err and "accepted until" in err


@pytest.mark.parametrize(("old", "value", "new", "expected"), [
    ("scoring", "rms", "importance", "rms"),
    ("mode", "one-shot", "prune_mode", "one-shot"),
    ("per_layer", True, "selection", "per_layer"),
    ("per_layer", False, "selection", "global"),
])
def test_every_alias_maps_onto_its_new_name(old, value, new, expected):
    notes = []
    assert rename_aliases({old: value, "steps": 2}, warn=notes.append) == {new: expected, "steps": 2}
    assert len(notes) == 1 and old in notes[0] and new in notes[0]
    assert ALIASES[old][0] == new and new in FIELDS and old not in FIELDS


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_giving_both_names_is_refused(old):
    new = ALIASES[old][0]
    with pytest.raises(SelpruneError, match=rf"both {old} and {new} are given; {old} is the old name of {new}: "
                                            rf"keep {new}"):
        resolve({old: DEFAULTS[new], new: DEFAULTS[new]})


def test_an_aliased_unknown_importance_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SelpruneError, match=r"importance='l3' is not one of abs, freq, rand, rms, sqrt, std; pick one"):
        Series(progress=False, run_dir=str(tmp_path / "run"), scoring="l3")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- coercion
def test_values_are_coerced_to_their_fields_type():
    assert resolve({"retrain_lr": "1e-5"}).retrain_lr == 1e-5  # YAML 1.1 reads 1e-5 as text
    cfg = resolve({"ff_frac": 0, "max_retain_drop": 1, "attn_frac": 0.05})
    assert type(cfg.ff_frac) is float and cfg.ff_frac == 0.0
    assert type(cfg.max_retain_drop) is float and cfg.max_retain_drop == 1.0
    assert resolve({"max_retain_drop": None}).max_retain_drop is None


@pytest.mark.parametrize(("params", "match"), [
    ({"steps": "five"}, r"steps must be an integer, not 'five'"),
    ({"steps": 2.5}, r"steps must be an integer, not 2\.5"),
    ({"ff_frac": "lots"}, r"ff_frac must be a number, not 'lots'"),
    ({"retrain_hold_pruned": "yes"}, r"retrain_hold_pruned must be true or false, not 'yes'"),
    ({"ff_frac": True}, r"ff_frac must be a number"),
])
def test_values_of_the_wrong_type_are_refused(params, match):
    with pytest.raises(SelpruneError, match=match):
        resolve(params)


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(HINTS[name])


@pytest.mark.parametrize("name", [n for n in FIELDS if not _optional(n)])
def test_none_is_refused_where_not_optional(name):
    with pytest.raises(SelpruneError, match=rf"parameter {name} must be .*, not None"):
        resolve({name: None})
    with pytest.raises(SelpruneError, match=rf"parameter {name} must be .*, not None"):
        validate(Config(**{name: None}))  # a Config built by hand: a clear error, not a TypeError later


@pytest.mark.parametrize("name", [n for n in FIELDS if _optional(n)])
def test_none_is_accepted_where_optional(name):
    assert getattr(resolve({name: None}), name) is None


@pytest.mark.parametrize(("params", "match"), [
    ({"ff_frac": "0.1"}, r"ff_frac='0\.1' must be a number; pass 0\.1"),
    ({"model": 5}, r"model=5 must be text; pass '5'"),
])
def test_a_hand_built_config_of_the_wrong_type_is_refused(params, match):
    with pytest.raises(SelpruneError, match=match):
        validate(Config(**params))


# -------------------------------------------------------------------- the schema
@pytest.mark.parametrize("name", list(FIELDS))
def test_every_field_has_help_a_stage_and_a_default_that_passes_its_check(name):
    meta = FIELDS[name].metadata
    assert isinstance(meta["help"], str) and len(meta["help"]) > 10, f"{name} needs a one-line help"
    assert "\n" not in meta["help"]
    assert stage_of(name) in STAGES
    default = DEFAULTS[name]
    assert not (isinstance(default, float) and math.isnan(default))
    if meta["check"] is not None:
        assert meta["check"](default) is None, f"the default of {name} fails its own check"
    allowed = choices_of(name)
    if allowed is not None:
        assert default in allowed, f"the default of {name} is not among its choices"
        assert all(c in help_of(name) for c in allowed), "the help names the allowed values"
    hint = HINTS[name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    assert default is None and _optional(name) or isinstance(default, base), f"{name}'s default is not a {base}"


def test_the_defaults_validate():
    validate(Config())
    assert resolve({}) == Config()
    assert resolve(None) == Config()


def test_every_stage_is_used():
    assert {stage_of(n) for n in FIELDS} == set(STAGES)


def test_config_replace_keeps_the_rest():
    cfg = Config().replace(steps=3)
    assert cfg.steps == 3 and cfg.replace(steps=Config().steps) == Config()
    assert Config().steps != 3, "the replaced value must differ from the default for this test to mean anything"


def test_probe_parameters_are_checked() -> None:
    from selprune.experiment.config import resolve

    assert resolve({"probes": "unpruned, ff", "lm_eval_limit": None}).lm_eval_limit is None
    assert resolve({"probes": "unpruned,ga"}).probes == "unpruned,ga"  # a baseline's output too
    with pytest.raises(SelpruneError, match=r"probes='unpruned,fff' .*unpruned or runs"):
        resolve({"probes": "unpruned,fff"})
    with pytest.raises(SelpruneError, match="lm_eval_limit=0 is below 1"):
        resolve({"lm_eval_limit": 0})
