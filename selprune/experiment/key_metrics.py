"""The stored notebooks' key figures, and the tolerance a re-execution must stay within.

nbval compares the printed cells marked `# NBVAL_CHECK_OUTPUT`, rounded to two decimals:
a figure that sits near a rounding boundary can flip on another CPU, and one that drifts
by less than the rounding step goes unnoticed. So `make notebooks` also records the key
figures of the stored run, unrounded, in `notebooks/key_metrics.json`, and after nbval
has re-executed the series a test compares the new run's figures with them under a
stated tolerance (`TOLERANCE`): accuracies may move by 0.02 (absolute, about one
standard error of a top-1 accuracy over 1,000 tokens), derived figures (relative drops,
recovery areas), which divide by small differences, by 0.05.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selprune.errors import SelpruneError
from selprune.experiment.rundir import read_json
from selprune.paths import REPO_ROOT, atomic_write_json

KEY_METRICS_FILE = REPO_ROOT / "notebooks" / "key_metrics.json"
TOLERANCE = {"accuracy": 0.02, "derived": 0.05}  # absolute; see the module docstring


def key_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> {"value", "kind"} for the figures a reader takes from the series:
    base top-1 of both datasets, each run's final top-1 of both and its forget drop at
    10% retain drop (and, relearned in 07, its final forget top-1 and recovery area), and
    each anamnesia arm's final forget top-1 and recovery area.
    A value may be None (e.g. a run that never reached 10% retain drop); it must stay None."""
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, kind: str) -> None:
        out[name] = {"value": value, "kind": kind}

    for side in ("forget", "retain"):
        put(f"base/{side}/top1", results["base"][side]["top1"], "accuracy")
    for run, r in sorted(results.get("runs", {}).items()):
        last = r["records"][-1]
        for side in ("forget", "retain"):
            put(f"{run}/final/{side}/top1", last[side]["top1"], "accuracy")
        put(f"{run}/forget_drop_at_retain_drop/0.10", r["forget_drop_at_retain_drop"]["0.10"], "derived")
        if r.get("relearn"):  # notebook 07: the run's output relearned
            put(f"{run}/relearn/final/forget/top1", r["relearn"]["curve"][-1]["forget"]["top1"], "accuracy")
            put(f"{run}/relearn/recovery_auc", r["relearn"]["recovery_auc"], "derived")
    experiments = {"anamnesia": results.get("anamnesia") or {}}
    experiments.update({f"anamnesia[{k}]": v for k, v in (results.get("anamnesia_variants") or {}).items()})
    for name, anamnesia in experiments.items():
        for arm, a in sorted(anamnesia.get("arms", {}).items()):
            put(f"{name}/{arm}/final/forget/top1", a["curve"][-1]["forget"]["top1"], "accuracy")
            put(f"{name}/{arm}/best/forget/top1", a["worst_case"]["max_forget_top1"], "accuracy")
            put(f"{name}/{arm}/recovery_auc", a["recovery_auc"], "derived")
        if anamnesia.get("control"):  # the unpruned control's end: it must hold where it started
            for side in ("forget", "retain"):
                put(f"{name}/control/{side}_end", anamnesia["control"][f"{side}_end"], "accuracy")
    return out


def compare(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]],
            tolerance: dict[str, float] = TOLERANCE) -> list[str]:
    """One line per key figure that moved beyond its tolerance, is missing, or changed
    between a number and None. Empty: the re-execution reproduces the stored run."""
    problems = []
    for name, exp in expected.items():
        if name not in actual:
            problems.append(f"{name}: stored {exp['value']}, missing now")
            continue
        e, a, tol = exp["value"], actual[name]["value"], tolerance[exp["kind"]]
        if (e is None) != (a is None):
            problems.append(f"{name}: stored {e}, now {a}")
        elif e is not None and abs(a - e) > tol:
            problems.append(f"{name}: stored {e:.4f}, now {a:.4f}, moved {abs(a - e):.4f} > tolerance {tol}")
    return problems


def record(results_file: Path, out: Path = KEY_METRICS_FILE) -> dict[str, dict[str, Any]]:
    """Write the key figures of a finished series (its results.json) as the stored ones."""
    metrics = key_metrics(_read(results_file))
    atomic_write_json(out, metrics)
    return metrics


def check(results_file: Path, stored: Path = KEY_METRICS_FILE) -> None:
    """Raise if the series in `results_file` moved beyond tolerance from the stored figures."""
    if not stored.is_file():
        raise SelpruneError(f"{stored} is missing; regenerate the stored notebooks with `make notebooks`")
    problems = compare(read_json(stored), key_metrics(_read(results_file)))
    if problems:
        raise SelpruneError("key figures moved beyond tolerance (a real change? then `make notebooks`):\n  "
                            + "\n  ".join(problems))


def _read(results_file: Path) -> dict[str, Any]:
    if not results_file.is_file():
        raise SelpruneError(f"{results_file} is missing; execute the notebook series first")
    return read_json(results_file)
