"""Running a sweep: the cost estimate, resuming, and execution (`selprune sweep`).

Each point runs the pruning notebooks it needs into its own folder (`notebooks.run_series`),
then, in a sweep file with `relearn: true`, the relearning protocol (`Series.anamnesia`);
the leaderboard (`selprune.experiment.leaderboard`) is rewritten after every point.

**Resuming.** A point whose results.json holds every one of its runs finished (all
steps, or stopped by `max_retain_drop`) with the same parameters is skipped; any other
point is (re)run, and the pruning loop resumes its unfinished runs step by step. A point
that fails is recorded in the leaderboard with its error, the sweep goes on with the
others, and `selprune sweep` exits non-zero naming the failed points.

**In parallel.** Points are independent: `workers` > 1 runs that many at once in local
worker processes (concurrent.futures, "spawn"), and a launcher runs each as a submitit job
(SLURM, or local processes). The sweep's process skips the finished points, submits the
others, and records each as it finishes; each worker runs what the sequential path runs.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selprune.anamnesia import log_schedule
from selprune.errors import SelpruneError
from selprune.experiment.config import Config
from selprune.experiment.leaderboard import frontier_curves, leaderboard, write_leaderboard
from selprune.experiment.notebooks import kernel_params, run_series
from selprune.experiment.relearning import ARMS
from selprune.experiment.rundir import RunDir, write_errors
from selprune.experiment.runs import RUN_KINDS
from selprune.experiment.seed_summary import write_summary
from selprune.experiment.series import Series
from selprune.experiment.sweepfile import Point, Sweep, check_devices
from selprune.experiment.tracking import log_leaderboard
from selprune.unlearning import METHODS

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
        if RUN_KINDS[run].method:
            total += baseline_seconds(cfg, RUN_KINDS[run].method)
            continue
        random = RUN_KINDS[run].random
        iterative = cfg.prune_mode == "iterative" and not random
        per_step = evaluate + (collect if iterative or cfg.ablation != "zero" else 0.0)
        total += cfg.steps * per_step + (collect if cfg.prune_mode == "one-shot" and not random else 0.0)
    return total


def baseline_seconds(cfg: Config, method: str) -> float:
    """A baseline run's cost at the planning rates: `unlearn_steps` training steps (forget
    windows, and as many retain windows for a method that needs them), an evaluation at
    each checkpoint, and (notebook 07) its output relearned once."""
    windows = cfg.unlearn_batch * (2 if METHODS[method].needs_retain else 1)
    train = cfg.unlearn_steps * windows * cfg.window / TRAIN_TOKENS_PER_S
    evaluate = 2 * cfg.eval_tokens / EVAL_TOKENS_PER_S
    return train + cfg.unlearn_checkpoints * evaluate + relearn_seconds(cfg, arms=1)


def relearn_seconds(cfg: Config, arms: int = len(ARMS)) -> float:
    """The relearning protocol's cost at the planning rates: per arm, `retrain_steps`
    fine-tuning steps and an evaluation of forget and retain at each `log_schedule` step."""
    train = cfg.retrain_steps * cfg.retrain_batch * cfg.retrain_window / TRAIN_TOKENS_PER_S
    evals = len(log_schedule(cfg.retrain_steps)) * 2 * cfg.retrain_eval_tokens / EVAL_TOKENS_PER_S
    return arms * (train + evals)


def run_sweep(sweep: Sweep, progress: bool = True, log: Callable[[str], None] | None = None,
              workers: int | None = None,
              launcher: str | None = None, slurm: SlurmOptions | None = None) -> list[dict[str, Any]]:
    """Run every unfinished point, then write and return the leaderboard.

    A point that raises is recorded in `sweep.failed` (its error in one line) and the sweep goes on; the
    leaderboard is rewritten after every point, so an interrupted sweep still leaves an up-to-date one. The
    sweep folder is held for the sweep, and each point's folder while it runs (`RunDir.hold`): a second sweep
    into the same folder is refused.

    `workers` > 1 or a `launcher` ("local", "slurm": submitit) runs up to `workers` points at once (default 1; on
    SLURM all), each in its own process (`point_job`); this one keeps the folder, log, leaderboard and summary."""
    log = log or (lambda msg: print(f"selprune sweep: {msg}", file=sys.stderr))
    if workers is not None and workers < 1:
        raise SelpruneError(f"workers={workers} is below 1; pass --workers 1 (one point at a time) or more")
    if launcher not in (None, *LAUNCHERS):
        raise SelpruneError(f"launcher={launcher!r} is unknown; use one of {', '.join(LAUNCHERS)}")
    check_devices(sweep, here=launcher in (None, "local"))  # points run here: this machine needs their devices
    with RunDir(sweep.out).hold(), write_errors(sweep.out):
        if (workers or 1) == 1 and launcher is None:  # today's sequential path, in this process
            for i, pt in enumerate(sweep.points, 1):
                if _run_point(sweep, pt, f"[{i}/{len(sweep.points)}] {pt.name}", progress, log):
                    _write_board(sweep)
        else:
            _run_parallel(sweep, make_engine(sweep.out, workers, launcher, slurm or SlurmOptions()), log)
        rows = _write_board(sweep)
    return rows


def _write_board(sweep: Sweep) -> list[dict[str, Any]]:
    write_leaderboard(rows := leaderboard(sweep), sweep.out, frontier_curves(sweep, rows))
    write_summary(rows, sweep.out)  # the same rows over seeds: summary.csv
    log_leaderboard(sweep, rows)  # experiment tracking (#17): each finished point's rows
    return rows


def _run_point(sweep: Sweep, pt: Point, label: str, progress: bool, log: Callable[[str], None]) -> bool:
    """Run one point unless it is done (False: skipped); a failure goes to `sweep.failed`, not up."""
    t0 = time.perf_counter()
    try:
        if pt.status() == "done":
            log(f"{label}: finished earlier, skipped")
            return False
        log(f"{label}: running {', '.join(pt.runs)} ({', '.join(pt.notebooks)})")
        _point_work(pt, progress, sweep.keep_models, lambda: log(f"{label}: relearning (the unpruned control, "
                                                                  "selective and random arms)"))
    except Exception as e:  # noqa: BLE001 - any failure of one point is recorded, and the sweep goes on
        sweep.failed[pt.name] = one_line(e)
        log(f"{label}: FAILED ({sweep.failed[pt.name]})")
        return True
    log(f"{label}: done in {time.perf_counter() - t0:.0f} s")
    return True


def _point_work(pt: Point, progress: bool, keep_models: bool, relearning: Callable[[], None]) -> None:
    """What one point runs, in the sweep's process or a worker's: its pruning notebooks,
    then (with relearn) the relearning protocol in-process; raises on failure."""
    run_series(pt.params, progress=progress, notebooks=pt.notebooks)
    if pt.relearn:
        relearning()
        Series(progress, **kernel_params(pt.params, relearn=True)).anamnesia()
    if not keep_models:  # a full model copy per point; the leaderboard needs none
        shutil.rmtree(pt.run_dir / "pruned-model", ignore_errors=True)


def one_line(e: BaseException) -> str:
    """An error as the one line the leaderboard and the log show."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def point_job(pt: Point, keep_models: bool, share: int) -> tuple[str | None, float]:
    """One point in a worker process or a submitit job: (its error in one line or None,
    seconds). The worker takes 1/`share` of the cores it may use (`split_threads`) and
    holds the point's folder itself (a folder of its own under the sweep's, which the
    sweep's process holds), for the pruning notebooks and the relearning alike. No
    progress bars: several workers' bars would garble one terminal."""
    split_threads(share)
    t0 = time.perf_counter()
    try:
        with RunDir(pt.run_dir).hold():
            _point_work(pt, False, keep_models, lambda: None)
    except Exception as e:  # noqa: BLE001 - recorded by the sweep's process, which goes on
        return one_line(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


def _run_parallel(sweep: Sweep, engine: _Pool | _Jobs, log: Callable[[str], None]) -> None:
    """Submit the points that are not done, at most `engine.cap` at a time, and record each
    as it finishes (log line, `sweep.failed`, leaderboard), in completion order."""
    todo = _todo(sweep, log)
    share = min(engine.cap, len(todo))  # the points at once, among which the worker processes split the cores
    running: dict[Any, tuple[str, Point]] = {}
    try:
        while todo or running:
            while todo and len(running) < engine.cap:
                label, pt = todo.pop(0)
                try:
                    handle = engine.submit(pt, sweep.keep_models, share)
                except Exception as e:  # noqa: BLE001 - e.g. sbatch refused the job: that point failed
                    sweep.failed[pt.name] = f"could not be started ({one_line(e)})"
                    log(f"{label}: FAILED ({sweep.failed[pt.name]})")
                    continue
                running[handle] = (label, pt)
                log(f"{label}: running {', '.join(pt.runs)} ({', '.join(pt.notebooks)}"
                    + (", then relearning" if pt.relearn else "") + f"){engine.name(handle)}")
            for handle in engine.wait(list(running)) if running else ():
                label, pt = running.pop(handle)
                error, seconds = engine.outcome(handle)
                if error is None:
                    log(f"{label}: done in {seconds:.0f} s")
                else:
                    sweep.failed[pt.name] = error
                    log(f"{label}: FAILED ({error})")
                _write_board(sweep)
    finally:
        engine.close(list(running))


def _todo(sweep: Sweep, log: Callable[[str], None]) -> list[tuple[str, Point]]:
    """(log label, point) of the points to run, in sweep order; the finished ones are
    skipped, and one whose status cannot be read fails, as in the sequential path."""
    todo = []
    for i, pt in enumerate(sweep.points, 1):
        label = f"[{i}/{len(sweep.points)}] {pt.name}"
        try:
            if pt.status() == "done":
                log(f"{label}: finished earlier, skipped")
                continue
        except Exception as e:  # noqa: BLE001 - that point fails, the others go on
            sweep.failed[pt.name] = one_line(e)
            log(f"{label}: FAILED ({sweep.failed[pt.name]})")
            continue
        todo.append((label, pt))
    return todo


def split_threads(share: int) -> int:
    """Give this process 1/`share` of the cores it may use (at least one thread): torch's
    threads here, and OMP_NUM_THREADS / MKL_NUM_THREADS for the notebook kernels it starts,
    so that `share` workers side by side do not oversubscribe the machine. The number."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // share)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------- the engines
LAUNCHERS = ("local", "slurm")  # submitit's LocalExecutor and its SLURM executor (AutoExecutor)
SUBMITIT_DIR = ".submitit"  # under the sweep's out: submitit's job files and logs


@dataclass(frozen=True)
class SlurmOptions:
    """The job settings of a launcher, kept few: the time limit (also the local launcher's),
    and on SLURM the partition, GPUs and CPUs per job (unset: the cluster's defaults)."""

    partition: str | None = None
    time_min: int = 240
    gpus: int = 0
    cpus: int | None = None


def make_engine(out: Path, workers: int | None, launcher: str | None, opts: SlurmOptions) -> _Pool | _Jobs:
    """The engine that runs the points: worker processes, or submitit jobs for a launcher."""
    return _Pool(workers or 1) if launcher is None else _Jobs(out, workers, launcher, opts)


class _Pool:
    """`workers` local processes (concurrent.futures), started with "spawn": forking a
    process that has loaded torch is unsafe. Processes are reused from point to point."""

    def __init__(self, workers: int) -> None:
        self.cap = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, pt: Point, keep_models: bool, share: int) -> Future:
        return self.pool.submit(point_job, pt, keep_models, share)

    def name(self, handle: Future) -> str:
        return ""

    def wait(self, handles: list[Future]) -> list[Future]:
        return list(wait_futures(handles, return_when=FIRST_COMPLETED).done)

    def outcome(self, handle: Future) -> tuple[str | None, float]:
        try:
            return handle.result()
        except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory): that point failed
            return f"its worker process failed ({one_line(e)})", 0.0

    def close(self, handles: list[Future]) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Jobs:
    """submitit: one job per point, on SLURM or (launcher "local") in local processes, at
    most `workers` (default 1) at once locally; on SLURM `workers`, by default all at once."""

    def __init__(self, out: Path, workers: int | None, launcher: str, opts: SlurmOptions) -> None:
        try:
            import submitit
        except ImportError as e:
            raise SelpruneError(f"--launcher {launcher} needs submitit, which is not installed; pip install "
                                "submitit (or pip install 'selprune[cluster]')") from e
        if launcher == "slurm" and shutil.which("sbatch") is None:
            raise SelpruneError("--launcher slurm needs SLURM's sbatch, which is not on PATH here; run the sweep on "
                                "the cluster's login node, or use --launcher local or --workers N on this machine")
        self.local = launcher == "local"
        self.cap = workers or (1 if self.local else sys.maxsize)
        self.poll_s = 1.0 if self.local else 30.0
        self.executor = submitit.AutoExecutor(folder=out / SUBMITIT_DIR, cluster=launcher)
        params = {"timeout_min": opts.time_min, "gpus_per_node": opts.gpus, "cpus_per_task": opts.cpus,
                  "slurm_partition": opts.partition}
        self.executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    def submit(self, pt: Point, keep_models: bool, share: int) -> Any:
        self.executor.update_parameters(name=f"selprune-{pt.name}")
        return self.executor.submit(point_job, pt, keep_models, share if self.local else 1)

    def name(self, handle: Any) -> str:
        return f" as job {handle.job_id}"

    def wait(self, handles: list[Any]) -> list[Any]:
        while not (done := [h for h in handles if h.done()]):
            time.sleep(self.poll_s)
        return done

    def outcome(self, handle: Any) -> tuple[str | None, float]:
        try:
            return handle.result()
        except Exception as e:  # noqa: BLE001 - the job died (time limit, killed, node failure): that point failed
            return f"job {handle.job_id} failed ({one_line(e)[:300]}); its log: {handle.paths.stderr}", 0.0

    def close(self, handles: list[Any]) -> None:
        for h in handles:  # an interrupted sweep leaves no job writing into its points
            h.cancel(check=False)


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
