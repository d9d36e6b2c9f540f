"""The anamnesia index: how fast retraining brings a removed capability back (pure maths).

Pruning that merely *hides* a capability is undone by a little fine-tuning; pruning that
removes it should need about as much fine-tuning as learning it afresh. A retraining
*curve* is a list of records `{step, tokens, forget: {...}, retain: {...}}` at the steps
of `log_schedule`. From it: the **anamnesia index** at fraction q, the first step at
which forget top-1 has regained q of what pruning removed (`anamnesia_index`), and
`recovery_auc`, the whole recovery curve in one number. `match_random_step` picks the
random-pruning control with matched retain damage (docs/method.md, "Retraining and the
anamnesia index"). Nothing here trains: `selprune.experiment.retrain` makes the curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selprune.errors import SelpruneError
from selprune.selectivity import record_drop

Curve = list[dict[str, Any]]  # retrain records, one per scheduled evaluation


def log_schedule(steps: int) -> list[int]:
    """Evaluation steps: 0, 1, 2, 4, 8, ... below `steps`, then `steps` itself.

    Recovery is usually fast at first and slow later, so log spacing resolves the early
    part of the curve at a cost of only ~log2(steps) evaluations.
    """
    if not isinstance(steps, int) or steps < 1:
        raise SelpruneError(f"retrain steps={steps!r}; need an integer of at least 1")
    out, s = [0], 1
    while s < steps:
        out.append(s)
        s *= 2
    out.append(steps)
    return out


def _recovered(curve: Curve, base: float, pruned: float, metric: str) -> list[float]:
    """Per record, the fraction of the pruning loss regained, clipped to [0, 1]."""
    return [min(max((r["forget"][metric] - pruned) / (base - pruned), 0.0), 1.0) for r in curve]


def _check_curve(curve: Curve) -> None:
    if not curve:
        raise SelpruneError("empty retrain curve: nothing to compute an index from")
    steps = [r["step"] for r in curve]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise SelpruneError(f"retrain curve steps must increase strictly; got {steps}")


def recovery_auc(curve: Curve, base_top1: float, pruned_top1: float, metric: str = "top1") -> float:
    """Area under the recovered-fraction curve, normalised to [0, 1].

    Recovered fraction = (forget metric - pruned) / (base - pruned), clipped to [0, 1];
    the area is taken by the trapezoid rule over the actual step numbers (not the
    evaluation index, which is log-spaced) and divided by the span of steps. 1: all of it
    back at once; 0: nothing back by the last step; linear recovery to 1 at the last step
    gives 0.5. When pruning removed nothing (base <= pruned) it is 1 by convention,
    matching an anamnesia index of 0.
    """
    _check_curve(curve)
    if base_top1 - pruned_top1 <= 0:
        return 1.0
    r = _recovered(curve, base_top1, pruned_top1, metric)
    s = [float(x["step"]) for x in curve]
    span = s[-1] - s[0]
    if span == 0:
        return r[0]
    area = sum((s[i] - s[i - 1]) * (r[i] + r[i - 1]) / 2 for i in range(1, len(s)))
    return area / span


def anamnesia_index(
    curve: Curve,
    base_top1: float,
    pruned_top1: float,
    fractions: Sequence[float] = (0.5, 0.9),
    metric: str = "top1",
) -> dict[str, Any]:
    """Steps (and tokens) of retraining until forget top-1 has regained each fraction q of
    what pruning removed: the first step where top1 >= pruned + q * (base - pruned).

    Evaluations are sparse (log-spaced), so the crossing is linearly interpolated in step
    count (and tokens) between the two evaluations that bracket it: the last one below
    the threshold and the first one at or above it. "First" is literal: a noisy curve
    that touches the threshold once counts from then. A threshold met at the first
    evaluation gives that evaluation's step (0).

    Not reached within the budget: the index is *censored*, never a bare "not reached":
    `step`/`tokens` None, `censored` True, `bound` = {steps, tokens} of the whole budget
    (the index is larger than that), `text` "> 64 steps, 16k tokens", and
    `recovered_final`, the fraction regained by the last evaluation. If pruning removed nothing (base <= pruned, e.g. the
    unpruned control) the index is 0 for every q and `note` says so, instead of dividing
    by zero. Keys of `thresholds` are the fractions as strings ("0.5"), for JSON.
    """
    _check_curve(curve)
    if bad := [q for q in fractions if not 0 < q <= 1]:
        raise SelpruneError(f"anamnesia fractions {bad} are outside (0, 1]; use e.g. 0.5 and 0.9")
    removed = base_top1 - pruned_top1
    n = curve[-1]["step"]
    out: dict[str, Any] = {"metric": metric, "base": base_top1, "pruned": pruned_top1, "removed": removed,
                           "total_steps": n, "total_tokens": curve[-1]["tokens"], "thresholds": {},
                           "recovery_auc": recovery_auc(curve, base_top1, pruned_top1, metric), "note": None}
    if removed <= 0:
        out["note"] = (f"pruning removed no forget {metric} (base {base_top1:.4f} <= pruned {pruned_top1:.4f}): "
                       "nothing to recover; index 0 and recovery_auc 1 by convention")
        out["thresholds"] = {f"{q:g}": _nothing_removed(q, base_top1) for q in fractions}
        return out
    ys = [r["forget"][metric] for r in curve]
    recovered = _recovered(curve, base_top1, pruned_top1, metric)
    bound = {"steps": n, "tokens": curve[-1]["tokens"]}
    for q in fractions:
        target = pruned_top1 + q * removed
        hit: dict[str, Any] = {"fraction": q, "target": target, "step": None, "tokens": None, "censored": True,
                               "bound": bound, "text": censored_text(bound), "recovered_final": recovered[-1],
                               "note": f"not reached within {n} steps (recovered {recovered[-1]:.3f} by the end, "
                                       f"at most {max(recovered):.3f})"}
        for i, y in enumerate(ys):
            if y < target:
                continue
            if i == 0:
                hit.update(step=curve[0]["step"], tokens=curve[0]["tokens"])
            else:
                w = (target - ys[i - 1]) / (y - ys[i - 1])  # y > ys[i-1] since ys[i-1] < target <= y
                a, b = curve[i - 1], curve[i]
                hit.update(step=a["step"] + w * (b["step"] - a["step"]),
                           tokens=a["tokens"] + w * (b["tokens"] - a["tokens"]))
            hit.update(censored=False, bound=None, text=f"{hit['step']:.0f} steps, {_k(hit['tokens'])} tokens",
                       note=None)
            break
        out["thresholds"][f"{q:g}"] = hit
    return out


def _nothing_removed(q: float, base_top1: float) -> dict[str, Any]:
    return {"fraction": q, "target": base_top1, "step": 0, "tokens": 0, "censored": False, "bound": None,
            "recovered_final": 1.0, "text": "0 steps (nothing removed)", "note": "nothing removed"}


def _k(tokens: float) -> str:
    return f"{tokens / 1000:.3g}k" if tokens >= 1000 else f"{tokens:.0f}"


def censored_text(bound: dict[str, int]) -> str:
    """A censored index as a reader writes it: "> 64 steps, 16.4k tokens"."""
    return f"> {bound['steps']} steps, {_k(bound['tokens'])} tokens"


def worst_case(curve: Curve, base_top1: float, pruned_top1: float, metric: str = "top1") -> dict[str, Any]:
    """What a relearning attacker gets at best over the whole trajectory, not just at its end:
    the highest forget `metric` and the lowest forget loss reached, with their steps, and
    the largest recovered fraction (1 when pruning removed nothing)."""
    _check_curve(curve)
    best = max(curve, key=lambda r: (r["forget"][metric], -r["step"]))
    lowest = min(curve, key=lambda r: (r["forget"]["loss"], r["step"]))
    removed = base_top1 - pruned_top1
    return {"max_forget_" + metric: best["forget"][metric], "max_forget_" + metric + "_step": best["step"],
            "min_forget_loss": lowest["forget"]["loss"], "min_forget_loss_step": lowest["step"],
            "max_recovered": max(_recovered(curve, base_top1, pruned_top1, metric)) if removed > 0 else 1.0}


def match_random_step(selective_records: list[dict[str, Any]], random_records: list[dict[str, Any]],
                      selective_step: int | None = None) -> int:
    """The step of the random-pruning run whose relative retain top-1 drop (against its own
    step 0) is closest to the selective run's at `selective_step` (default: its last);
    ties go to the earlier step. Only pruned steps (>= 1) compete when the run has any: a
    selective run with no retain damage would otherwise be "matched" by the unpruned model,
    and the random control would prune nothing. Both runs come from `run_pruning` records."""
    if not selective_records or not random_records:
        raise SelpruneError("matching needs the records of both pruning runs (selective and random)")
    sel = record_at(selective_records, selective_step)
    want = record_drop(sel, selective_records[0], "retain")
    candidates = [r for r in random_records if r["step"] >= 1] or random_records
    return min(candidates, key=lambda r: (abs(record_drop(r, random_records[0], "retain") - want),
                                          r["step"]))["step"]


def record_at(records: list[dict[str, Any]], step: int | None) -> dict[str, Any]:
    if step is None:
        return records[-1]
    for r in records:
        if r["step"] == step:
            return r
    raise SelpruneError(f"pruning step {step} is not among the run's steps {[r['step'] for r in records]}")
