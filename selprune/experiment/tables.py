"""The tables the notebooks print: the paper-style results table, the anamnesia table,
and how far importance functions agree. Each takes plain results and returns a DataFrame."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from selprune.experiment.runs import RUN_KINDS
from selprune.selectivity import record_drop, summarize

TABLE_METRICS = ("top1", "top10", "top1_skip", "top10_skip", "loss")


def results_table(runs: dict[str, list[dict[str, Any]]], dataset_names: dict[str, str]) -> pd.DataFrame:
    """Per run and dataset: base and final metrics, the fraction pruned and the top-1
    drops in percent (the paper's table). `dataset_names`: side -> dataset name."""
    rows = []
    for run, records in runs.items():
        base, last = records[0], records[-1]
        for side in ("forget", "retain"):
            row = {"run": run, "dataset": f"{side} ({dataset_names[side]})",
                   "pruned": last["fraction"][RUN_KINDS[run].axis]}
            for m in TABLE_METRICS:
                row[f"base {m}"] = base[side][m]
                row[m] = last[side][m]
            row["top1 drop %"] = 100 * record_drop(last, base, side, "top1")
            row["top1_skip drop %"] = 100 * record_drop(last, base, side, "top1_skip")
            rows.append(row)
    return pd.DataFrame(rows)


def anamnesia_table(result: dict[str, Any]) -> pd.DataFrame:
    """Per relearning arm: where it started, its damage, steps and tokens to each recovery
    fraction (or the censored bound "> N steps, T tokens"), the fraction recovered at the
    end, the worst case over the trajectory, and the recovery AUC."""
    rows = []
    for arm, a in result["arms"].items():
        step = "-" if a["pruned_step"] is None else str(a["pruned_step"])  # the control prunes nothing (not NaN)
        row = {"arm": arm, "pruned step": step, "forget top1 at start": a["curve"][0]["forget"]["top1"],
               "retain drop %": 100 * a["retain_drop"], "forget drop %": 100 * a["forget_drop"]}
        for q, v in a["index"].items():
            row[f"to {float(q):.0%}"] = v["text"]
        row["recovered at end"] = next(iter(a["index"].values()))["recovered_final"]
        row["best forget top1"] = a["worst_case"]["max_forget_top1"]
        row["recovery AUC"] = a["recovery_auc"]
        rows.append(row)
    return pd.DataFrame(rows)


def control_line(result: dict[str, Any]) -> str:
    """The control's start and end, and whether it held (relearning.control_check)."""
    c = result["control"]
    verdict = "holds" if c["holds"] else f"DRIFTS (beyond {c['tolerance']})"
    return (f"unpruned control: forget top1 {c['forget_start']:.2f} -> {c['forget_end']:.2f}, "
            f"retain top1 {c['retain_start']:.2f} -> {c['retain_end']:.2f}: {verdict}")


def agreement(top: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Jaccard overlap of the top sets (bool masks) chosen by each importance function."""
    names = list(top)
    rows = [[float((top[a] & top[b]).sum() / max(int((top[a] | top[b]).sum()), 1)) for b in names] for a in names]
    return pd.DataFrame(rows, index=names, columns=names)


def methods_table(runs: dict[str, list[dict[str, Any]]], relearned: dict[str, dict[str, Any]] | None = None,
                  ) -> pd.DataFrame:
    """Per run (pruning or baseline): the headline (forget top-1 drop at 10% retain top-1
    drop, or "-" when retain never fell that far), the drops at the end, the method's
    compute (forward-equivalent tokens, backward tokens, seconds, peak memory; evaluations
    not counted) and, given `relearned` (run -> relearning record), steps to 50% recovery
    or the censored bound and the fraction recovered at the end."""
    rows = []
    for run, records in runs.items():
        s, kind = summarize(records), RUN_KINDS[run]
        head = s["forget_drop_at_retain_drop"]["0.10"]
        compute = records[-1].get("compute") or {}
        row = {"run": run, "kind": "floor" if kind.random else "baseline" if kind.method else "pruning",
               "forget drop @10% retain %": "-" if head is None else round(100 * head, 1),
               "forget drop % (end)": 100 * s["final_drop"]["forget"],
               "retain drop % (end)": 100 * s["final_drop"]["retain"],
               "fwd-equiv tokens": None if compute.get("forward_equiv_tokens") is None else
               round(compute["forward_equiv_tokens"]),
               "backward tokens": compute.get("backward_tokens"),
               "seconds": compute.get("seconds"), "peak MB": compute.get("peak_memory_mb")}
        rel = (relearned or {}).get(run)
        if relearned is not None:
            idx = rel["index"]["0.5"] if rel else None
            row["relearn to 50%"] = idx["text"] if idx else "-"
            row["recovered at end"] = idx["recovered_final"] if idx else None
        rows.append(row)
    return pd.DataFrame(rows)


def probes_table(probes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per probed model (`Series.probe_all`): the fraction of code-probe
    continuations that parse, the membership-inference ROC AUCs (seen against held-out
    forget windows: 0.5 is chance), and each lm-eval task's accuracy where run."""
    rows = []  # none: an empty table (a masked LM is not probed)
    for name, p in probes.items():
        row: dict[str, Any] = {"model": name, "code parses": p["code_probe"]["fraction"]}
        row.update({f"MIA AUC {k}": v for k, v in p["membership"]["auc"].items()})
        for task, m in (p.get("lm_eval") or {}).get("tasks", {}).items():
            row[f"{task.removeprefix('selprune_')} acc"] = m.get("acc")
        rows.append(row)
    return pd.DataFrame(rows)
