"""The `selprune` command: `run` (the notebook series), `prune` (one pruning run, also
under torchrun) and `sweep` (a grid of series points and their leaderboard).

Every command takes its parameters the same way, from the one schema
(`selprune.experiment.config`): `--preset NAME`, then a YAML file `-f`, then `-p NAME
VALUE` pairs, over the defaults. Errors a user can fix print as one line, without a
traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from selprune.errors import SelpruneError
from selprune.experiment import prune_command
from selprune.experiment.config import FIELDS, PRESETS, stage_of
from selprune.experiment.param_args import add_param_options, read_params
from selprune.experiment.render import help_epilog

SWEEP_STAGES = ("setup", "data", "score", "prune", "relearn", "probe")  # run_dir is per point; runs may vary


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named budget under the file and -p "
                        "(paper: the paper's 1e5 tokens per collection and evaluation, 10 steps)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selprune", description="Machine unlearning by selective pruning.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run the notebook series (01-06) on the embedded default, or other parameters",
        description="Run the notebook series with papermill into a run directory: executed notebooks, "
        "results.json, figures/*.png and the pruned model.",
        epilog=help_epilog(FIELDS), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_param_options(r)
    add_preset_option(r)
    r.add_argument("--out", help="run directory (same as -p run_dir DIR)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    sw = sub.add_parser(
        "sweep",
        help="run the pruning notebooks at every point of a sweep file and rank them in a leaderboard",
        description="Run the pruning notebooks (03, 04) once per point of a sweep file, each into its own "
        "folder under the sweep's out dir (finished points are skipped, so a rerun resumes), then write "
        "leaderboard.csv and figures/leaderboard.png ranked by the forget top-1 drop at 10% retain top-1 drop. "
        "Exit status 1 if a point failed, 2 for a bad sweep file.",
        epilog="sweep file keys: out, base, variants, grid, seeds, keep_models, preset (see sweeps/default.yaml); "
        "base, variants and grid take these\n" + help_epilog(n for n in FIELDS if stage_of(n) in SWEEP_STAGES
                                                          or n == "runs"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sw.add_argument("-f", "--file", type=Path, required=True, help="sweep file (YAML)")
    add_preset_option(sw)
    sw.add_argument("--out", help="sweep folder (overrides the file's out:)")
    sw.add_argument("--dry-run", action="store_true", help="list the points, their status and cost; run nothing")
    sw.add_argument("--quiet", action="store_true", help="no progress bars or per-point lines")
    par = sw.add_argument_group("parallel points", "points are independent: run several at once, in worker "
                                "processes here or as submitit jobs (pip install 'selprune[cluster]')")
    par.add_argument("--workers", type=int, help="points at once (default 1: one after another, in this process; "
                     "with --launcher slurm: all at once, queued by SLURM); workers split this machine's cores")
    par.add_argument("--launcher", choices=("local", "slurm"), help="one submitit job per point: slurm (sbatch, "
                     "from the cluster's login node) or local (submitit's local processes); job files and logs in "
                     "OUT/.submitit")
    par.add_argument("--slurm-partition", help="SLURM partition (default: the cluster's)")
    par.add_argument("--slurm-time", type=int, default=240, metavar="MIN",
                     help="time limit per point's job, minutes (default 240; the local launcher's too)")
    par.add_argument("--slurm-gpus", type=int, default=0, metavar="N",
                     help="GPUs per job (default 0; the local launcher's too, which hides the GPUs from a job "
                     "otherwise)")
    par.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per job (default: the cluster's)")
    prune_command.add_parser(sub, add_preset_option)
    return ap


def _fail(e: SelpruneError) -> int:
    print(f"selprune: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
    return 2


def _sweep(args: argparse.Namespace) -> int:
    """`selprune sweep`: the work is in selprune.experiment.sweep; this only parses and reports."""
    from selprune.experiment import leaderboard, sweep, sweepfile

    try:
        sw = sweepfile.load_sweep(args.file, args.out, args.preset)
        if args.dry_run:
            print(sweep.describe(sw))
            return 0
        slurm = sweep.SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus, args.slurm_cpus)
        rows = sweep.run_sweep(sw, progress=not args.quiet, log=(lambda msg: None) if args.quiet else None,
                               workers=args.workers, launcher=args.launcher, slurm=slurm)
    except SelpruneError as e:
        return _fail(e)
    print(leaderboard.format_top(rows))
    print(f"\nleaderboard: {sw.out / 'leaderboard.csv'}, {sw.out / 'figures' / 'leaderboard.png'}")
    if sw.failed:
        print(f"selprune: error: {len(sw.failed)} of {len(sw.points)} points failed: {', '.join(sw.failed)} "
              "(their errors are in the leaderboard; rerun the sweep to retry them)", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    """`selprune run`: the series with papermill, then the results table."""
    from selprune.experiment.config import resolve
    from selprune.experiment.notebooks import run_series
    from selprune.experiment.rundir import read_json
    from selprune.experiment.series import Series

    try:
        params = read_params(args.file, args.param)
        if args.out:
            params["run_dir"] = args.out
        run_dir = run_series(asdict(resolve(params, args.preset)), progress=not args.quiet)
        # the parameters the run recorded (with local paths made absolute for the kernels)
        table = Series(progress=False, **read_json(run_dir / "params.json")).results_table()
    except SelpruneError as e:
        return _fail(e)
    cols = ["run", "dataset", "pruned", "base top1", "top1", "top10", "loss", "top1 drop %"]
    print(table[cols].round(3).to_string(index=False))
    print(f"\nresults: {run_dir / 'results.json'}")
    return 0


def setup_logging() -> None:
    """Show selprune's notes (e.g. a one-off model conversion) on stderr: the command's
    choice, made when it starts, never at import."""
    log = logging.getLogger("selprune")
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


COMMANDS = {"run": _run, "sweep": _sweep, "prune": prune_command.main}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
