"""How selective a pruning trajectory is: forget and retain relative to the unpruned model.

A run is a list of step records (record 0: the unpruned model; each record holds
`forget` and `retain` metric dicts). Every summary here reads those records only, so
it applies alike to pruning runs, sweeps and any other trajectory with that shape
(docs/method.md, "Selectivity summaries").
"""

from __future__ import annotations

from typing import Any

import numpy as np

RETAIN_DROPS = (0.05, 0.10, 0.20)  # where the forget drop at matched retain damage is read
SIDES = ("forget", "retain")
_TINY = 1e-12  # a base metric of 0 would divide by zero: a relative value is then 0/tiny


def relative_drop(value: float, base: float) -> float:
    """1 - value / base: the share of `base` that was lost (negative when it rose)."""
    return 1 - value / max(base, _TINY)


def record_drop(record: dict[str, Any], base: dict[str, Any], side: str, metric: str = "top1") -> float:
    """`relative_drop` of one side's metric between two step records."""
    return relative_drop(record[side][metric], base[side][metric])


def relative_curves(records: list[dict[str, Any]], metric: str = "top1") -> dict[str, np.ndarray]:
    """Forget and retain `metric` relative to the unpruned model (record 0), per step."""
    base = records[0]
    return {side: np.array([r[side][metric] / max(base[side][metric], _TINY) for r in records]) for side in SIDES}


def selectivity_area(records: list[dict[str, Any]], metric: str = "top1") -> float:
    """Normalised area between the retain and forget curves, over the steps.

    Orientation (fixed): the mean over the pruning trajectory, by the trapezoid rule over
    step index, of (retain / retain_base) - (forget / forget_base). Positive means forget
    fell faster than retain (selective); 0 means no selectivity; 1 would mean forget gone
    at once while retain stayed whole.
    """
    if len(records) < 2:
        return 0.0
    c = relative_curves(records, metric)
    gap = c["retain"] - c["forget"]
    area = float(((gap[1:] + gap[:-1]) / 2).sum())  # trapezoid rule (np.trapezoid needs numpy >= 2)
    return area / (len(records) - 1)


def forget_drop_at_retain_drop(records: list[dict[str, Any]], retain_drop: float = 0.10,
                               metric: str = "top1") -> float | None:
    """Relative drop of forget `metric` where retain's relative drop reaches `retain_drop`,
    linearly interpolated between steps; None if the run never reaches that retain drop."""
    c = relative_curves(records, metric)
    r_drop, f_drop = 1 - c["retain"], 1 - c["forget"]
    for i in range(1, len(records)):
        lo, hi = r_drop[i - 1], r_drop[i]
        if hi >= retain_drop > lo or (hi >= retain_drop and i == 1 and lo >= retain_drop):
            w = 0.0 if hi == lo else (retain_drop - lo) / (hi - lo)
            return float(f_drop[i - 1] + w * (f_drop[i] - f_drop[i - 1]))
    return None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Selectivity summaries of one run, for results.json and the leaderboard.

    The headline is `forget_drop_at_retain_drop["0.10"]`: the relative drop of forget
    top-1 where retain top-1 has dropped by 10% (interpolated along the run's curve).
    It is None when the run never got that far; `retain_drop_max` and `final_drop` then
    say how far it did get, so a missing number is never read as 0.
    """
    c = relative_curves(records)
    return {
        "selectivity_area": selectivity_area(records),
        "forget_drop_at_retain_drop": {f"{d:.2f}": forget_drop_at_retain_drop(records, d) for d in RETAIN_DROPS},
        "retain_drop_max": float(1 - c["retain"].min()),
        "final_drop": {side: float(1 - c[side][-1]) for side in SIDES},
    }


def should_stop(records: list[dict[str, Any]], max_retain_drop: float | None,
                stop_forget_top1: float | None) -> bool:
    """The stop rule of a pruning run, read off its records so far: forget top-1 fell below
    `stop_forget_top1`, or retain top-1 fell by more than `max_retain_drop` (relative to
    record 0). None switches a rule off. The loop asks it before every step, and a sweep
    asks it to tell a finished run from an interrupted one."""
    last = records[-1]
    if stop_forget_top1 is not None and last["forget"]["top1"] < stop_forget_top1:
        return True
    if max_retain_drop is not None and len(records) > 1:
        return record_drop(last, records[0], "retain") > max_retain_drop
    return False
