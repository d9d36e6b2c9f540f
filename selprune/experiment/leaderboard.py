"""The selectivity leaderboard of a sweep: one row per pruning run, ranked.

**Headline.** The forget top-1 drop at matched retain damage: the relative drop of forget
top-1 accuracy where retain top-1 has dropped by 10% (relative), interpolated along a
run's curve (`selectivity.summarize`); also read at 5% and 20%. Higher is more selective. A
run that never reaches 10% retain damage has no headline: it is listed after the ranked
runs, flagged "not reached" with how far retain did fall and what forget lost by then,
never ranked as if its number were 0 or 1. Random pruning (the `random` run) is the
floor every selective run should beat; its rows are ranked too and marked `floor`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from selprune.errors import SelpruneError
from selprune.experiment.rundir import read_json
from selprune.experiment.runs import FLOOR, RUN_KINDS
from selprune.experiment.sweepfile import Sweep, run_finished
from selprune.paths import atomic_write_bytes
from selprune.selectivity import summarize

HEADLINE = "forget_drop_at_10"  # the column the leaderboard is ranked by
DROPS = {"forget_drop_at_05": "0.05", "forget_drop_at_10": "0.10", "forget_drop_at_20": "0.20"}


def run_row(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The leaderboard numbers of one pruning run, from its step records."""
    s = summarize(records)
    base, last = records[0], records[-1]
    row: dict[str, Any] = {k: s["forget_drop_at_retain_drop"][d] for k, d in DROPS.items()}
    row.update(
        reached=row[HEADLINE] is not None,
        selectivity_area=s["selectivity_area"],
        retain_drop_max=s["retain_drop_max"],
        forget_drop_final=s["final_drop"]["forget"],
        retain_drop_final=s["final_drop"]["retain"],
        forget_top1_base=base["forget"]["top1"],
        retain_top1_base=base["retain"]["top1"],
        forget_top1_final=last["forget"]["top1"],
        retain_top1_final=last["retain"]["top1"],
        steps=len(records) - 1,
        ff_fraction=last["fraction"]["ff"],
        attn_fraction=last["fraction"]["attn"],
        seconds=sum(sum(r.get("seconds", {}).values()) for r in records),
        **compute_row(records),
    )
    if not row["reached"]:
        row["note"] = (f"not reached: retain top-1 fell at most {row['retain_drop_max']:.1%}; "
                       f"forget top-1 fell {row['forget_drop_final']:.1%} by the end")
    return row


def compute_row(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's compute columns (docs/method.md, "Compute accounting"): its cumulative
    token counts at the last record and the largest peak memory of any record (None
    where the records predate compute accounting or the memory could not be read)."""
    last = records[-1].get("compute") or {}
    peaks = [p for r in records if (p := (r.get("compute") or {}).get("peak_memory_mb")) is not None]
    return {"forward_tokens": last.get("forward_tokens"), "backward_tokens": last.get("backward_tokens"),
            "forward_equiv_tokens": last.get("forward_equiv_tokens"), "peak_memory_mb": max(peaks, default=None)}


def relearn_columns(arm: dict[str, Any], control_holds: bool | None = None) -> dict[str, Any]:
    """The relearning columns of one relearned model (an arm of the relearning protocol,
    or a run's own `relearn` record: the same index shape): steps to 50% / 90% recovery
    or the censored bound, the fraction recovered by the end, the best forget top-1
    reached while relearning, and whether the unpruned control held (None: no control)."""
    index = arm["index"]
    row = {f"relearn_{float(q) * 100:.0f}": v["text"] for q, v in index.items()}
    row.update({f"relearn_{float(q) * 100:.0f}_steps": v["step"] for q, v in index.items()})
    row.update(relearn_recovered_final=next(iter(index.values()))["recovered_final"],
               relearn_best_forget_top1=arm["worst_case"]["max_forget_top1"], relearn_control_holds=control_holds)
    return row


def relearn_row(result: dict[str, Any] | None, run: str) -> dict[str, Any]:
    """The relearning columns of one pruning run's row (sweep files with `relearn`): the
    arm it was relearned as (the series' selective run, or the floor as the random arm).
    Empty for runs no arm used."""
    arm = None if result is None else {result["selective_run"]: "selective", FLOOR: "random"}.get(run)
    if arm is None or arm not in result["arms"]:
        return {}
    return relearn_columns(result["arms"][arm], (result.get("control") or {}).get("holds"))


def probe_row(probes: dict[str, Any] | None) -> dict[str, Any]:
    """The probe columns of a run's row, where notebook 05 probed it (`probes`): the
    code probe's parse fraction, the membership AUCs and the lm-eval accuracies."""
    if not probes:
        return {}
    row = {"code_parses": probes["code_probe"]["fraction"]}
    row.update({f"mia_auc_{k.replace('+', 'p')}": v for k, v in probes["membership"]["auc"].items()})
    for task, m in (probes.get("lm_eval") or {}).get("tasks", {}).items():
        row[f"lm_eval_{task.removeprefix('selprune_')}_acc"] = m.get("acc")
    return row


def leaderboard(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per pruning run of every point, ranked (see `rank`)."""
    rows = []
    for pt in sweep.points:
        error = sweep.failed.get(pt.name)
        try:
            results = pt.results()
        except SelpruneError as e:  # a corrupt results.json: that point's rows say so, the others stand
            results, error = None, error or " ".join(str(e).split())
        for run in pt.runs:
            row: dict[str, Any] = {"point": pt.name, "run": run, "floor": RUN_KINDS[run].random}
            row.update({k: pt.params[k] for k in sweep.varied})
            # the step records with their seconds (results.json keeps wall-clock times apart)
            f = pt.run_dir / run / "records.json"
            records = read_json(f) if results is not None and run in results["runs"] and f.exists() else []
            if records:
                row.update(run_row(records))
                done = run_finished(records, pt.cfg)
                row["status"] = "done" if done else ("failed" if error else "incomplete")
                if not done:
                    row["note"] = f"incomplete: {len(records) - 1} of {pt.params['steps']} steps"
            else:
                row["status"] = "failed" if error else "not run"
            if pt.relearn:
                row.update(relearn_row((results or {}).get("anamnesia"), run))
            own = (((results or {}).get("runs") or {}).get(run) or {}).get("relearn")
            if own and "relearn_50" not in row:  # a baseline relearned by notebook 07: its own record
                row.update(relearn_columns(own))
            row.update(probe_row(((results or {}).get("probes") or {}).get(run)))
            if error:
                row["error"] = error
            rows.append(row)
    return rank(rows)


COLUMNS_FIRST = ["rank", "point", "run", "floor", "status"]
COLUMNS_LAST = [*DROPS, "reached", "above_floor", "selectivity_area", "retain_drop_max", "forget_drop_final",
                "retain_drop_final", "forget_top1_base", "retain_top1_base", "forget_top1_final", "retain_top1_final",
                "steps", "ff_fraction", "attn_fraction", "forward_tokens", "backward_tokens", "forward_equiv_tokens",
                "peak_memory_mb", "seconds", "note", "error"]


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order the rows and number the ranked ones.

    Ranked (rank 1, 2, ...): finished runs with a headline, by headline descending (ties:
    selectivity area descending, then point and run name). Then, unranked and in sweep
    order, finished runs that never reached 10% retain damage, then unfinished and failed
    ones. `above_floor` is each headline minus the mean headline of the floor (random)
    runs, when the floor has one.
    """
    def has_headline(r: dict[str, Any]) -> bool:
        return r.get("status") == "done" and r.get(HEADLINE) is not None

    ranked = sorted((r for r in rows if has_headline(r)),
                    key=lambda r: (-r[HEADLINE], -(r.get("selectivity_area") or 0.0), r["point"], r["run"]))
    not_reached = [r for r in rows if r.get("status") == "done" and not has_headline(r)]
    rest = [r for r in rows if r.get("status") != "done"]
    floor = [r[HEADLINE] for r in ranked if r.get("floor")]
    floor_mean = sum(floor) / len(floor) if floor else None
    out = []
    for i, r in enumerate(ranked, 1):
        out.append({**r, "rank": i, "above_floor": None if floor_mean is None else r[HEADLINE] - floor_mean})
    out += [{**r, "rank": None, "above_floor": None} for r in not_reached + rest]
    return out


def floor_headline(rows: list[dict[str, Any]]) -> float | None:
    """The mean headline of the ranked floor rows (None without one)."""
    floor = [r[HEADLINE] for r in rows if r.get("floor") and r.get("rank") is not None]
    return sum(floor) / len(floor) if floor else None


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    relearn = [k for k in dict.fromkeys(k for r in rows for k in r)  # relearning and probe columns
               if k.startswith(("relearn_", "code_parses", "mia_auc_", "lm_eval_"))]
    known = set(COLUMNS_FIRST) | set(COLUMNS_LAST) | set(relearn)
    varied = list(dict.fromkeys(k for r in rows for k in r if k not in known))
    return COLUMNS_FIRST + varied + COLUMNS_LAST[:-2] + relearn + COLUMNS_LAST[-2:]  # relearning, probes before note, error


def leaderboard_csv(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as CSV text (empty cells for missing numbers: None is not 0)."""
    return rows_csv(rows, _columns(rows))


def rows_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV text under `columns`: an empty cell for None or NaN (a missing number is not 0)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in r.items()})
    return buf.getvalue()


def row_label(row: dict[str, Any]) -> str:
    """A pruning run's label in the figures and the printed table: "point / run"."""
    return f"{row['point']} / {row['run']}"


def frontier_curves(sweep: Sweep, rows: list[dict[str, Any]], top: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Step records of the `top` best-ranked selective runs, of the run with the largest
    selectivity area of every other run kind (not its best-ranked: a method too gentle
    ever to cost 10% of retain has no rank and may be the most selective, and one 10%
    crossing in an early blip ranks a curve that is poor elsewhere), and of the
    best-ranked floor run, keyed by their leaderboard label ("point / run"), in that order."""
    dirs = {pt.name: pt.run_dir for pt in sweep.points}
    ranked = [r for r in rows if r.get("rank") is not None]
    chosen = [r for r in ranked if not r["floor"]][:top]
    done = [r for r in rows if r.get("status") == "done" and not r["floor"]]
    for r in sorted(done, key=lambda r: -(r.get("selectivity_area") or 0.0)):
        if r["run"] not in {c["run"] for c in chosen}:
            chosen.append(r)
    chosen += [r for r in ranked if r["floor"]][:1]
    return {row_label(r): read_json(dirs[r["point"]] / r["run"] / "records.json") for r in chosen}


def write_leaderboard(rows: list[dict[str, Any]], out: str | Path,
                      curves: dict[str, list[dict[str, Any]]] | None = None) -> tuple[Path, Path]:
    """Write `out/leaderboard.csv` and `out/figures/leaderboard.png`, each atomically, and
    with `curves` (see `frontier_curves`) `out/figures/frontier.png`."""
    import matplotlib.pyplot as plt

    from selprune.experiment.figures import plot_frontier, plot_leaderboard
    from selprune.plots import save_figure

    out = Path(out)
    csv_path = out / "leaderboard.csv"
    atomic_write_bytes(csv_path, leaderboard_csv(rows).encode())
    fig = plot_leaderboard(rows)
    try:
        png = save_figure(fig, out, "leaderboard")
    finally:
        plt.close(fig)
    if curves:
        floor = {row_label(r) for r in rows if r.get("floor")}
        fig = plot_frontier(curves, floor)
        try:
            save_figure(fig, out, "frontier")
        finally:
            plt.close(fig)
    return csv_path, png


def format_top(rows: list[dict[str, Any]], n: int = 10) -> str:
    """The first `n` rows as a plain-text table for the terminal."""
    def pct(v: Any) -> str:
        return "" if v is None else f"{v:.1%}"

    lines = [f"{'rank':>4}  {'point / run':<40} {'@5%':>7} {'@10%':>7} {'@20%':>7} {'area':>6}  note"]
    for r in rows[:n]:
        label = row_label(r) + (" (floor)" if r.get("floor") else "")
        note = r.get("note") or r.get("error") or ""
        if r.get("status") != "done":
            note = f"{r.get('status')}: {note}"
        area = "" if r.get("selectivity_area") is None else f"{r['selectivity_area']:.2f}"
        lines.append(f"{r['rank'] if r.get('rank') is not None else '-':>4}  {label:<40} "
                     f"{pct(r.get('forget_drop_at_05')):>7} {pct(r.get(HEADLINE)):>7} "
                     f"{pct(r.get('forget_drop_at_20')):>7} {area:>6}  {note[:90]}")
    if len(rows) > n:
        lines.append(f"      ... {len(rows) - n} more rows in the CSV")
    return "\n".join(lines)
