"""The leaderboard over seeds (selprune/experiment/seed_summary.py), on hand-made rows."""

from __future__ import annotations

import csv
import io

import pytest

from selprune.experiment.seed_summary import (
    best_per_run,
    mean_sd,
    seed_summary,
    summary_csv,
    summary_markdown,
    variant_of,
    write_summary,
)


def _row(point: str, run: str, at10: float | None, status: str = "done", **kw) -> dict:
    return {"point": point, "run": run, "floor": run == "random", "status": status, "forget_drop_at_05": 0.1,
            "forget_drop_at_10": at10, "forget_drop_at_20": None, "forward_equiv_tokens": 100.0, "seconds": 2.0, **kw}


def test_variant_names_drop_only_the_seed():
    assert variant_of("ga-1e-4__seed-12") == "ga-1e-4"
    assert variant_of("paper__ff_frac-0.01__seed-2") == "paper__ff_frac-0.01"
    assert variant_of("seedling") == "seedling" and variant_of("a__seed-x") == "a__seed-x"


def test_seeds_are_averaged_per_variant_and_run_with_how_many_reached():
    rows = [_row("ga__seed-0", "ga", 0.5), _row("ga__seed-1", "ga", 0.7), _row("ga__seed-2", "ga", None),
            _row("p__seed-0", "ff", 0.6, seconds=4.0), _row("p__seed-1", "ff", 0.8, seconds=6.0),
            _row("p__seed-0", "random", 0.0), _row("p__seed-2", "ff", 0.9, status="failed")]
    s = {(r["variant"], r["run"]): r for r in seed_summary(rows)}
    ga, ff = s[("ga", "ga")], s[("p", "ff")]
    assert ga["seeds"] == 3 and ga["forget_drop_at_10_reached"] == 2 and ga["forget_drop_at_10"] == pytest.approx(0.6)
    assert ga["forget_drop_at_10_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert ff["seeds"] == 2, "a failed point is not averaged"
    assert (ff["forget_drop_at_10"], ff["seconds"]) == (pytest.approx(0.7), pytest.approx(5.0))
    assert s[("p", "random")]["forget_drop_at_10_sd"] is None, "one seed has no spread"
    assert s[("p", "ff")]["forget_drop_at_20"] is None and s[("p", "ff")]["forget_drop_at_20_reached"] == 0
    # every seed reached first (ff 0.7, then the floor 0.0), then ga (1 of 3 seeds short) despite its 0.6
    assert [(r["variant"], r["run"]) for r in seed_summary(rows)] == [("p", "ff"), ("p", "random"), ("ga", "ga")]
    assert mean_sd(ga, "forget_drop_at_10") == "0.60 ± 0.14 (2/3)"
    assert mean_sd(ff, "forget_drop_at_20") == "- (0/2)" and mean_sd(ff, "seconds", 0) == "5 ± 1"


def test_best_per_run_reads_the_variants_with_enough_seeds():
    rows = [_row("ga-lucky__seed-0", "ga", 0.9), *(_row(f"ga-best__seed-{i}", "ga", 0.5 + i / 10) for i in range(3)),
            _row("ga-worse__seed-0", "ga", 0.2)]
    summary = seed_summary(rows)
    assert [r["variant"] for r in best_per_run(summary)] == ["ga-lucky"], "ranked by mean headline"
    assert [r["variant"] for r in best_per_run(summary, min_seeds=3)] == ["ga-best"]


def test_the_summary_file_is_csv_with_empty_cells_for_missing_values(tmp_path):
    rows = [_row("a__seed-0", "ff", None), _row("a__seed-1", "ff", 0.4)]
    path = write_summary(rows, tmp_path)
    assert path == tmp_path / "summary.csv"
    [parsed] = list(csv.DictReader(io.StringIO(path.read_text())))
    assert parsed["variant"] == "a" and parsed["seeds"] == "2" and parsed["forget_drop_at_10_sd"] == ""
    assert float(parsed["forget_drop_at_10"]) == pytest.approx(0.4) and parsed["forget_drop_at_10_reached"] == "1"
    assert summary_csv([]).strip() == "variant,run,seeds", "no rows: a header, still a CSV"


def test_the_markdown_table_has_one_line_per_variant_and_marks_the_floor():
    rows = [_row("p__seed-0", "ff", 0.5), _row("p__seed-1", "ff", 0.7), _row("p__seed-0", "random", 0.1)]
    lines = summary_markdown(seed_summary(rows)).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| variant | run | seeds | @5% | @10% |")
    assert lines[1].count("|---") == lines[0].count("|") - 1
    assert lines[2].startswith("| p | ff | 2 | 0.10 ± 0.00 (2/2) | 0.60 ± 0.14 (2/2) | - (0/2) |")
    assert "| p | random (floor) | 1 |" in lines[3] and "| 100 |" in lines[3], "token counts without decimals"


def test_selprune_sweep_prints_the_summary_only_when_a_variant_has_seeds(tmp_path, monkeypatch, capsys):
    from selprune.experiment import cli, sweep

    f = tmp_path / "s.yaml"
    f.write_text("base: {runs: ff}\nseeds: [0, 1]\n")
    for rows, shown in (([_row("base__seed-0", "ff", 0.5), _row("base__seed-1", "ff", 0.7)], True),
                        ([_row("base", "ff", 0.5)], False)):
        monkeypatch.setattr(sweep, "run_sweep", lambda sw, rows=rows, **kw: rows)
        assert cli.main(["sweep", "-f", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 0
        out = capsys.readouterr().out
        assert ("over seeds" in out and "| base | ff | 2 | 0.10 ± 0.00 (2/2) | 0.60 ± 0.14 (2/2)" in out) == shown
        assert "summary.csv" in out
