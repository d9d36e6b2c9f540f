"""A sweep's leaderboard over seeds: one row per variant and run, mean ± sd.

One seed's headline says little (at the default budgets the same recipe moves by 0.1
between seeds), so a sweep with `seeds:` is read per *variant*: the points that differ
only in their seed. Each headline is averaged over the seeds that reached its retain
drop, and the count that did is kept beside it ("2/3"): a seed that never lost that much
retain has no value there, which is not the same as a value of 0 (it may have forgotten
without the damage; the final drops say). The leaderboard's `rank` ranks single runs;
this ranks variants: every seed reached the headline first, by mean headline, then
the others.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from selprune.experiment.leaderboard import DROPS, HEADLINE, rows_csv
from selprune.paths import atomic_write_bytes

SUMMARY_FILE = "summary.csv"  # beside the sweep's leaderboard.csv
SEED_SUFFIX = re.compile(r"__seed-\d+$")  # how sweepfile names a point's seed
AVERAGED = (*DROPS, "selectivity_area", "forget_drop_final", "retain_drop_final", "forward_equiv_tokens",
            "backward_tokens", "peak_memory_mb", "seconds", "relearn_recovered_final")


def variant_of(point: str) -> str:
    """A point's name without its seed: `ga-1e-4__seed-2` -> `ga-1e-4`."""
    return SEED_SUFFIX.sub("", point)


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished leaderboard rows grouped by (variant, run): `seeds` (how many), each of
    `AVERAGED` as its mean and `<name>_sd` (sample sd; None for one seed), and for each
    headline `<name>_reached` (how many seeds have a value). Ranked as the module says."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "done":
            groups.setdefault((variant_of(r["point"]), r["run"]), []).append(r)
    out = []
    for (variant, run), rs in groups.items():
        row: dict[str, Any] = {"variant": variant, "run": run, "floor": bool(rs[0].get("floor")), "seeds": len(rs)}
        for key in AVERAGED:
            values = [float(r[key]) for r in rs if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            if key in DROPS:
                row[f"{key}_reached"] = len(values)
        out.append(row)

    def order(r: dict[str, Any]) -> tuple:
        every = r[f"{HEADLINE}_reached"] == r["seeds"]
        return (not every, r[HEADLINE] is None, -(r[HEADLINE] or 0.0), r["variant"], r["run"])

    return sorted(out, key=order)


def mean_sd(row: dict[str, Any], key: str, digits: int = 2) -> str:
    """`0.71 ± 0.05`, with `(k/n)` for a headline; `-` where no seed has a value."""
    if row.get(key) is None:
        text = "-"
    else:
        sd = row.get(f"{key}_sd")
        text = f"{row[key]:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")
    if key in DROPS:
        text += f" ({row[f'{key}_reached']}/{row['seeds']})"
    return text


def best_per_run(summary: list[dict[str, Any]], min_seeds: int = 1) -> list[dict[str, Any]]:
    """Each run kind's best-ranked variant among those with at least `min_seeds` seeds
    (a tuning grid on one seed and its winners repeated on every seed: `min_seeds=3`
    reads the winners)."""
    best: dict[str, dict[str, Any]] = {}
    for r in summary:
        if r["seeds"] >= min_seeds:
            best.setdefault(r["run"], r)
    return list(best.values())


def summary_csv(summary: list[dict[str, Any]]) -> str:
    """The summary as CSV text (empty cells where no seed has a value)."""
    return rows_csv(summary, list(dict.fromkeys(k for r in summary for k in r)) or ["variant", "run", "seeds"])


def write_summary(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Write `out/summary.csv` (atomically): `seed_summary` of a sweep's leaderboard rows."""
    path = Path(out) / SUMMARY_FILE
    atomic_write_bytes(path, summary_csv(seed_summary(rows)).encode())
    return path


SHOWN = {"forget_drop_at_05": "@5%", "forget_drop_at_10": "@10%", "forget_drop_at_20": "@20%",
         "forget_drop_final": "forget drop (end)", "retain_drop_final": "retain drop (end)",
         "forward_equiv_tokens": "fwd-equiv tokens", "seconds": "seconds", "relearn_recovered_final": "relearned"}


def summary_markdown(summary: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (README, a notebook's output): forget drops at 5,
    10 and 20% retain drop with how many seeds reached each, the final drops, compute,
    wall seconds and the fraction a baseline's own relearning brought back."""
    lines = ["| variant | run | seeds | " + " | ".join(SHOWN.values()) + " |", "|---" * (3 + len(SHOWN)) + "|"]
    for r in summary:
        cells = [mean_sd(r, k, 0 if k in ("forward_equiv_tokens", "seconds") else 2) for k in SHOWN]
        lines.append(f"| {r['variant']} | {r['run']}{' (floor)' if r['floor'] else ''} | {r['seeds']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
