"""Running a sweep: the cost estimate, resuming, and execution (`selprune sweep`).

Each point runs the pruning notebooks it needs into its own folder (`notebooks.run_series`),
then, in a sweep file with `relearn: true`, the relearning protocol (`Series.anamnesia`);
the leaderboard (`selprune.experiment.leaderboard`) is rewritten after every point.

**Resuming.** A point whose results.json holds every one of its runs finished (all
steps, or stopped by `max_retain_drop`) with the same parameters is skipped; any other
point is (re)run, and the pruning loop resumes its unfinished runs step by step. A point
that fails is recorded in the leaderboard with its error, the sweep goes on with the
others, and `selprune sweep` exits non-zero naming the failed points.
"""


from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from selprune.anamnesia import log_schedule
from selprune.experiment.config import Config
from selprune.experiment.leaderboard import frontier_curves, leaderboard, write_leaderboard
from selprune.experiment.notebooks import kernel_params, run_series
from selprune.experiment.relearning import ARMS
from selprune.experiment.rundir import RunDir, write_errors
from selprune.experiment.runs import RUN_KINDS
from selprune.experiment.series import Series
from selprune.experiment.sweepfile import Point, Sweep

# Planning rates for the cost estimate: tokens per second of statistics collection and of
# evaluation, and seconds per notebook for kernel start, imports, model load and data
# preparation, measured for SmolLM2-135M on the 2-core reference CPU. Other models and
# machines scale these; the estimate is a budget aid, not a measurement.
COLLECT_TOKENS_PER_S = 430.0
EVAL_TOKENS_PER_S = 300.0
NOTEBOOK_OVERHEAD_S = 20.0
TRAIN_TOKENS_PER_S = 130.0  # fine-tuning: forward + backward + AdamW step, batches of 2 x 128


def estimate_seconds(cfg: Config, relearn: bool = False) -> float:
    """Upper bound of one point's cost at the planning rates: every run taking all its
    steps (`max_retain_drop` usually ends runs sooner), one base evaluation, and a kernel
    per notebook. A collection happens every step in iterative mode and whenever mean or
    peak ablation needs fresh constants; one-shot collects once at the start. `relearn`:
    the relearning protocol's three arms too (`relearn_seconds`), in the sweep's process."""
    collect = 2 * cfg.collect_tokens / COLLECT_TOKENS_PER_S  # forget and retain
    evaluate = 2 * cfg.eval_tokens / EVAL_TOKENS_PER_S
    point = Point("", cfg, {}, relearn)
    total = evaluate + NOTEBOOK_OVERHEAD_S * len(point.notebooks) + (relearn_seconds(cfg) if relearn else 0.0)
    for run in point.runs:
        random = RUN_KINDS[run].random
        iterative = cfg.prune_mode == "iterative" and not random
        per_step = evaluate + (collect if iterative or cfg.ablation != "zero" else 0.0)
        total += cfg.steps * per_step + (collect if cfg.prune_mode == "one-shot" and not random else 0.0)
    return total


def relearn_seconds(cfg: Config, arms: int = len(ARMS)) -> float:
    """The relearning protocol's cost at the planning rates: per arm, `retrain_steps`
    fine-tuning steps and an evaluation of forget and retain at each `log_schedule` step."""
    train = cfg.retrain_steps * cfg.retrain_batch * cfg.retrain_window / TRAIN_TOKENS_PER_S
    evals = len(log_schedule(cfg.retrain_steps)) * 2 * cfg.retrain_eval_tokens / EVAL_TOKENS_PER_S
    return arms * (train + evals)


def run_sweep(sweep: Sweep, progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished point, then write and return the leaderboard.

    A point that raises is recorded in `sweep.failed` (its error in one line) and the
    sweep goes on; the leaderboard is rewritten after every point, so an interrupted
    sweep still leaves an up-to-date one. The sweep folder is held for the sweep, and
    each point's folder while it runs (`RunDir.hold`): a second sweep into the same
    folder is refused.
    """
    log = log or (lambda msg: print(f"selprune sweep: {msg}", file=sys.stderr))
    with RunDir(sweep.out).hold(), write_errors(sweep.out):
        for i, pt in enumerate(sweep.points, 1):
            if _run_point(sweep, pt, f"[{i}/{len(sweep.points)}] {pt.name}", progress, log):
                rows = leaderboard(sweep)
                write_leaderboard(rows, sweep.out, frontier_curves(sweep, rows))
        rows = leaderboard(sweep)
        write_leaderboard(rows, sweep.out, frontier_curves(sweep, rows))
    return rows


def _run_point(sweep: Sweep, pt: Point, label: str, progress: bool, log: Callable[[str], None]) -> bool:
    """Run one point unless it is done (False: skipped); a failure goes to `sweep.failed`, not up."""
    t0 = time.perf_counter()
    try:
        if pt.status() == "done":
            log(f"{label}: finished earlier, skipped")
            return False
        log(f"{label}: running {', '.join(pt.runs)} ({', '.join(pt.notebooks)})")
        run_series(pt.params, progress=progress, notebooks=pt.notebooks)
        if pt.relearn:
            log(f"{label}: relearning (the unpruned control, selective and random arms)")
            Series(progress, **kernel_params(pt.params, relearn=True)).anamnesia()
    except Exception as e:  # noqa: BLE001 - any failure of one point is recorded, and the sweep goes on
        sweep.failed[pt.name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        log(f"{label}: FAILED ({sweep.failed[pt.name]})")
        return True
    if not sweep.keep_models:  # a full model copy per point; the leaderboard needs none
        shutil.rmtree(pt.run_dir / "pruned-model", ignore_errors=True)
    log(f"{label}: done in {time.perf_counter() - t0:.0f} s")
    return True


def describe(sweep: Sweep) -> str:
    """The points of a sweep with their status and estimated cost (for --dry-run)."""
    lines = [f"{len(sweep.points)} points into {sweep.out}"]
    todo = 0.0
    for pt in sweep.points:
        status = pt.status()
        est = estimate_seconds(pt.cfg, pt.relearn)
        todo += est if status != "done" else 0.0
        settings = ", ".join(f"{k}={v}" for k, v in pt.settings.items()) or "(base)"
        runs = ",".join(pt.runs) + (" +relearn" if pt.relearn else "")
        lines.append(f"  {status:<7} {pt.name:<32} runs {runs:<14} <= {est / 60:5.1f} min  {settings}")
    lines.append(f"to run: at most {todo / 60:.0f} min at the planning rates (SmolLM2-135M, 2 CPU cores; "
                 "max_retain_drop usually stops runs sooner)")
    return "\n".join(lines)
