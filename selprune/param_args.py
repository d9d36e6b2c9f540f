"""Parameters on the command line: a YAML file (`-f`) and `-p NAME VALUE` pairs, the same
for every `selprune` command that takes parameters (`run`, `prune`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from selprune.errors import SelpruneError


def add_param_options(parser: argparse.ArgumentParser) -> None:
    """`-f FILE` and repeatable `-p NAME VALUE`, read back by `read_params`."""
    parser.add_argument("-f", "--file", type=Path, help="YAML file: a mapping of parameter names to values")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set one parameter (repeatable); overrides the file")


def read_params(file: Path | None, pairs: list[list[str]]) -> dict[str, Any]:
    """The YAML file's mapping, overridden by the `-p NAME VALUE` pairs, whose values are
    read as YAML too ("0.01" -> float, "abs" -> str, "null" -> None). Names and types are
    the caller's to check: each command has its own parameters."""
    params: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SelpruneError(f"cannot read parameter file {file}: {e}") from e
        if not isinstance(loaded, dict):
            raise SelpruneError(f"{file} must hold a mapping of parameter names to values")
        params.update(loaded)
    for name, value in pairs:
        try:
            params[name] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SelpruneError(f"cannot read the value of -p {name} {value!r} ({e}); "
                                "give a YAML value (quote strings with special characters)") from e
    return params
