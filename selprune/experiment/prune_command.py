"""`selprune prune`: one pruning run from the shell, without notebooks, on one process or many.

    selprune prune [--run-kind ff] [--preset P] [-f run.yaml] [-p NAME VALUE]... --out DIR [--save-model]
    torchrun --nproc_per_node N -m selprune prune ...      # data parallel, N processes

The parameters are the schema's, with the same names and defaults as `selprune run`
(`--run-kind` picks the run kind, as one entry of the series' `runs`); the folder is a
pruning run's (`loop.lock_run`), so a rerun resumes and a folder made with other
parameters is refused. Under torchrun every process runs this same command:
`distributed.init()` joins them, each loads the model, and `run_pruning` splits the
windows between them (README, "Scaling up").
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selprune import distributed
from selprune.errors import SelpruneError
from selprune.experiment.config import FIELDS, Config, resolve, stage_of, validate
from selprune.experiment.loop import RUN_STAGES
from selprune.experiment.param_args import add_param_options, read_params
from selprune.experiment.render import help_epilog
from selprune.experiment.rundir import RunDir, write_error
from selprune.experiment.runs import RUN_KINDS


def add_parser(sub: argparse._SubParsersAction, add_preset_option: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register `prune` on the `selprune` command's subparsers."""
    p = sub.add_parser(
        "prune",
        help="one pruning run (collect, score, prune, evaluate per step) into a run directory; works under torchrun",
        description="One pruning run into a run directory (config.json, step_NNN.safetensors, records.json), "
        "without notebooks. Launched by torchrun (e.g. torchrun --nproc_per_node 2 -m selprune prune ...), "
        "the processes split the token windows and add their sums; rank 0 writes.",
        epilog=help_epilog(n for n in FIELDS if stage_of(n) in RUN_STAGES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_param_options(p)
    add_preset_option(p)
    p.add_argument("--run-kind", dest="run", default="ff", choices=[n for n, k in RUN_KINDS.items() if not k.method],
                   help="which pruning run (a name from the series' runs parameter; default ff; not --run, which "
                   "torchrun would take for its own --run-path); the gradient unlearning baselines run in notebook "
                   "07 and in sweeps")
    p.add_argument("--out", required=True, help="run directory (resumed if it exists with the same parameters)")
    p.add_argument("--device", default=None,
                   help="same as -p device D; under torchrun, cuda means this process's GPU (LOCAL_RANK)")
    p.add_argument("--device-map", default=None,
                   help="hand placement to accelerate (e.g. auto: shard a model too big for one GPU over all GPUs); "
                   "one process only")
    p.add_argument("--save-model", action="store_true",
                   help="also write the pruned model to OUT/pruned-model (loadable by from_pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from(params: dict[str, Any], run: str, preset: str | None = None,
                note: Callable[[str], None] | None = None) -> Config:
    """The validated configuration of one `run` from the command's parameters. Names of
    stages a pruning run does not use (retraining, the series' runs and run_dir) are
    accepted, so one parameter file serves every command, and named in a note."""
    cfg = resolve(params, preset, require_runs=False)
    unused = sorted(n for n in params if n in FIELDS and stage_of(n) not in RUN_STAGES and n != "tracker")
    if unused:
        (note or (lambda msg: print(f"selprune: note: {msg}", file=sys.stderr)))(
            f"selprune prune does not use {', '.join(unused)} (retraining and series parameters)")
    kind = RUN_KINDS[run]
    for k in kind.kinds:
        if getattr(cfg, f"{k}_frac") <= 0:
            raise SelpruneError(f"--run-kind {run} prunes {k} neurons, but {k}_frac={getattr(cfg, f'{k}_frac')}; "
                                f"set {k}_frac above 0 (e.g. -p {k}_frac 0.02)")
    validate(cfg, runs=[run], require_runs=False)
    return cfg


def main(args: argparse.Namespace) -> int:
    """Run the command; a `SelpruneError` prints as one line and exits with status 2, and so
    does a file that cannot be written under --out (`rundir.write_error`)."""
    main_rank = True
    try:
        params = read_params(args.file, args.param)
        if args.device is not None:
            params["device"] = args.device
        cfg = config_from(params, args.run, args.preset)
        if distributed.init():
            main_rank = distributed.is_main()
            if args.device_map is not None:
                raise SelpruneError(
                    f"--device-map {args.device_map} with {distributed.world_size()} processes: each would spread its "
                    "own copy of the model over the same GPUs. Use torchrun (one GPU per process, model fits one "
                    "GPU) or --device-map in one process (model over all GPUs), not both"
                )
        with contextlib.ExitStack() as held:  # rank 0 holds --out: a second writer is refused
            distributed.on_main(lambda: held.enter_context(RunDir(args.out).hold()) and None)
            records = _prune(args, cfg, main_rank)
    except SelpruneError as e:
        return _fail(str(e))
    except OSError as e:
        if (msg := write_error(e, args.out)) is None:
            raise
        return _fail(msg)
    finally:
        distributed.cleanup()
    if main_rank:
        print(_table(records))
        print(f"\nrecords: {Path(args.out) / 'records.json'}")
    return 0


def _fail(msg: str) -> int:
    print(f"selprune: error: {' '.join(msg.split())}", file=sys.stderr)  # one line, whatever the cause
    return 2


def _prune(args: argparse.Namespace, cfg: Config, main_rank: bool) -> list[dict[str, Any]]:
    """Load the model, run (or resume) the pruning run into --out, export if asked."""
    from selprune.experiment.loop import run_pruning
    from selprune.models import load_model, resolve_device
    from selprune.prune import export_pruned

    device = distributed.rank_device(resolve_device(cfg.device))
    model, tok = load_model(cfg.model, cfg.dtype, device, device_map=args.device_map)
    records, pruner = run_pruning(cfg, args.run, args.out, model, tok, progress=not args.quiet and main_rank)
    if args.save_model:
        distributed.on_main(lambda: export_pruned(model, pruner, Path(args.out) / "pruned-model", tok))
    return records


def _table(records: list[dict[str, Any]]) -> str:
    """One line per step: fractions pruned, then top-1 and loss on forget and retain."""
    head = f"{'step':>4} {'ff %':>6} {'attn %':>6} {'forget top1':>11} {'retain top1':>11} {'forget loss':>11} {'retain loss':>11}"
    lines = [head]
    for r in records:
        lines.append(f"{r['step']:>4} {100 * r['fraction']['ff']:>6.2f} {100 * r['fraction']['attn']:>6.2f} "
                     f"{r['forget']['top1']:>11.4f} {r['retain']['top1']:>11.4f} "
                     f"{r['forget']['loss']:>11.4f} {r['retain']['loss']:>11.4f}")
    return "\n".join(lines)
