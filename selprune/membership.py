"""Membership inference on the forget data: can one tell the windows a method saw from others?

Unlearning should not leave a trace that tells seen text from unseen text of the same kind.
Each window gets four scores, all oriented so that higher means "seen" (a member):
- LOSS: minus the mean token NLL (Yeom et al. 2018);
- zlib: the mean token log-likelihood divided by the zlib-compressed length in bytes of
  the window's decoded text (Carlini et al. 2021): text that is merely simple compresses well;
- Min-K%: the mean of the lowest `k` fraction of the token log-probabilities (Shi et al. 2023);
- Min-K%++: the same mean over the per-token (log p(x_t) - mu_t) / sigma_t, where mu_t and
  sigma_t are the mean and standard deviation of log p(z) for z drawn from the model's
  own next-token distribution at t (Zhang et al. 2024, arXiv 2404.02936): a token is
  judged against what the model expected there, not in absolute terms.
The lowest-k means take floor(k * targets) tokens, at least one.

The ROC AUC of each score, seen windows positive (Data.forget_train) against held-out ones
(Data.forget_test), is the Mann-Whitney statistic: the probability that a random seen
window scores above a random unseen one, ties counting half. 0.5 is chance.

Forward passes only (inference mode), batched; the LM head runs over chunks of rows as in
`selprune.evaluate`, so the full-vocabulary logits of a batch never exist at once.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune.errors import SelpruneError
from selprune.evaluate import _body_and_head, _logit_chunks
from selprune.models import input_device

SCORES = ("loss", "zlib", "mink", "mink++")
_ROWS = 256  # rows of the log-softmax at a time (50 MiB of float32 for a 49k vocabulary)
K = 0.2  # the lowest fraction of tokens for Min-K% and Min-K%++ (both papers' default)


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half:
    the area under the ROC curve, from average ranks (Mann-Whitney U)."""
    if not positive or not negative:
        raise SelpruneError(f"ROC AUC needs scores of both classes, got {len(positive)} positive and "
                            f"{len(negative)} negative; give windows of both")
    values = sorted([(float(v), 1) for v in positive] + [(float(v), 0) for v in negative])
    if any(math.isnan(v) for v, _ in values):
        raise SelpruneError("a membership score is NaN; check the model's outputs for non-finite logits")
    rank_sum, i = 0.0, 0
    while i < len(values):
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1..j share their average
        rank_sum += mean_rank * sum(label for _, label in values[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def token_stats(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per target token of `windows` `[n, window]`: "logp" (log-probability of the true
    next token), "mu" and "sigma" (mean and std of log p over the next-token distribution),
    each float64 `[n, window - 1]` on the CPU."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _token_stats(model, windows, batch_size)
    finally:
        model.train(was_training)


def _token_stats(model: nn.Module, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    parts, device = _body_and_head(model), input_device(model)
    out: dict[str, list[torch.Tensor]] = {"logp": [], "mu": [], "sigma": []}
    scratch: dict[str, torch.Tensor] = {}  # the logits buffer, reused across chunks and batches
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)  # [batch, pos]
        b, p = ids.shape
        rows = {k: torch.empty(b * p, dtype=torch.float64) for k in out}  # [batch * pos]
        nxt = ids.roll(-1, dims=1).reshape(-1)  # row i's target (the last column wraps: dropped below)
        for first, logits in _logit_chunks(model, ids, parts, scratch):  # [chunk, vocab]
            for r in range(0, logits.shape[0], _ROWS):  # a few float32 [_ROWS, vocab] temporaries at a time
                lo, hi = first + r, first + min(r + _ROWS, logits.shape[0])
                logit = logits[r : r + _ROWS].float()  # [rows, vocab]
                # log p = logit - logsumexp: its mean under p is E_p[logit] - lse and its variance
                # is logit's, computed centred (no -inf log-probabilities, no cancellation)
                lse = torch.logsumexp(logit, -1)  # [rows]
                prob = torch.softmax(logit, -1)  # [rows, vocab]
                mean = torch.bmm(prob[:, None], logit[:, :, None])[:, 0]  # [rows, 1]: E_p[logit]
                dev = logit - mean  # [rows, vocab]
                var = torch.bmm((prob * dev)[:, None], dev[:, :, None])[:, 0, 0]  # [rows]
                target = logit.gather(1, nxt[lo:hi, None].to(logit.device))[:, 0]  # [rows]
                rows["logp"][lo:hi] = (target - lse).double().cpu()
                rows["mu"][lo:hi] = (mean[:, 0] - lse).double().cpu()
                rows["sigma"][lo:hi] = var.clamp_min(0).sqrt().double().cpu()
                del logit, prob, dev
            del logits
        for k in out:
            out[k].append(rows[k].view(b, p)[:, :-1])  # [batch, pos-1]: the last position has no target
    return {k: torch.cat(v) for k, v in out.items()}


def _lowest_mean(values: torch.Tensor, k: float) -> torch.Tensor:
    """Per row of `values` `[n, t]`: the mean of its floor(k * t) lowest entries (at least one)."""
    m = max(1, int(values.shape[1] * k))
    return values.sort(dim=1).values[:, :m].mean(1)  # [n]


def window_scores(stats: dict[str, torch.Tensor], texts: Sequence[str], k: float = K) -> dict[str, list[float]]:
    """The four scores of each window (higher = more likely seen) from its `token_stats`
    and its decoded text (for zlib)."""
    logp = stats["logp"]  # [n, t]
    ll = logp.mean(1)  # [n] mean log-likelihood
    zlen = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    # sigma 0 (a one-hot distribution) would divide by zero: such a token says nothing, so it scores 0
    z = torch.where(stats["sigma"] > 0, (logp - stats["mu"]) / stats["sigma"].clamp_min(1e-12), 0.0)
    return {"loss": ll.tolist(), "zlib": (ll / zlen).tolist(), "mink": _lowest_mean(logp, k).tolist(),
            "mink++": _lowest_mean(z, k).tolist()}


def membership(model: nn.Module, tokenizer: PreTrainedTokenizerBase, seen: torch.Tensor, unseen: torch.Tensor,
               k: float = K, batch_size: int = 8) -> dict:
    """ROC AUC of each score in `SCORES`, windows `seen` `[n, window]` positive against
    `unseen` `[m, window]`, with the window counts, `k` and each class's mean score."""
    if not 0 < k <= 1:
        raise SelpruneError(f"k={k} is not a fraction in (0, 1]; the papers use 0.2")
    scores = {}
    for name, windows in (("seen", seen), ("unseen", unseen)):
        texts = tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True)
        scores[name] = window_scores(token_stats(model, windows, batch_size), texts, k)
    return {
        "auc": {s: roc_auc(scores["seen"][s], scores["unseen"][s]) for s in SCORES},
        "mean_score": {c: {s: sum(v[s]) / len(v[s]) for s in SCORES} for c, v in scores.items()},
        "n_seen": len(seen), "n_unseen": len(unseen), "k": k,
    }
