"""What the schema writes: each notebook's parameters cell, the README's parameter table,
and the parameter list of every command's `--help`.

`make notebooks` writes the cells and the table; tests fail when a stored notebook's
cell or the README's table differs from what the schema gives, defaults included.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import nbformat

from selprune.errors import SelpruneError
from selprune.experiment.config import DEFAULTS, FIELDS, PRESETS, STAGES, help_of, stage_of
from selprune.paths import atomic_write_bytes

CELL_HEADER = "# Parameters (papermill overrides these; one name per parameter, the same in every notebook and command)"
README_BEGIN = "<!-- parameters: written by `make notebooks` from selprune/experiment/config.py; do not edit -->"
README_END = "<!-- /parameters -->"


def parameters_cell(run_dir: str | None = None) -> str:
    """The source of a notebook's `parameters` cell: every parameter at its default
    (`run_dir` overridden where given), each with its help as a comment."""
    lines = [CELL_HEADER]
    for name in FIELDS:
        value = run_dir if name == "run_dir" and run_dir is not None else DEFAULTS[name]
        lines.append(f"{name} = {value!r}  # {help_of(name)}")
    return "\n".join(lines)


def _parameters_cell_of(nb: nbformat.NotebookNode, path: Path) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise SelpruneError(f"{path} has {len(cells)} cells tagged 'parameters'; it needs exactly one")
    return cells[0]


def stored_parameters_cell(path: Path) -> str:
    return _parameters_cell_of(nbformat.read(path, as_version=4), path).source


def write_parameter_cells(notebook_dir: Path, run_dir: str, names: Iterable[str] | None = None) -> None:
    """Rewrite the parameters cell of every notebook in `notebook_dir` (or `names`)."""
    for path in sorted(notebook_dir.glob("*.ipynb")) if names is None else [notebook_dir / n for n in names]:
        nb = nbformat.read(path, as_version=4)
        cell = _parameters_cell_of(nb, path)
        if cell.source != (want := parameters_cell(run_dir)):
            cell.source = want
            atomic_write_bytes(path, (nbformat.writes(nb) + "\n").encode())


def readme_table() -> str:
    """The README's parameter table (Markdown), in schema order."""
    rows = ["| name | default | stage | meaning |", "|---|---|---|---|"]
    for name in FIELDS:
        meaning = help_of(name).replace("|", "\\|")
        rows.append(f"| `{name}` | `{DEFAULTS[name]!r}` | {stage_of(name)} | {meaning} |")
    presets = "; ".join(f"`{k}`: " + ", ".join(f"{n} {v:g}" if isinstance(v, float) else f"{n} {v}"
                                              for n, v in p.items()) for k, p in PRESETS.items())
    return "\n".join(rows) + f"\n\nPresets (`--preset NAME`, under the file and `-p`): {presets}."


def readme_with_table(text: str) -> str:
    """`text` (the README) with the table between its markers replaced."""
    if README_BEGIN not in text or README_END not in text:
        raise SelpruneError(f"README.md lacks the markers {README_BEGIN!r} ... {README_END!r}; put them back")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{readme_table()}\n{README_END}{tail}"


def write_readme_table(readme: Path) -> None:
    text = readme.read_text()
    if (new := readme_with_table(text)) != text:
        atomic_write_bytes(readme, new.encode())


def help_epilog(names: Iterable[str]) -> str:
    """The parameter list of a command's `--help`, grouped by stage, with defaults."""
    names = list(names)
    out = ["parameters (-p NAME VALUE, or a YAML file -f; the same names in every command):"]
    for stage, what in STAGES.items():
        mine = [n for n in names if stage_of(n) == stage]
        if mine:
            out.append(f"\n {stage}: {what}")
            out += [f"  {n:<20} {help_of(n)} (default: {DEFAULTS[n]!r})" for n in mine]
    out.append("\npresets (--preset NAME): " + "; ".join(f"{k}: {p}" for k, p in PRESETS.items()))
    return "\n".join(out)
