"""What the schema writes (selprune/experiment/render.py): every stored notebook's
parameters cell and the README's parameter table must be what the schema gives, defaults
included (`make notebooks` writes them), and `--help`'s parameter list."""

from __future__ import annotations

import shutil

import nbformat
import pytest

from selprune.errors import SelpruneError
from selprune.experiment import render
from selprune.experiment.config import DEFAULTS, FIELDS, help_of
from selprune.experiment.notebooks import NOTEBOOK_DIR, NOTEBOOKS, STORED_RUN_PARAM
from selprune.paths import REPO_ROOT

README = REPO_ROOT / "README.md"


# ---------------------------------------------------------------- parameters cell
def test_the_stored_notebooks_run_dir_is_the_one_they_write():
    assert STORED_RUN_PARAM == "../runs/notebooks"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_parameters_cell_is_the_schemas(name):
    stored = render.stored_parameters_cell(NOTEBOOK_DIR / name)
    assert stored == render.parameters_cell(STORED_RUN_PARAM), f"{name}: its parameters cell differs from the " \
        "schema's (selprune/experiment/config.py); run `make notebooks` to write it"


def test_parameters_cell_defines_every_parameter_at_its_default():
    namespace: dict = {}
    exec(render.parameters_cell("elsewhere"), namespace)  # noqa: S102 - our own generated source
    assert {k: namespace[k] for k in FIELDS} == {**DEFAULTS, "run_dir": "elsewhere"}
    assert set(namespace) - {"__builtins__"} == set(FIELDS), "the cell defines nothing else"
    exec(render.parameters_cell(), namespace)  # noqa: S102
    assert namespace["run_dir"] == DEFAULTS["run_dir"]


def test_papermill_reads_every_parameter_of_the_cell():
    """papermill parses the cell to check the parameters it is given: a line it cannot
    parse (an '=' in a help text did that) makes it warn "unknown parameter" on every run."""
    from papermill.translators import PythonTranslator

    parsed = PythonTranslator.inspect({"source": render.parameters_cell()})
    assert [p.name for p in parsed] == list(FIELDS)
    assert [p.help for p in parsed] == [help_of(name) for name in FIELDS]


def test_parameters_cell_explains_each_parameter():
    lines = render.parameters_cell().splitlines()[1:]
    assert [line.split(" = ")[0] for line in lines] == list(FIELDS)
    for name, line in zip(FIELDS, lines, strict=True):
        assert line.endswith(f"  # {help_of(name)}"), line


def test_write_parameter_cells_rewrites_only_cells_that_differ(tmp_path):
    for name in NOTEBOOKS[:2]:
        shutil.copy(NOTEBOOK_DIR / name, tmp_path / name)
    stale = tmp_path / NOTEBOOKS[0]
    nb = nbformat.read(stale, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "steps = 99"
    nbformat.write(nb, stale)
    untouched = (tmp_path / NOTEBOOKS[1]).read_bytes()
    render.write_parameter_cells(tmp_path, STORED_RUN_PARAM)
    assert render.stored_parameters_cell(stale) == render.parameters_cell(STORED_RUN_PARAM)
    assert (tmp_path / NOTEBOOKS[1]).read_bytes() == untouched, "a notebook whose cell is right is left alone"


def test_a_notebook_without_one_parameters_cell_is_named(tmp_path):
    path = tmp_path / "x.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), path)
    with pytest.raises(SelpruneError, match=r"x.ipynb has 0 cells tagged 'parameters'; it needs exactly one"):
        render.stored_parameters_cell(path)


# ---------------------------------------------------------------- README table
def test_readme_table_is_the_schemas():
    text = README.read_text()
    assert text == render.readme_with_table(text), ("README.md's parameter table differs from the schema "
                                                    "(selprune/experiment/config.py); run `make notebooks` to write it")
    table = text.split(render.README_BEGIN, 1)[1].split(render.README_END, 1)[0]
    assert table.strip() == render.readme_table()


def test_readme_table_has_a_row_per_parameter_with_its_default():
    rows = [r for r in render.readme_table().splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(FIELDS)
    for name, row in zip(FIELDS, rows, strict=True):
        assert f"| `{DEFAULTS[name]!r}` |" in row, row


def test_readme_documents_the_two_commands():
    readme = README.read_text()
    assert "make run" in readme and "make test" in readme


def test_readme_with_table_refuses_a_readme_without_markers():
    with pytest.raises(SelpruneError, match=r"README.md lacks the markers .*parameters.*put them back"):
        render.readme_with_table("# a README\n\nno table here\n")
    with pytest.raises(SelpruneError, match="lacks the markers"):
        render.readme_with_table(f"# half\n{render.README_BEGIN}\n")


def test_readme_with_table_replaces_only_between_the_markers():
    text = f"head\n{render.README_BEGIN}\nold table\n{render.README_END}\ntail\n"
    out = render.readme_with_table(text)
    assert out.startswith(f"head\n{render.README_BEGIN}\n") and out.endswith(f"{render.README_END}\ntail\n")
    assert "old table" not in out and render.readme_table() in out
    assert render.readme_with_table(out) == out


# ------------------------------------------------------------------------ --help
def test_help_epilog_lists_names_with_help_and_default():
    text = render.help_epilog(["steps", "importance"])
    assert f"  steps                {help_of('steps')} (default: {DEFAULTS['steps']!r})" in text
    assert f"{help_of('importance')} (default: {DEFAULTS['importance']!r})" in text
    assert "ff_frac" not in text
