"""The `selprune` command: `run` (the notebook series), `prune` (one pruning run, also
under torchrun), `sweep` (a grid of series points and their leaderboard), `train-vit`
(a small vision transformer to prune) and `dropout-claim` (the paper's dropout claim on such ViTs).

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
    _add_train_vit(sub)
    _add_dropout_claim(sub)
    return ap


def _add_dropout_claim(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("dropout-claim", help="the paper's dropout claim on small ViTs trained here",
                       description="Train a small ViT per dropout rate and seed, prune the forget class(es) from "
                       "each by one recipe, and compare the frontiers (selprune.experiment.dropout_claim). "
                       "Resumes: trained checkpoints and finished runs under --out are reused.")
    c.add_argument("--out", required=True, help="folder for the checkpoints, runs, claim.json and the figure")
    c.add_argument("--dataset", default="fashion-mnist", help="image dataset (default fashion-mnist)")
    c.add_argument("--forget", default="0", help="class(es) to forget, names or indices joined by + (default 0)")
    c.add_argument("--dropouts", default="0,0.1", help="dropout rates, comma-separated (default 0,0.1)")
    c.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default 0,1,2)")
    c.add_argument("--train-steps", type=int, help="training steps per model (default selprune.vit_train's)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_vit(sub: argparse._SubParsersAction) -> None:
    from selprune.vit_train import DEFAULTS

    t = sub.add_parser("train-vit", help="train a small vision transformer on an image dataset (a model to prune)",
                       description="Train a small ViT (selprune.vit_train) and save it as a Hugging Face checkpoint "
                       "(config.json, model.safetensors, preprocessor_config.json, train_log.json).")
    t.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, cifar10, an ImageFolder folder or "
                   "hub:ORG/NAME (default fashion-mnist)")
    t.add_argument("--out", required=True, help="checkpoint folder (refused if it exists and is not empty)")
    t.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout (default 0)")
    t.add_argument("--seed", type=int, default=0, help="initialisation, dropout and batch order (default 0)")
    for name, kind, what in (("steps", int, "training steps"), ("batch-size", int, "images a step"),
                             ("lr", float, "peak AdamW learning rate (warmup, then cosine decay)")):
        t.add_argument(f"--{name}", type=kind, default=DEFAULTS[name.replace("-", "_")],
                       help=f"{what} (default {DEFAULTS[name.replace('-', '_')]})")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    t.add_argument("--threads", type=int, help="torch CPU threads (default torch's; 1 can be much faster on a "
                   "machine whose cores are busy with other work)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def _fail(e: SelpruneError) -> int:
    print(f"selprune: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
    return 2


def _sweep(args: argparse.Namespace) -> int:
    """`selprune sweep`: the work is in selprune.experiment.sweep; this only parses and reports."""
    from selprune.experiment import leaderboard, seed_summary, sweep, sweepfile

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
    summary = seed_summary.seed_summary(rows)
    if any(r["seeds"] > 1 for r in summary):  # the same recipe on several seeds: read it over them
        print("\nover seeds (mean ± sd; (k/n): seeds that reached that retain drop):")
        print(seed_summary.summary_markdown(summary))
    print(f"\nleaderboard: {sw.out / 'leaderboard.csv'}, {sw.out / seed_summary.SUMMARY_FILE}, "
          f"{sw.out / 'figures' / 'leaderboard.png'}")
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


def _train_vit(args: argparse.Namespace) -> int:
    """`selprune train-vit`: the work is in selprune.vit_train."""
    import torch

    from selprune.vit_train import train_vit

    if args.threads:
        torch.set_num_threads(args.threads)  # this command's process only
    try:
        log = train_vit(args.dataset, args.out, dropout=args.dropout, seed=args.seed, steps=args.steps,
                        batch_size=args.batch_size, lr=args.lr, progress=not args.quiet, overwrite=args.overwrite)
    except SelpruneError as e:
        return _fail(e)
    print(f"checkpoint: {Path(args.out).expanduser()}")
    print(f"test top-1: {log['test']['top1']:.4f} on {log['test_images']} images ({log['seconds']['total']:.0f} s)")
    return 0


def _dropout_claim(args: argparse.Namespace) -> int:
    """`selprune dropout-claim`: the work is in selprune.experiment.dropout_claim."""
    from selprune import plots
    from selprune.experiment.dropout_claim import claim_table, dropout_claim, plot_claim

    try:
        dropouts = tuple(float(d) for d in args.dropouts.split(","))
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        return _fail(SelpruneError(f"--dropouts {args.dropouts!r} / --seeds {args.seeds!r}: give comma-separated "
                                   "numbers, e.g. --dropouts 0,0.1 --seeds 0,1,2"))
    train = {"steps": args.train_steps} if args.train_steps else {}
    try:
        rows = dropout_claim(args.out, dataset=args.dataset, forget=args.forget, dropouts=dropouts, seeds=seeds,
                             train=train, progress=not args.quiet)
    except SelpruneError as e:
        return _fail(e)
    print(claim_table(rows).to_string(index=False))
    print(f"\nrows: {Path(args.out) / 'claim.json'}; figure: {plots.save_figure(plot_claim(rows), args.out, 'claim')}")
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


COMMANDS = {"run": _run, "sweep": _sweep, "prune": prune_command.main, "train-vit": _train_vit,
            "dropout-claim": _dropout_claim}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
