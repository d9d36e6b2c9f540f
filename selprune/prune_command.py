"""`selprune prune`: one pruning run from the shell, without notebooks, on one process or many.

    selprune prune [-f run.yaml] [-p NAME VALUE]... --out DIR [--device D] [--device-map MAP] [--save-model]
    torchrun --nproc_per_node N -m selprune.cli prune ...      # data parallel, N processes

The parameters are the fields of `selprune.loop.PruneConfig` (the YAML file holds a
mapping of them, `-p` overrides it); the run directory is `loop.RunDir`'s, so a rerun
resumes and a run directory made with other parameters is refused. Under torchrun every
process runs this same command: `distributed.init()` joins them, each loads the model,
and `run_pruning` splits the windows between them (README, "Scaling up").

Kept apart from `cli.py` so that the command's logic (parameter types, devices, the
process group) is not mixed into the parser module other commands share.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from selprune import distributed
from selprune.errors import SelpruneError
from selprune.loop import PruneConfig
from selprune.param_args import add_param_options, coerce_value, read_params

_LAUNCH_OPTIONS = {"device": "--device", "device_map": "--device-map", "run_dir": "--out", "out": "--out"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `prune` on the `selprune` command's subparsers."""
    fields = dataclasses.fields(PruneConfig)
    params = "\n".join(f"  {f.name:<17} (default: {f.default!r})" for f in fields)
    p = sub.add_parser(
        "prune",
        help="one pruning run (collect, score, prune, evaluate per step) into a run directory; works under torchrun",
        description="One pruning run into a run directory (config.json, step_NNN.safetensors, records.json), "
        "without notebooks. Launched by torchrun (e.g. torchrun --nproc_per_node 2 -m selprune.cli prune ...), "
        "the processes split the token windows and add their sums; rank 0 writes.",
        epilog="parameters (PruneConfig):\n" + params,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_param_options(p)
    p.add_argument("--out", required=True, help="run directory (resumed if it exists with the same parameters)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps; under torchrun, cuda means this process's GPU (LOCAL_RANK)")
    p.add_argument("--device-map", default=None,
                   help="hand placement to accelerate (e.g. auto: shard a model too big for one GPU over all GPUs); "
                   "one process only")
    p.add_argument("--save-model", action="store_true",
                   help="also write the pruned model to OUT/pruned-model (loadable by from_pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from(params: dict[str, Any]) -> PruneConfig:
    """A validated PruneConfig from `params`, each value checked against its field's type
    (YAML reads `1e-3` as text and `0` as an int: both become floats where a float is due)."""
    hints = typing.get_type_hints(PruneConfig)
    known = {f.name for f in dataclasses.fields(PruneConfig)}
    values = {}
    for name, value in params.items():
        if name not in known:
            hint = f"; it is the option {_LAUNCH_OPTIONS[name]}" if name in _LAUNCH_OPTIONS else ""
            raise SelpruneError(f"unknown parameter {name!r}{hint}; the parameters are {', '.join(sorted(known))}")
        values[name] = coerce_value(name, value, hints[name])
    cfg = PruneConfig(**values)
    cfg.validate()
    return cfg


def main(args: argparse.Namespace) -> int:
    """Run the command; a `SelpruneError` prints as one line and exits with status 2."""
    from selprune.loop import run_pruning
    from selprune.models import load_model, resolve_device
    from selprune.prune import export_pruned

    main_rank = True
    try:
        cfg = config_from(read_params(args.file, args.param))
        if distributed.init():
            main_rank = distributed.is_main()
            if args.device_map is not None:
                raise SelpruneError(
                    f"--device-map {args.device_map} with {distributed.world_size()} processes: each would spread its "
                    "own copy of the model over the same GPUs. Use torchrun (one GPU per process, model fits one "
                    "GPU) or --device-map in one process (model over all GPUs), not both"
                )
        device = distributed.rank_device(resolve_device(args.device))
        model, tok = load_model(cfg.model, cfg.dtype, device, device_map=args.device_map)
        records, pruner = run_pruning(cfg, args.out, model, tok, progress=not args.quiet and main_rank)
        if args.save_model:
            distributed.on_main(lambda: export_pruned(model, pruner, Path(args.out) / "pruned-model"))
    except SelpruneError as e:
        print(f"selprune: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
        return 2
    finally:
        distributed.cleanup()
    if main_rank:
        print(_table(records))
        print(f"\nrecords: {Path(args.out) / 'records.json'}")
    return 0


def _table(records: list[dict[str, Any]]) -> str:
    """One line per step: fractions pruned, then top-1 and loss on forget and retain."""
    head = f"{'step':>4} {'ff %':>6} {'attn %':>6} {'forget top1':>11} {'retain top1':>11} {'forget loss':>11} {'retain loss':>11}"
    lines = [head]
    for r in records:
        lines.append(f"{r['step']:>4} {100 * r['fraction']['ff']:>6.2f} {100 * r['fraction']['attn']:>6.2f} "
                     f"{r['forget']['top1']:>11.4f} {r['retain']['top1']:>11.4f} "
                     f"{r['forget']['loss']:>11.4f} {r['retain']['loss']:>11.4f}")
    return "\n".join(lines)
