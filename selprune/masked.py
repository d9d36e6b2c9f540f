"""Masked-token evaluation for masked language models (BERT, RoBERTa, DistilBERT, ELECTRA).

A masked LM predicts hidden tokens from both sides, so next-token accuracy does not apply.
Instead a fixed, seeded `MASK_FRACTION` (15%) of the positions of every held-out window is
replaced by the mask token, and the model is scored on recovering the original tokens
there: top-1, top-10, their skip variants (targets among the dataset's most frequent
tokens left out) and cross-entropy, the same metrics and keys as `selprune.evaluate`.

The masked positions depend only on the window's shape and the seed (`mask_positions`),
never on the model, so an unpruned and a pruned model are scored on the same positions.
All chosen positions become the mask token (not BERT's 80/10/10 training mix: evaluation
asks what the model recovers, not what it was trained on), and at least one position per
window is masked.

Definitions: docs/method.md, "Masked language models".
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from selprune.errors import SelpruneError
from selprune.models import input_device
from selprune.vision import is_image_classifier

MASK_FRACTION = 0.15


def is_masked_lm(model: nn.Module) -> bool:
    """Whether `model` is a masked LM (a transformers `*ForMaskedLM` class)."""
    return type(model).__name__.endswith("ForMaskedLM")


def require_causal(model: nn.Module, what: str) -> None:
    """Refuse work that only a causal LM can do (next-token training losses, generation)."""
    name = type(model).__name__
    kind = "a masked LM" if is_masked_lm(model) else "an image classifier" if is_image_classifier(model) else None
    if kind is not None:
        evaluation = "masked-token" if is_masked_lm(model) else "per-class accuracy"
        raise SelpruneError(f"{what} needs a causal LM; {name} is {kind}. For it selprune does statistics, "
                            "scoring, pruning (runs ff, random, attn, attn_heads, both), "
                            f"{evaluation} evaluation and export")


def mask_positions(shape: tuple[int, int], frac: float = MASK_FRACTION, seed: int = 0) -> torch.Tensor:
    """`[n, window]` bool: which positions of each window are masked; exactly
    max(1, round(frac * window)) per window, chosen by a generator seeded with `seed`."""
    if not 0 < frac < 1:
        raise SelpruneError(f"mask fraction {frac} must be in (0, 1); the usual value is 0.15")
    n, window = shape
    k = max(1, round(frac * window))
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(window, generator=g) for _ in range(n)]) if n else \
        torch.empty(0, window, dtype=torch.long)
    mask = torch.zeros(n, window, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def mask_token_id(model: nn.Module, tokenizer=None) -> int:
    """The mask token id: from the tokenizer if given, else the model config."""
    mid = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if mid is None:
        mid = getattr(model.config, "mask_token_id", None)
    if mid is None:
        raise SelpruneError(f"{type(model).__name__} has no mask token (config.mask_token_id, or the tokenizer's); "
                            "masked evaluation needs a masked LM such as BertForMaskedLM")
    return int(mid)


def evaluate_masked(model: nn.Module, windows: torch.Tensor, mask_id: int, skip_ids: torch.Tensor | None = None,
                    batch_size: int = 8, frac: float = MASK_FRACTION, seed: int = 0, progress: bool = False,
                    desc: str = "evaluate masked") -> dict[str, float]:
    """Metrics over the masked positions of `windows` (`[n, window]` token ids); the keys of
    `selprune.evaluate.evaluate`. The model runs in eval mode and is left as it was."""
    mask = mask_positions(tuple(windows.shape), frac, seed)  # [n, window]
    skip = torch.empty(0, dtype=torch.long) if skip_ids is None else skip_ids.reshape(-1).long()
    was_training = model.training
    model.eval()
    device = input_device(model)
    counts = torch.zeros(5, dtype=torch.int64)  # top1, top10, n_skip, top1_skip, top10_skip
    loss_sum, n = 0.0, 0
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
                ids = windows[start : start + batch_size]  # [batch, window]
                m = mask[start : start + batch_size]
                inputs = ids.masked_fill(m, mask_id).to(device)
                logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits  # [batch, window, vocab]
                rows = logits[m.to(logits.device)].float()  # [masked, vocab]
                target = ids[m].to(rows.device)  # [masked]
                top10 = rows.topk(min(10, rows.shape[-1]), dim=-1).indices  # [masked, 10]
                hit1 = top10[:, 0] == target
                hit10 = (top10 == target[:, None]).any(-1)
                keep = ~torch.isin(target, skip.to(target.device))  # [masked]: not a skip target
                loss_sum -= float(torch.log_softmax(rows, -1).gather(1, target[:, None]).double().sum())
                n += len(target)
                counts += torch.stack([hit1.sum(), hit10.sum(), keep.sum(), (hit1 & keep).sum(),
                                       (hit10 & keep).sum()]).cpu()
    finally:
        model.train(was_training)
    t1, t10, ns, t1s, t10s = counts.tolist()
    loss = loss_sum / max(n, 1)
    return {"top1": t1 / max(n, 1), "top10": t10 / max(n, 1), "top1_skip": t1s / max(ns, 1),
            "top10_skip": t10s / max(ns, 1), "loss": loss, "perplexity": math.exp(loss), "tokens": n,
            "tokens_skip": ns}
