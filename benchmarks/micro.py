"""Micro-benchmarks of the two hot paths, robust to a busy machine (issue #7).

Usage::

    .venv/bin/python benchmarks/micro.py [--compare REF] [--threads T] [--repeats N] [--only hook|evaluate]

- `hook ...`: one call of the statistics collector's forward pre-hook
  (`StatsCollector._hook` -> `_add`) on a synthetic fp32 (or bf16) activation of
  `[tokens, width]`, FF-like (2048 x 1536, the embedded model's FF width at 8 windows of
  256) and attention-like (2048 x 576), plain, with pruned neurons, and with a histogram.
- `evaluate ...`: `selprune.evaluate.evaluate` on 2 batches of 8 x 256 tokens, per batch,
  with a fake model whose forward returns fixed logits (vocabulary 49152, as the
  embedded model), so only the metric computation is timed, not the model (a class that
  `evaluate` does not know as head(body): it takes the full-forward path, one chunk per batch).

Each line is the median of `--repeats` calls in milliseconds, the versions timed in
alternation (old, new, old, new, ...). `--compare REF` also
times the versions of `selprune/stats.py` and `selprune/evaluate.py` at git revision REF
(e.g. `HEAD`, loaded with `git show`), or in folder REF, for a before/after table. Runs on one thread by
default: single-threaded kernels suffer far less from other processes than two threads
that must wait for each other.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from selprune.sites import NeuronSites

ROOT = Path(__file__).resolve().parent.parent


def load_at(ref: str, relpath: str, name: str) -> types.ModuleType:
    """Import the file `relpath` as it is at git revision `ref` (or, if `ref` is a folder,
    the file of the same name in it), under module name `name`."""
    if Path(ref).is_dir():
        source = (Path(ref) / Path(relpath).name).read_text()
    else:
        source = subprocess.run(["git", "show", f"{ref}:{relpath}"], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="selprune-micro-")) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, calls alternating between them
    (a, b, a, b, ...) so that a change in background load hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: first touch of buffers, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


# --------------------------------------------------------------------------- the hook
def hook_cases(stats_mods: dict[str, types.ModuleType], repeats: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for label, width, dtype, pruned, bins in (
        ("hook ff 2048x1536 fp32", 1536, torch.float32, False, 0),
        ("hook attn 2048x576 fp32", 576, torch.float32, False, 0),
        ("hook ff 2048x1536 fp32, pruned neurons", 1536, torch.float32, True, 0),
        ("hook ff 2048x1536 bf16", 1536, torch.bfloat16, False, 0),
        ("hook ff 2048x1536 fp32, 64-bin histogram", 1536, torch.float32, False, 64),
    ):
        sites = NeuronSites("micro", [nn.Linear(width, 1)], [nn.Linear(576, 1)], 9, None)
        removed = None
        if pruned:
            removed = {"ff": torch.zeros(1, width, dtype=torch.bool), "attn": torch.zeros(1, 9, 64, dtype=torch.bool)}
            removed["ff"][0, ::7] = True
        kind = "ff" if width == 1536 else "attn"
        module = sites.modules(kind)[0]
        x = (torch.randn(1, 2048, width, generator=g) ** 3 * 0.3).to(dtype)  # heavy-tailed, like activations
        fns = {}
        for name, mod in stats_mods.items():
            collector = mod.StatsCollector(sites, removed, hist_bins=bins)
            hook = collector._hook(kind, 0)
            fns[name] = lambda h=hook, m=module, x=x: h(m, (x,))
        out[label] = interleaved_ms(fns, repeats)
    return out


# ----------------------------------------------------------------------- evaluation
class FixedLogits(nn.Module):
    """A stand-in LM whose forward returns the first rows of a fixed logits tensor."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> types.SimpleNamespace:
        b, p = input_ids.shape
        return types.SimpleNamespace(logits=self.logits[:b, :p])


def evaluate_cases(eval_mods: dict[str, types.ModuleType], repeats: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    vocab, batch, window, n_batches = 49152, 8, 256, 2  # 4096 tokens: the default eval_tokens
    logits = torch.randn(batch, window, vocab, generator=g) * 3
    windows = torch.randint(0, vocab, (n_batches * batch, window), generator=g)
    skip = torch.randint(0, vocab, (50,), generator=g).unique()
    out = {}
    for label, lg in (("evaluate, per 8x256 batch, fp32 logits", logits),
                      ("evaluate, per 8x256 batch, bf16 logits", logits.bfloat16())):
        model = FixedLogits(lg)
        ms = interleaved_ms({name: lambda m=model, e=mod: e.evaluate(m, windows, skip, batch, progress=False)
                             for name, mod in eval_mods.items()}, repeats)
        out[label] = {name: t / n_batches for name, t in ms.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", metavar="REF", help="also time stats.py and evaluate.py at this git revision (or in this folder)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=20, help="calls per median for the hook (evaluate: a quarter)")
    p.add_argument("--only", choices=("hook", "evaluate"), help="time only these cases")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import selprune.evaluate
    import selprune.stats

    stats_mods, eval_mods = {"now": selprune.stats}, {"now": selprune.evaluate}
    if args.compare:
        stats_mods[args.compare] = load_at(args.compare, "selprune/stats.py", "_micro_stats_ref")
        eval_mods[args.compare] = load_at(args.compare, "selprune/evaluate.py", "_micro_evaluate_ref")
    table = {}
    if args.only != "evaluate":
        table.update(hook_cases(stats_mods, args.repeats))
    if args.only != "hook":
        table.update(evaluate_cases(eval_mods, max(args.repeats // 4, 3)))
    names = list(stats_mods)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}; median ms per call")
    print(f"{'case':44s}" + "".join(f"{n:>12s}" for n in names[::-1]) + ("    speed-up" if len(names) > 1 else ""))
    for label, row in table.items():
        cells = "".join(f"{row[n]:12.2f}" for n in names[::-1])
        ratio = f"{row[names[1]] / row['now']:11.2f}x" if len(names) > 1 else ""
        print(f"{label:44s}{cells}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
