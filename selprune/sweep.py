"""Sweeps over series parameters and the selectivity leaderboard (`selprune sweep`).

Which recipe unlearns most selectively is an empirical question: importance function,
step size, schedule, ablation, neuron kind and selection all matter, and one run says
little. A sweep runs the pruning notebooks once per *point* (a set of series
parameters) into its own run directory and ranks every pruning run by one number.

The sweep file (YAML)::

    out: runs/sweeps/default     # optional; `--out` overrides it
    base:                        # series parameters shared by every point
      ff_frac: 0.02
      max_retain_drop: 0.25
    variants:                    # optional; one point each, overriding some of base
      - name: paper              # optional; else made from the overrides
        runs: ff,random
      - {name: scoring-rms, scoring: rms}
    grid:                        # optional; every combination, applied to each variant
      ff_frac: [0.01, 0.02]
    seeds: [0, 1, 2]             # optional; every point repeated with each seed
    keep_models: false           # optional; keep each point's pruned-model/ (~0.5 GB each)

Variants suit one-factor-at-a-time designs (the paper's recipe, changed in one respect
at a time); `grid` gives full products. Points are variants x grid combinations x seeds,
named from their variant name, grid values and seed (`scoring-rms`,
`paper__ff_frac-0.01__seed-2`), so a name is stable across reruns and readable as a
folder under `out`.

**Headline.** The forget top-1 drop at matched retain damage: the relative drop of forget
top-1 accuracy where retain top-1 has dropped by 10% (relative), interpolated along a
run's curve (`series.summarize`); also read at 5% and 20%. Higher is more selective. A
run that never reaches 10% retain damage has no headline: it is listed after the ranked
runs, flagged "not reached" with how far retain did fall and what forget lost by then,
never ranked as if its number were 0 or 1. Random pruning (the `random` run) is the
floor every selective run should beat; its rows are ranked too and marked `floor`.

**Resuming.** A point whose results.json holds every one of its runs finished (all
steps, or stopped by `max_retain_drop`) with the same parameters is skipped; any other
point is (re)run, and the pruning loop resumes its unfinished runs step by step. A point
that fails is recorded in the leaderboard with its error, the sweep goes on with the
others, and `selprune sweep` exits non-zero naming the failed points.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selprune.errors import SelpruneError
from selprune.loop import relative_curves
from selprune.models import model_spec_kind
from selprune.notebooks import kernel_params, run_series
from selprune.paths import atomic_write_bytes, read_json
from selprune.series import PARAMS, RERUN_SAFE, active_runs, prune_config, resolve_params, summarize
from selprune.texts import check_dataset_spec

TOP_KEYS = ("out", "base", "variants", "grid", "seeds", "keep_models")
HEADLINE = "forget_drop_at_10"  # the column the leaderboard is ranked by
DROPS = {"forget_drop_at_05": "0.05", "forget_drop_at_10": "0.10", "forget_drop_at_20": "0.20"}
FLOOR_RUN = "random"
# the notebooks that do each pruning run (01 statistics and 02 scores feed no pruning run)
RUN_NOTEBOOKS = {"ff": "03_prune_ffn.ipynb", "random": "03_prune_ffn.ipynb", "attn": "04_prune_attention.ipynb",
                 "attn_heads": "04_prune_attention.ipynb", "both": "04_prune_attention.ipynb"}
# Planning rates for the cost estimate: tokens per second of statistics collection and of
# evaluation, and seconds per notebook for kernel start, imports, model load and data
# preparation, measured for SmolLM2-135M on the 2-core reference CPU. Other models and
# machines scale these; the estimate is a budget aid, not a measurement.
COLLECT_TOKENS_PER_S = 430.0
EVAL_TOKENS_PER_S = 300.0
NOTEBOOK_OVERHEAD_S = 20.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Point:
    """One set of series parameters of a sweep, run into `params["run_dir"]`."""

    name: str
    params: dict[str, Any]  # resolved series parameters, run_dir included
    settings: dict[str, Any]  # what the point sets beyond base (variant, grid values, seed)

    @property
    def run_dir(self) -> Path:
        return Path(self.params["run_dir"])

    @property
    def runs(self) -> list[str]:
        return active_runs(self.params)

    @property
    def notebooks(self) -> tuple[str, ...]:
        """The pruning notebooks this point's runs need, in series order."""
        return tuple(sorted({RUN_NOTEBOOKS[r] for r in self.runs}))


@dataclass
class Sweep:
    """A loaded, validated sweep file: its points and where they go."""

    source: str
    out: Path
    points: list[Point]
    varied: list[str]  # parameters whose value differs between points: the leaderboard's columns
    keep_models: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # point name -> error, filled by run_sweep


# ------------------------------------------------------------------ loading the file
def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and validate a sweep file, and expand its points.

    Every point is checked as far as it can be without loading a model (parameter names,
    types and values, every run's PruneConfig, that the model and datasets exist), so a
    typo fails here, not an hour into the sweep.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SelpruneError(f"cannot read sweep file {path} ({e.strerror or e}); check the path") from e
    except yaml.YAMLError as e:
        raise SelpruneError(f"sweep file {path} is not valid YAML ({' '.join(str(e).split())}); fix the syntax") from e
    return expand(spec, str(path), out)


def expand(spec: Any, source: str = "sweep file", out: str | Path | None = None) -> Sweep:
    """Validate a parsed sweep file (see the module docstring) and expand its points."""
    if not isinstance(spec, dict):
        raise SelpruneError(f"{source} must hold a mapping with keys {', '.join(TOP_KEYS)}; "
                            "start from sweeps/default.yaml")
    unknown = sorted(set(spec) - set(TOP_KEYS))
    if unknown:
        raise SelpruneError(f"{source}: unknown keys {unknown}; a sweep file has {', '.join(TOP_KEYS)} "
                            "(series parameters go under base:, variants: or grid:)")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SelpruneError(f"{source}: base must be a mapping of parameter names to values, e.g. base: {{steps: 10}}")
    _check_names(base, f"{source}: base")
    variants = _variants(spec.get("variants"), source)
    grid = _grid(spec.get("grid"), source)
    seeds = _seeds(spec.get("seeds"), source)
    keep = spec.get("keep_models", False)
    if not isinstance(keep, bool):
        raise SelpruneError(f"{source}: keep_models={keep!r}; write true or false")
    out_spec = out if out is not None else spec.get("out")
    if out_spec is None:
        out_spec = Path("runs") / "sweeps" / (Path(source).stem if source.endswith((".yaml", ".yml")) else "sweep")
    if not isinstance(out_spec, (str, Path)) or not str(out_spec).strip():
        raise SelpruneError(f"{source}: out={out_spec!r}; give a folder path, e.g. out: runs/sweeps/mine")
    out_dir = Path(out_spec).expanduser()

    for vname, overrides in variants:
        for axis in grid:
            if axis in overrides:
                raise SelpruneError(f"{source}: variant {vname!r} sets {axis}, which grid also varies; "
                                    "remove it from one of them")
        if seeds is not None and "seed" in overrides:
            raise SelpruneError(f"{source}: variant {vname!r} sets seed, which seeds also varies; "
                                "remove it from one of them")
    if seeds is not None and "seed" in grid:
        raise SelpruneError(f"{source}: seeds and grid both vary seed; keep one")

    points: list[Point] = []
    axes = list(grid)
    for (vname, overrides), combo, seed in itertools.product(
        variants, itertools.product(*grid.values()), seeds if seeds is not None else [None]
    ):
        parts = [vname] if vname else []
        parts += [f"{a}-{_slug(v)}" for a, v in zip(axes, combo, strict=True)]
        parts += [f"seed-{seed}"] if seed is not None else []
        name = "__".join(parts) or "base"
        settings = {**overrides, **dict(zip(axes, combo, strict=True)), **({"seed": seed} if seed is not None else {})}
        given = {**base, **settings, "run_dir": str(out_dir / name)}
        points.append(Point(name, _check_point(given, f"{source}: point {name!r}"), settings))

    seen: dict[str, int] = {}
    for i, pt in enumerate(points):
        if pt.name in seen:
            raise SelpruneError(f"{source}: two points are both named {pt.name!r} (and would share a run directory); "
                                "give the variants distinct names")
        seen[pt.name] = i
    varied = [k for k in PARAMS if k != "run_dir" and len({repr(p.params[k]) for p in points}) > 1]
    return Sweep(source, out_dir, points, varied, keep)


def _check_names(params: dict[str, Any], where: str) -> None:
    if "run_dir" in params:
        raise SelpruneError(f"{where} sets run_dir, but the sweep puts every point in its own folder under out; "
                            "remove run_dir (set out: or --out instead)")
    unknown = sorted(k for k in params if k not in PARAMS)
    if unknown:
        raise SelpruneError(f"{where}: unknown parameters {unknown}; valid ones: {', '.join(PARAMS)}")


def _variants(raw: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) per variant; one unnamed, empty variant when there are none."""
    if raw is None:
        return [("", {})]
    if not isinstance(raw, list) or not raw:
        raise SelpruneError(f"{source}: variants must be a non-empty list of mappings, e.g. "
                            "variants: [{name: scoring-rms, scoring: rms}]")
    out = []
    for i, v in enumerate(raw, 1):
        if not isinstance(v, dict):
            raise SelpruneError(f"{source}: variant {i} is {v!r}, not a mapping; write e.g. {{name: rms, scoring: rms}}")
        overrides = {k: val for k, val in v.items() if k != "name"}
        name = v.get("name")
        if name is None:
            name = "__".join(f"{k}-{_slug(val)}" for k, val in overrides.items()) or "base"
        if not isinstance(name, str) or not _NAME.match(name):
            raise SelpruneError(f"{source}: variant {i} has name {name!r}; use letters, digits, '.', '_' and '-' "
                                "(it names the point's folder)")
        _check_names(overrides, f"{source}: variant {name!r}")
        out.append((name, overrides))
    return out


def _grid(raw: Any, source: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SelpruneError(f"{source}: grid must map parameter names to lists of values, e.g. grid: {{scoring: [abs, rms]}}")
    _check_names(raw, f"{source}: grid")
    for axis, values in raw.items():
        if not isinstance(values, list) or not values:
            raise SelpruneError(f"{source}: grid axis {axis} is {values!r}; give a non-empty list, e.g. {axis}: [a, b]")
        if len({repr(v) for v in values}) != len(values):
            raise SelpruneError(f"{source}: grid axis {axis} repeats a value in {values}; list each value once")
    return raw


def _seeds(raw: Any, source: str) -> list[int] | None:
    if raw is None:
        return None
    if (not isinstance(raw, list) or not raw or any(not isinstance(s, int) or isinstance(s, bool) for s in raw)
            or len(set(raw)) != len(raw)):
        raise SelpruneError(f"{source}: seeds is {raw!r}; give a list of distinct integers, e.g. seeds: [0, 1, 2]")
    return raw


def _slug(value: Any) -> str:
    """A value as a folder-name fragment: 0.005 -> '0.005', 'ff,random' -> 'ff_random'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "_"


def _check_point(given: dict[str, Any], where: str) -> dict[str, Any]:
    """Resolve and check one point's parameters without loading anything heavy."""
    try:
        p = resolve_params(given)
        if not active_runs(p):
            raise SelpruneError(f"no pruning run has a fraction above 0 among runs={p['runs']!r}; "
                                "set ff_frac or attn_frac above 0 (both, for the run 'both')")
        for run in active_runs(p):
            prune_config(p, run).validate()
        model_spec_kind(p["model"])
        for side in ("forget", "retain"):
            check_dataset_spec(p[side])
    except SelpruneError as e:
        raise SelpruneError(f"{where}: {e}") from e
    return p


# --------------------------------------------------------------------- cost estimate
def estimate_seconds(p: dict[str, Any]) -> float:
    """Upper bound of one point's cost at the planning rates: every run taking all its
    steps (`max_retain_drop` usually ends runs sooner), one base evaluation, and a kernel
    per notebook. A collection happens every step in iterative mode and whenever mean or
    peak ablation needs fresh constants; one-shot collects once at the start."""
    collect = 2 * p["collect_tokens"] / COLLECT_TOKENS_PER_S  # forget and retain
    evaluate = 2 * p["eval_tokens"] / EVAL_TOKENS_PER_S
    point = Point("", p, {})
    total = evaluate + NOTEBOOK_OVERHEAD_S * len(point.notebooks)
    for run in point.runs:
        cfg = prune_config(p, run)
        per_step = evaluate + (collect if cfg.mode == "iterative" or cfg.ablation != "zero" else 0.0)
        total += cfg.steps * per_step + (collect if cfg.mode == "one-shot" else 0.0)
    return total


# ------------------------------------------------------------------ finished or not
def run_finished(records: list[dict[str, Any]], p: dict[str, Any]) -> bool:
    """Whether a pruning run is over: all `steps` done, or stopped by `max_retain_drop`
    (the loop's rule: retain top-1 fell by more than that, relative to step 0)."""
    if not records:
        return False
    if len(records) - 1 >= p["steps"]:
        return True
    limit = p["max_retain_drop"]
    return limit is not None and len(records) > 1 and 1 - relative_curves(records)["retain"][-1] > limit


def _results(pt: Point) -> dict[str, Any] | None:
    """The point's results.json if it was made with the point's parameters, else None."""
    f = pt.run_dir / "results.json"
    if not f.exists():
        return None
    results = read_json(f)
    want = {k: v for k, v in kernel_params(pt.params).items() if k not in RERUN_SAFE}
    have = {k: v for k, v in {**{k: d for k, (d, _) in PARAMS.items()}, **(results.get("params") or {})}.items()
            if k not in RERUN_SAFE}
    return results if have == want else None


def point_status(pt: Point) -> str:
    """"done" (every run finished, same parameters), "partial" (its folder exists) or "new"."""
    results = _results(pt)
    if results is not None and all(run_finished((results["runs"].get(r) or {}).get("records", []), pt.params)
                                   for r in pt.runs):
        return "done"
    return "partial" if pt.run_dir.exists() else "new"


# ----------------------------------------------------------------------------- run
def run_sweep(sweep: Sweep, progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished point, then write and return the leaderboard.

    A point that raises is recorded in `sweep.failed` (its error in one line) and the
    sweep goes on; the leaderboard is rewritten after every point, so an interrupted
    sweep still leaves an up-to-date one.
    """
    log = log or (lambda msg: print(f"selprune sweep: {msg}", file=sys.stderr))
    sweep.out.mkdir(parents=True, exist_ok=True)
    n = len(sweep.points)
    for i, pt in enumerate(sweep.points, 1):
        t0 = time.perf_counter()
        try:
            if point_status(pt) == "done":
                log(f"[{i}/{n}] {pt.name}: finished earlier, skipped")
                continue
            log(f"[{i}/{n}] {pt.name}: running {', '.join(pt.runs)} ({', '.join(pt.notebooks)})")
            run_series(pt.params, progress=progress, notebooks=pt.notebooks)
        except Exception as e:  # noqa: BLE001 - any failure of one point is recorded, and the sweep goes on
            sweep.failed[pt.name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
            log(f"[{i}/{n}] {pt.name}: FAILED ({sweep.failed[pt.name]})")
        else:
            if not sweep.keep_models:  # a full model copy per point; the leaderboard needs none
                shutil.rmtree(pt.run_dir / "pruned-model", ignore_errors=True)
            log(f"[{i}/{n}] {pt.name}: done in {time.perf_counter() - t0:.0f} s")
        rows = leaderboard(sweep)
        write_leaderboard(rows, sweep.out, frontier_curves(sweep, rows))
    rows = leaderboard(sweep)
    write_leaderboard(rows, sweep.out, frontier_curves(sweep, rows))
    return rows


# ---------------------------------------------------------------------- leaderboard
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
    )
    if not row["reached"]:
        row["note"] = (f"not reached: retain top-1 fell at most {row['retain_drop_max']:.1%}; "
                       f"forget top-1 fell {row['forget_drop_final']:.1%} by the end")
    return row


def leaderboard(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per pruning run of every point, ranked (see `rank`)."""
    rows = []
    for pt in sweep.points:
        error = sweep.failed.get(pt.name)
        try:
            results = _results(pt)
        except SelpruneError as e:  # a corrupt results.json: that point's rows say so, the others stand
            results, error = None, error or " ".join(str(e).split())
        for run in pt.runs:
            row: dict[str, Any] = {"point": pt.name, "run": run, "floor": run == FLOOR_RUN}
            row.update({k: pt.params[k] for k in sweep.varied})
            # the step records with their seconds (results.json keeps wall-clock times apart)
            f = pt.run_dir / run / "records.json"
            records = read_json(f) if results is not None and run in results["runs"] and f.exists() else []
            if records:
                row.update(run_row(records))
                done = run_finished(records, pt.params)
                row["status"] = "done" if done else ("failed" if error else "incomplete")
                if not done:
                    row["note"] = f"incomplete: {len(records) - 1} of {pt.params['steps']} steps"
            else:
                row["status"] = "failed" if error else "not run"
            if error:
                row["error"] = error
            rows.append(row)
    return rank(rows)


COLUMNS_FIRST = ["rank", "point", "run", "floor", "status"]
COLUMNS_LAST = [*DROPS, "reached", "above_floor", "selectivity_area", "retain_drop_max", "forget_drop_final",
                "retain_drop_final", "forget_top1_base", "retain_top1_base", "forget_top1_final", "retain_top1_final",
                "steps", "ff_fraction", "attn_fraction", "seconds", "note", "error"]


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
    known = set(COLUMNS_FIRST) | set(COLUMNS_LAST)
    varied = list(dict.fromkeys(k for r in rows for k in r if k not in known))
    return COLUMNS_FIRST + varied + COLUMNS_LAST


def leaderboard_csv(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as CSV text (empty cells for missing numbers: None is not 0)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for k, v in r.items()})
    return buf.getvalue()


def row_label(row: dict[str, Any]) -> str:
    """A pruning run's label in the figures and the printed table: "point / run"."""
    return f"{row['point']} / {row['run']}"


def plot_leaderboard(rows: list[dict[str, Any]]):
    """Horizontal bars of the headline per pruning run, in leaderboard order, the random
    floor as a dashed line. Runs without a headline get a label instead of a bar."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    labels = [row_label(r) for r in rows]
    df = pd.DataFrame({"label": labels, "headline": [r.get(HEADLINE) for r in rows],
                       "kind": ["floor (random)" if r.get("floor") else r["run"] for r in rows],
                       "ranked": [r.get("rank") is not None for r in rows]})
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(rows), 1)))
    drawn = df[df["ranked"]]
    if len(drawn):
        palette = dict(zip(sorted(set(df["kind"])), sns.color_palette("tab10", len(set(df["kind"]))), strict=True))
        palette["floor (random)"] = (0.55, 0.55, 0.55)
        sns.barplot(drawn, x="headline", y="label", hue="kind", order=labels, dodge=False, palette=palette, errorbar=None,
                    ax=ax)
    else:
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top, as barplot draws it
    for i, r in enumerate(rows):
        if r.get("rank") is None:
            text = "not reached" if r.get("status") == "done" else r.get("status", "")
            if r.get("status") == "done":
                text += f" (retain fell at most {r['retain_drop_max']:.0%})"
            ax.text(0.005, i, text, va="center", fontsize=8, color="dimgray", style="italic")
    floor = floor_headline(rows)
    if floor is not None:
        ax.axvline(floor, color="black", ls="--", lw=1, label="random floor")
    ax.set(xlabel="forget top-1 drop where retain top-1 has dropped 10% (higher: more selective)", ylabel="",
           title="Selectivity leaderboard")
    lo = min([0.0, *(v for v in df["headline"] if v is not None and not pd.isna(v))])
    ax.set_xlim(lo - 0.02, 1.0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def frontier_curves(sweep: Sweep, rows: list[dict[str, Any]], top: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Step records of the `top` best-ranked selective runs and of the best-ranked floor
    run, keyed by their leaderboard label ("point / run"), in rank order."""
    dirs = {pt.name: pt.run_dir for pt in sweep.points}
    ranked = [r for r in rows if r.get("rank") is not None]
    chosen = [r for r in ranked if not r["floor"]][:top] + [r for r in ranked if r["floor"]][:1]
    return {row_label(r): read_json(dirs[r["point"]] / r["run"] / "records.json") for r in chosen}


def plot_frontier(curves: dict[str, list[dict[str, Any]]], floor: set[str] = frozenset()):
    """Forget drop against retain drop along each run (relative top-1, step by step): the
    headline is where a curve crosses the 10% line; the whole curve shows whether a recipe
    that loses there wins at other amounts of collateral damage, and how far above the
    random floor (`floor`: the labels drawn dashed) each one runs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    right = 0.12
    for label, records in curves.items():
        c = relative_curves(records)
        retain_drop, forget_drop = 1 - c["retain"], 1 - c["forget"]
        right = max(right, float(retain_drop.max()))
        ax.plot(retain_drop, forget_drop, marker=".", lw=1.2, label=label,
                **({"ls": "--", "color": "0.45"} if label in floor else {}))
    ax.axvline(0.10, color="black", lw=0.8, ls=":", label="headline: 10% retain drop")
    ax.set(xlabel="retain top-1 drop (relative to unpruned)", ylabel="forget top-1 drop (relative to unpruned)",
           xlim=(-0.01, min(right, 1.0) + 0.01), ylim=(-0.02, 1.0), title="Forget against retain damage, per run")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def write_leaderboard(rows: list[dict[str, Any]], out: str | Path,
                      curves: dict[str, list[dict[str, Any]]] | None = None) -> tuple[Path, Path]:
    """Write `out/leaderboard.csv` and `out/figures/leaderboard.png`, each atomically, and
    with `curves` (see `frontier_curves`) `out/figures/frontier.png`."""
    import matplotlib.pyplot as plt

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


def describe(sweep: Sweep) -> str:
    """The points of a sweep with their status and estimated cost (for --dry-run)."""
    lines = [f"{len(sweep.points)} points into {sweep.out}"]
    todo = 0.0
    for pt in sweep.points:
        status = point_status(pt)
        est = estimate_seconds(pt.params)
        todo += est if status != "done" else 0.0
        settings = ", ".join(f"{k}={v}" for k, v in pt.settings.items()) or "(base)"
        lines.append(f"  {status:<7} {pt.name:<32} runs {','.join(pt.runs):<14} <= {est / 60:5.1f} min  {settings}")
    lines.append(f"to run: at most {todo / 60:.0f} min at the planning rates (SmolLM2-135M, 2 CPU cores; "
                 "max_retain_drop usually stops runs sooner)")
    return "\n".join(lines)
