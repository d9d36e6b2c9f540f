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
    skip = None if skip_ids is None else skip_ids.to(device)
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # n, top1, top10, n_skip, top1_skip, top10_skip
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)  # [batch, pos]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [batch, pos-1, vocab]
        target = ids[:, 1:]  # [batch, pos-1]
        loss_sum += nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).double()
        top10 = logits.topk(min(10, logits.shape[-1]), dim=-1).indices  # [batch, pos-1, 10]
        hit1 = top10[..., 0] == target
        hit10 = (top10 == target[..., None]).any(-1)
        keep = torch.ones_like(target, dtype=torch.bool) if skip is None else ~torch.isin(target, skip)
        sums += torch.stack([
            torch.tensor(target.numel(), device=device),
            hit1.sum(), hit10.sum(), keep.sum(), (hit1 & keep).sum(), (hit10 & keep).sum(),
        ]).double()
    n, t1, t10, ns, t1s, t10s = sums.tolist()
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
