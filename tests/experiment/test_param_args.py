"""Parameters from `-f FILE` and `-p NAME VALUE`, shared by `selprune run` and `selprune prune`
(selprune/experiment/param_args.py), and the one rule that coerces their values."""

import re

import pytest

from selprune.errors import SelpruneError
from selprune.experiment.param_args import coerce_value, read_params


def test_pairs_override_the_file_and_read_as_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("steps: 3\nimportance: rms\n")
    params = read_params(f, [["steps", "5"], ["ff_frac", "0.01"], ["heads", "null"]])
    assert params == {"steps": 5, "importance": "rms", "ff_frac": 0.01, "heads": None}
    assert read_params(None, []) == {}


def test_bad_files_and_values_are_named(tmp_path):
    with pytest.raises(SelpruneError, match="cannot read parameter file"):
        read_params(tmp_path / "missing.yaml", [])
    listed = tmp_path / "list.yaml"
    listed.write_text("- steps\n")
    with pytest.raises(SelpruneError, match="must hold a mapping of parameter names"):
        read_params(listed, [])
    with pytest.raises(SelpruneError, match="(?s)-p importance.*quote strings"):
        read_params(None, [["importance", "[unclosed"]])


def test_a_file_giving_one_key_twice_is_refused_naming_the_key_and_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("steps: 3\nff_frac: 0.01\nsteps: 4\n")
    with pytest.raises(SelpruneError, match=rf"parameter file {re.escape(str(f))} gives steps twice; keep one of them"):
        read_params(f, [])
    f.write_text("steps: 3\nnested: {a: 1, b: 2}\nother: {a: 3}\n")  # the same key in two mappings is fine
    assert read_params(f, []) == {"steps": 3, "nested": {"a": 1, "b": 2}, "other": {"a": 3}}


def test_a_pair_overriding_a_file_key_is_no_duplicate(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("steps: 3\n")
    assert read_params(f, [["steps", "4"], ["steps", "5"]]) == {"steps": 5}


@pytest.mark.parametrize("value, hint, want", [
    (1, float, 1.0), ("1e-5", float, 1e-5), (None, float | None, None), (3, int, 3), (True, bool, True),
    (5, str, "5"), ("abs", str, "abs"), (0.5, float | None, 0.5),
])
def test_coerce_value_converts_what_yaml_gives_for_the_type(value, hint, want):
    got = coerce_value("x", value, hint)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value, hint, message", [
    ("five", int, "parameter steps must be an integer, not 'five'"),
    (None, int, "parameter steps must be an integer, not None"),
    (True, int, "parameter steps must be an integer, not True"),
    (2.5, int, "parameter steps must be an integer, not 2.5"),
    (True, float, "parameter steps must be a number, not True"),
    ("x", float | None, "parameter steps must be a number or null, not 'x'"),
    ("yes", bool, "parameter steps must be true or false, not 'yes'"),
])
def test_coerce_value_refuses_other_types_naming_what_it_wants(value, hint, message):
    with pytest.raises(SelpruneError, match=re.escape(message)):
        coerce_value("steps", value, hint)
