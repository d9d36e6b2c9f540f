"""Which neurons to prune next, given their scores.

Default: the top fraction *globally* across layers (the paper's choice), among neurons not
yet pruned. Options: a per-layer quota, and whole attention heads scored by the mean or
median of their neurons' scores. Ties go to the lower flat index, so selection is
deterministic whatever the sort implementation.

Definitions: docs/method.md, "Selection".
"""

from __future__ import annotations

import torch

from selprune.errors import SelpruneError

HEAD_REDUCERS = {
    "mean": lambda s: s.mean(-1),
    "median": lambda s: s.median(-1).values,
}


def _top(scores: torch.Tensor, available: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k best available entries of a flat tensor (ties: lower index)."""
    idx = available.nonzero().squeeze(1)  # only available entries compete: a score of -inf
    order = torch.sort(scores[idx].double(), descending=True, stable=True).indices  # must not revive a pruned one
    out = torch.zeros_like(available)
    out[idx[order[:k]]] = True
    return out


def _count(frac: float, n: int) -> int:
    """How many of n to take for a fraction: rounded, but at least one when frac > 0, so a
    small fraction of few units (e.g. 2% of 8 heads) never silently prunes nothing."""
    return max(1, round(frac * n)) if frac > 0 else 0


def select(
    scores: torch.Tensor,
    frac: float,
    pruned: torch.Tensor | None = None,
    per_layer: bool = False,
    heads: str | None = None,
) -> torch.Tensor:
    """Bool mask (shape of `scores`) of the neurons to prune in this step.

    `scores`: `[n_layers, ...]`. `frac`: the fraction of *all* neurons (or heads) to add.
    `pruned`: neurons already pruned, never selected again. `heads`: "mean" or "median" to
    select whole heads of an attention score tensor `[n_layers, n_heads, d_head]`.
    """
    if not 0 <= frac <= 1:
        raise SelpruneError(f"fraction {frac} is outside [0, 1]; use e.g. 0.02 for 2%")
    pruned = torch.zeros_like(scores, dtype=torch.bool) if pruned is None else pruned.bool()
    if torch.isnan(scores).any():
        raise SelpruneError("scores contain NaN; check the statistics (zero tokens collected?)")
    if heads is not None:
        if heads not in HEAD_REDUCERS or scores.dim() != 3:
            raise SelpruneError(f"head selection needs attention scores [layers, heads, d_head] and heads in {list(HEAD_REDUCERS)}")
        head_scores = HEAD_REDUCERS[heads](scores.double())  # [n_layers, n_heads]
        head_pruned = pruned.all(-1)
        chosen = select(head_scores, frac, head_pruned, per_layer)
        return chosen[..., None].expand_as(scores) & ~pruned
    n_layers = scores.shape[0]
    if per_layer:
        per = scores[0].numel()
        k = _count(frac, per)
        rows = [_top(scores[i].reshape(-1), ~pruned[i].reshape(-1), k) for i in range(n_layers)]
        return torch.stack(rows).reshape(scores.shape)
    k = _count(frac, scores.numel())
    return _top(scores.reshape(-1), ~pruned.reshape(-1), k).reshape(scores.shape)
