"""The `selprune` command.

    selprune run [-f params.yaml] [-p NAME VALUE]... [--out DIR]

runs the notebook series with papermill into a run directory and prints the results
table.
Errors a user can fix print as one line, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selprune import prune_command
from selprune.errors import SelpruneError
from selprune.param_args import add_param_options, read_params
from selprune.paths import read_json
from selprune.series import PARAMS, Series


def _parser() -> argparse.ArgumentParser:
    params = "\n".join(f"  {k:<15} {h} (default: {d})" for k, (d, h) in PARAMS.items())
    ap = argparse.ArgumentParser(prog="selprune", description="Machine unlearning by selective pruning.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run the notebook series (01-06) on the embedded default, or other parameters",
        description="Run the notebook series with papermill into a run directory: executed notebooks, "
        "results.json, figures/*.png and the pruned model.",
        epilog="parameters:\n" + params,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_param_options(r)
    r.add_argument("--out", help="run directory (same as -p run_dir DIR)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    sw = sub.add_parser(
        "sweep",
        help="run the pruning notebooks at every point of a sweep file and rank them in a leaderboard",
        description="Run the pruning notebooks (03, 04) once per point of a sweep file, each into its own "
        "folder under the sweep's out dir (finished points are skipped, so a rerun resumes), then write "
        "leaderboard.csv and figures/leaderboard.png ranked by the forget top-1 drop at 10% retain top-1 drop. "
        "Exit status 1 if a point failed, 2 for a bad sweep file.",
        epilog="sweep file keys: out, base, variants, grid, seeds, keep_models (see sweeps/default.yaml)",
    )
    sw.add_argument("-f", "--file", type=Path, required=True, help="sweep file (YAML)")
    sw.add_argument("--out", help="sweep folder (overrides the file's out:)")
    sw.add_argument("--dry-run", action="store_true", help="list the points, their status and cost; run nothing")
    sw.add_argument("--quiet", action="store_true", help="no progress bars or per-point lines")
    prune_command.add_parser(sub)
    return ap


def _sweep(args: argparse.Namespace) -> int:
    """`selprune sweep`: the work is in selprune.sweep; this only parses and reports."""
    from selprune import sweep

    try:
        sw = sweep.load_sweep(args.file, args.out)
        if args.dry_run:
            print(sweep.describe(sw))
            return 0
        rows = sweep.run_sweep(sw, progress=not args.quiet, log=(lambda msg: None) if args.quiet else None)
    except SelpruneError as e:
        print(f"selprune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(sweep.format_top(rows))
    print(f"\nleaderboard: {sw.out / 'leaderboard.csv'}, {sw.out / 'figures' / 'leaderboard.png'}")
    if sw.failed:
        print(f"selprune: error: {len(sw.failed)} of {len(sw.points)} points failed: {', '.join(sw.failed)} "
              "(their errors are in the leaderboard; rerun the sweep to retry them)", file=sys.stderr)
        return 1
    return 0


def _params(args: argparse.Namespace) -> dict:
    params = read_params(args.file, args.param)
    if args.out:
        params["run_dir"] = args.out
    return params


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "prune":
        return prune_command.main(args)
    from selprune.notebooks import run_series

    try:
        run_dir = run_series(_params(args), progress=not args.quiet)
        # the parameters the run recorded (with local paths made absolute for the kernels)
        table = Series(progress=False, **read_json(run_dir / "params.json")).results_table()
    except SelpruneError as e:
        print(f"selprune: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
        return 2
    cols = ["run", "dataset", "pruned", "base top1", "top1", "top10", "loss", "top1 drop %"]
    print(table[cols].round(3).to_string(index=False))
    print(f"\nresults: {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
