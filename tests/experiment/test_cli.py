"""The `selprune` command (selprune/experiment/cli.py): every command's parameters come
from the one schema, with the same names, defaults and help; errors a user can fix are
one line on stderr with exit status 2, before any kernel starts."""

from __future__ import annotations

import re

import pytest

from selprune.errors import SelpruneError
from selprune.experiment import cli, config, prune_command
from selprune.experiment.config import DEFAULTS, FIELDS, PRESETS, help_of, stage_of
from selprune.experiment.loop import RUN_STAGES

HELP_LINE = re.compile(r"^  (\w+) +(.*) \(default: (.*)\)$")


def help_params(capsys, command: str) -> dict[str, tuple[str, str]]:
    """Name -> (help, default) of every parameter that `selprune COMMAND --help` lists."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    return {m[1]: (m[2], m[3]) for line in out.splitlines() if (m := HELP_LINE.match(line))}


# ------------------------------------------------------------------- --help
def test_run_help_lists_every_parameter_with_its_help_and_default(capsys):
    listed = help_params(capsys, "run")
    assert list(listed) == [n for stage in config.STAGES for n in FIELDS if stage_of(n) == stage]
    for name, (text, default) in listed.items():
        assert text == help_of(name), name
        assert default == repr(DEFAULTS[name]), f"{name}: --help says {default}, the schema {DEFAULTS[name]!r}"


def test_prune_help_lists_the_run_parameters_with_the_same_help_and_defaults(capsys):
    run, prune = help_params(capsys, "run"), help_params(capsys, "prune")
    assert set(prune) == {n for n in FIELDS if stage_of(n) in RUN_STAGES}
    assert {n: run[n] for n in prune} == prune, "selprune prune and selprune run disagree on a parameter"


def test_sweep_help_lists_its_parameters_with_the_same_help_and_defaults(capsys):
    run, sweep = help_params(capsys, "run"), help_params(capsys, "sweep")
    assert sweep and {n: run[n] for n in sweep} == sweep


# ------------------------------------------------------------------- presets
@pytest.fixture
def resolved(monkeypatch):
    """Every (given, preset, Config) that `resolve` is called with, in the cli and in prune_command."""
    calls = []
    real = config.resolve

    def spy(given=None, preset=None, **kw):
        cfg = real(given, preset, **kw)
        calls.append((dict(given or {}), preset, cfg))
        return cfg

    monkeypatch.setattr(config, "resolve", spy)
    monkeypatch.setattr(prune_command, "resolve", spy)
    return calls


def test_run_preset_paper_reaches_resolve(tmp_path, monkeypatch, resolved, capsys):
    from selprune.experiment import notebooks

    got = []

    def stop(params, progress=True):
        got.append(params)
        raise SelpruneError("stopped before any kernel")

    monkeypatch.setattr(notebooks, "run_series", stop)
    assert cli.main(["run", "--quiet", "--preset", "paper", "--out", str(tmp_path / "r"), "-p", "eval_tokens", "2048"]) == 2
    assert "stopped before any kernel" in capsys.readouterr().err
    assert [preset for _, preset, _ in resolved] == ["paper"]
    cfg = resolved[0][2]
    assert cfg.collect_tokens == PRESETS["paper"]["collect_tokens"] and cfg.steps == PRESETS["paper"]["steps"]
    assert cfg.eval_tokens == 2048, "-p overrides the preset"
    assert got[0]["steps"] == PRESETS["paper"]["steps"], "the series runs with the preset's values"


def test_prune_preset_paper_reaches_resolve(tmp_path, monkeypatch, resolved, capsys):
    import selprune.models

    def stop(*a, **k):
        raise SelpruneError("stopped before loading the model")

    monkeypatch.setattr(selprune.models, "load_model", stop)
    assert cli.main(["prune", "--quiet", "--preset", "paper", "--out", str(tmp_path / "p"), "-p", "steps", "3"]) == 2
    assert "stopped before loading the model" in capsys.readouterr().err
    assert [preset for _, preset, _ in resolved] == ["paper"]
    cfg = resolved[0][2]
    assert cfg.collect_tokens == PRESETS["paper"]["collect_tokens"] and cfg.steps == 3


def test_unknown_preset_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--preset", "huge"])
    assert exit_.value.code == 2 and "paper" in capsys.readouterr().err


# ------------------------------------------------------------- one-line errors
@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if papermill is asked to run a notebook."""
    import papermill

    def started(*a, **k):
        raise AssertionError("a kernel was started for parameters that should have been refused")

    monkeypatch.setattr(papermill, "execute_notebook", started)


@pytest.mark.parametrize("param, match", [
    (("steps", "0"), r"steps=0 is below 1.*use 1 or more"),
    (("stepz", "3"), r"unknown parameters \['stepz'\].*did you mean steps.*valid ones: model, "),
    (("model", "./no/such/model"), r"unknown model './no/such/model'.*check the spelling"),
    (("forget", "missing.jsonl"), r"unknown dataset 'missing.jsonl'.*check the path"),
    (("importance", "l3"), r"importance='l3' is not one of abs, freq, rand, rms, sqrt, std; pick one"),
    (("scoring", "l3"), r"importance='l3' is not one of abs, freq, rand, rms, sqrt, std; pick one"),  # the old name
    (("dtype", "int4"), r"dtype='int4' is not one of auto, float32, bfloat16, float16"),
    (("device", "tpu"), r"unknown device 'tpu'; use auto, cpu, cuda"),
    (("ff_frac", "[0.1"), r"cannot read the value of -p ff_frac.*give a YAML value"),
])
def test_cli_prints_one_line_and_exits_2_before_any_kernel(tmp_path, shared_tiny_llama_dir, capsys, monkeypatch,
                                                           no_kernel, param, match):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--quiet", "--out", str(tmp_path / "run"), "-p", "model", str(shared_tiny_llama_dir), "-p", *param]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    notes = [line for line in err.strip().splitlines() if line.startswith("selprune: note: ")]
    assert len(notes) == (param[0] in config.ALIASES), err  # only an old name gets a note
    lines = [line for line in err.strip().splitlines() if line not in notes]
    assert len(lines) == 1 and lines[0].startswith("selprune: error: "), err
    assert "Traceback" not in err and out == ""
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "run" / "params.json").exists(), "a refused run must not record its parameters"
