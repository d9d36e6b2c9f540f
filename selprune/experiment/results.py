"""results.json: everything a series' run directory holds, summarised in one file.

Assembled from the folder's files alone (`assemble`), so any step can rewrite it and it
is the same whichever wrote it last. It is identical for identical parameters and seed on
CPU fp32: wall-clock seconds go to timings.json instead (`split_timings`), and neither
the run directory's path nor anything else that differs between machines is recorded
beyond the `environment` block.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from selprune.experiment.compare import RELEARN_FILE, baseline_config
from selprune.experiment.config import Config
from selprune.experiment.loop import run_config
from selprune.experiment.rundir import RunDir
from selprune.experiment.runs import RUN_KINDS
from selprune.selectivity import summarize

PROBES_FILE = "probes.json"  # Series.probes: the series' (unpruned model) or a run's (its last step)


def split_timings(obj: Any, path: str = "") -> tuple[Any, dict[str, Any]]:
    """Move every "seconds" entry (and every peak memory) out of a nested result, keyed
    by its path, so that results.json is identical between runs with the same parameters
    and seed (wall-clock times and memory peaks never are) while timings.json keeps them."""
    timings: dict[str, Any] = {}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "seconds":
                timings[path or "."] = v
                continue
            if k == "peak_memory_mb":
                timings[f"{path}/{k}"] = v
                continue
            out[k], sub = split_timings(v, f"{path}/{k}")
            timings.update(sub)
        return out, timings
    if isinstance(obj, list):
        out_list = []
        for i, v in enumerate(obj):
            item, sub = split_timings(v, f"{path}/{i}")
            out_list.append(item)
            timings.update(sub)
        return out_list, timings
    return obj, timings


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Versions, device, dtype and git commit, for results.json."""
    import transformers

    import selprune

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "selprune": selprune.__version__, "git_commit": commit, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def finished_runs(run_dir: RunDir) -> dict[str, list[dict[str, Any]]]:
    """Run name -> step records, for every pruning run in the folder with any, in registry order."""
    return {r: rec for r in RUN_KINDS if (rec := RunDir(run_dir.path / r).records())}


def assemble(cfg: Config, run_dir: RunDir, model: torch.nn.Module) -> dict[str, Any]:
    """Results of whatever the run directory holds so far (before the timings are split off)."""
    runs = {run: {"config": _config(cfg, run), "records": records, **summarize(records),
                  "compute": records[-1].get("compute"), "relearn": _relearn(run_dir, run)}
            for run, records in finished_runs(run_dir).items()}
    return {
        # not run_dir: where the run lives is no result (identical runs in two folders agree)
        "params": {k: v for k, v in asdict(cfg).items() if k != "run_dir"},
        "environment": environment(model),
        "base": run_dir.read_json("base.json") if run_dir.has("base.json") else None,
        "runs": runs,
        "anamnesia": run_dir.read_json("anamnesia.json") if run_dir.has("anamnesia.json") else None,
        # Series.probes: the unpruned model's and each pruning run's last step's, where made
        "probes": {name: rd.read_json(PROBES_FILE) for name, rd in
                   (("unpruned", run_dir), *((r, RunDir(run_dir.path / r)) for r in RUN_KINDS)) if rd.has(PROBES_FILE)},
        # relearning variants (Series.anamnesia(**variant)), by file name
        "anamnesia_variants": {f.stem.removeprefix("anamnesia__"): run_dir.read_json(f.name)
                               for f in sorted(run_dir.path.glob("anamnesia__*.json"))},
    }


def _config(cfg: Config, run: str) -> dict[str, Any]:
    kind = RUN_KINDS[run]
    return baseline_config(cfg, kind) if kind.method else run_config(cfg, kind)


def _relearn(run_dir: RunDir, run: str) -> dict[str, Any] | None:
    """The run's relearning record (notebook 07), if it has one."""
    rd = RunDir(run_dir.path / run)
    return rd.read_json(RELEARN_FILE) if rd.has(RELEARN_FILE) else None


def write_results(cfg: Config, run_dir: RunDir, model: torch.nn.Module) -> dict[str, Any]:
    """Rewrite results.json and timings.json from the folder's files; returns the results."""
    results, timings = split_timings(assemble(cfg, run_dir, model))
    run_dir.write_json("timings.json", timings)
    run_dir.write_json("results.json", results)
    return results
