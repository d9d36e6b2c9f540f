"""Parameters on the command line: a YAML file (`-f`) and `-p NAME VALUE` pairs, the same
for every `selprune` command that takes parameters (`run`, `prune`)."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

import yaml

from selprune.errors import SelpruneError


def add_param_options(parser: argparse.ArgumentParser) -> None:
    """`-f FILE` and repeatable `-p NAME VALUE`, read back by `read_params`."""
    parser.add_argument("-f", "--file", type=Path, help="YAML file: a mapping of parameter names to values")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set one parameter (repeatable); overrides the file")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a mapping giving one key twice is an error (PyYAML
    would keep the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                break  # SafeLoader's own construct_mapping names that error
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.key = key


def read_params(file: Path | None, pairs: list[list[str]]) -> dict[str, Any]:
    """The YAML file's mapping, overridden by the `-p NAME VALUE` pairs, whose values are
    read as YAML too ("0.01" -> float, "abs" -> str, "null" -> None). Names and types are
    the caller's to check: each command has its own parameters."""
    params: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.load(file.read_text(), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as e:
            raise SelpruneError(f"parameter file {file} gives {e.key} twice; keep one of them") from None
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


def coerce_value(name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` (`float`, `int`, `bool`, `str`, or one of them `| None`).

    One rule for every command and notebook parameter: YAML and `-p` give ints where a
    float is meant (`steps: 10` is fine, `lr: 1e-4` is text in YAML 1.1), so a float
    accepts ints and numeric text; nothing else is converted silently."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    if value is None and optional:
        return None
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and not isinstance(value, bool):
        try:
            return float(value)  # int, float, or text such as "1e-3"
        except (TypeError, ValueError):
            pass
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    want = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, str(base))
    raise SelpruneError(f"parameter {name} must be {want}{' or null' if optional else ''}, not {value!r}")
