"""Parameters from `-f FILE` and `-p NAME VALUE`, shared by `selprune run` and `selprune prune`."""

import pytest

from selprune.errors import SelpruneError
from selprune.param_args import read_params


def test_pairs_override_the_file_and_read_as_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("steps: 3\nscoring: rms\n")
    params = read_params(f, [["steps", "5"], ["ff_frac", "0.01"], ["heads", "null"]])
    assert params == {"steps": 5, "scoring": "rms", "ff_frac": 0.01, "heads": None}
    assert read_params(None, []) == {}


def test_bad_files_and_values_are_named(tmp_path):
    with pytest.raises(SelpruneError, match="cannot read parameter file"):
        read_params(tmp_path / "missing.yaml", [])
    listed = tmp_path / "list.yaml"
    listed.write_text("- steps\n")
    with pytest.raises(SelpruneError, match="must hold a mapping of parameter names"):
        read_params(listed, [])
    with pytest.raises(SelpruneError, match="(?s)-p scoring.*quote strings"):
        read_params(None, [["scoring", "[unclosed"]])
