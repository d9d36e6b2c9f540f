"""Next-token evaluation: top-1, top-10, their "skip" variants, cross-entropy, perplexity.

Every target position in the windows counts toward the token budget (the reference
counted only non-skip tokens). "Skip" accuracies leave out targets among the dataset's k
most frequent tokens, since predicting "the" or "    " says little about a capability.
Perplexity is exp(mean cross-entropy), not a per-token average of exponentials.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

METRICS = ("top1", "top10", "top1_skip", "top10_skip", "loss", "perplexity")


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    skip_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Metrics over all next-token targets of `windows` (`[n, window]` token ids).

    The model runs in eval mode (no dropout) and is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _evaluate(model, windows, skip_ids, batch_size, progress, desc)
    finally:
        model.train(was_training)


def _evaluate(model: nn.Module, windows: torch.Tensor, skip_ids: torch.Tensor | None, batch_size: int,
              progress: bool, desc: str) -> dict[str, float]:
    device = next(model.parameters()).device
    skip_table = None  # [vocab] bool: is this token id a skip id (a lookup, faster than torch.isin)
    n = 0  # targets, counted on the host
    sums = torch.zeros(5, dtype=torch.int64, device=device)  # top1, top10, n_skip, top1_skip, top10_skip
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    work = None  # [batch * pos, vocab] float32 scratch
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)  # [batch, pos]
        logits = model(input_ids=ids, use_cache=False).logits  # [batch, pos, vocab]
        b, p, v = logits.shape
        # Every row of the logits as they are (a view, no copy, when float32 and contiguous);
        # the last position, which has no target, is dropped from the small per-row results.
        flat = logits.float().reshape(b * p, v)
        nxt = ids.roll(-1, dims=1)  # nxt[:, i] = ids[:, i + 1] (the last column wraps, and is dropped)
        target = ids[:, 1:]  # [batch, pos-1]
        if work is None or work.shape[0] < b * p or work.shape[1] != v:
            work = torch.empty(b * p, v, dtype=torch.float32, device=device)
        w = work[: b * p]  # one logits-sized buffer reused across batches (a fresh one per batch costs page faults)
        # rank of the target = number of logits above its own (no sort): a top-k hit iff rank < k
        # (ties with the target count in its favour); a NaN target logit is never a hit
        target_logit = flat.gather(1, nxt.reshape(-1, 1))  # [batch * pos, 1]
        rank = torch.gt(flat, target_logit, out=w).sum(1).view(b, p)[:, :-1]  # float32 0/1 sums: exact
        valid = ~target_logit.isnan().view(b, p)[:, :-1]
        hit1, hit10 = (rank < 1) & valid, (rank < 10) & valid
        # cross-entropy = -log_softmax at the target, computed into the same buffer
        logp = torch.log_softmax(flat, -1, out=w).gather(1, nxt.reshape(-1, 1))  # [batch * pos, 1]
        loss_sum -= logp.view(b, p)[:, :-1].double().sum()
        if skip_ids is not None and skip_table is None:
            skip = skip_ids.to(device)
            skip_table = torch.zeros(v, dtype=torch.bool, device=device)
            skip_table[skip[(skip >= 0) & (skip < v)]] = True  # other ids match no target anyway
        keep = torch.ones_like(target, dtype=torch.bool) if skip_table is None else ~skip_table[target]
        n += target.numel()
        sums += torch.stack([hit1.sum(), hit10.sum(), keep.sum(), (hit1 & keep).sum(), (hit10 & keep).sum()])
    t1, t10, ns, t1s, t10s = sums.tolist()  # the only device-to-host transfer, with loss_sum's
    loss = float(loss_sum) / max(n, 1)
    return {
        "top1": t1 / max(n, 1),
        "top10": t10 / max(n, 1),
        "top1_skip": t1s / max(ns, 1),
        "top10_skip": t10s / max(ns, 1),
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": int(n),
        "tokens_skip": int(ns),
    }
