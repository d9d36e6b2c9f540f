"""Next-token evaluation: top-1, top-10, their "skip" variants, cross-entropy, perplexity.

Every target position in the windows counts toward the token budget (the reference
counted only non-skip tokens). "Skip" accuracies leave out targets among the dataset's k
most frequent tokens, since predicting "the" or "    " says little about a capability.
Perplexity is exp(mean cross-entropy), not a per-token average of exponentials.

Under torch.distributed (`selprune.distributed`), every rank evaluates its shard of the
windows and the counts and the loss sum are added over the ranks, so every rank gets the
metrics of all the windows: the counts exactly those of one process, the loss up to the
float64 order of adding batches.

Definitions: docs/method.md, "Evaluation".
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from selprune import distributed
from selprune.data import Data
from selprune.models import float64_device, input_device

METRICS = ("top1", "top10", "top1_skip", "top10_skip", "loss", "perplexity")
_CHUNK_BYTES = 8 << 20  # on the CPU, float32 logits per chunk of rows (8 MiB: ~40 rows of a 49k vocabulary)


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    skip_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Metrics over all next-token targets of `windows` (`[n, window]` token ids).

    The model runs in eval mode (no dropout) and is left in the mode it was in. Under
    torch.distributed, every rank passes the same `windows` and gets the metrics of all."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _evaluate(model, windows, skip_ids, batch_size, progress, desc)
    finally:
        model.train(was_training)


def evaluate_both(model: nn.Module, data: Data, batch_size: int, progress: bool) -> dict[str, dict[str, float]]:
    """Metrics of forget and retain on their test windows, each with its own skip set."""
    return {
        # a hand-made Data without skip sets: the skip metrics equal the plain ones
        "forget": evaluate(model, data.forget_test, data.skip.get("forget"), batch_size, progress, "eval forget"),
        "retain": evaluate(model, data.retain_test, data.skip.get("retain"), batch_size, progress, "eval retain"),
    }


# long: the hot loop of every evaluation keeps its buffers and device-side accumulators in
# locals, so no per-batch host sync or allocation hides behind a helper call
def _evaluate(model: nn.Module, windows: torch.Tensor, skip_ids: torch.Tensor | None, batch_size: int,
              progress: bool, desc: str) -> dict[str, float]:
    windows = distributed.shard(windows, batch_size)  # this rank's batches (all of them single-process)
    in_device = input_device(model)
    skip_table = None  # [vocab] bool: is this token id a skip id (a lookup, faster than torch.isin)
    n = 0  # targets, counted on the host
    # Accumulators on the logits' device (a sharded model may put its LM head on another
    # device than its embedding), made at the first batch; None while this rank has none.
    sums: torch.Tensor | None = None  # [5] int64: top1, top10, n_skip, top1_skip, top10_skip
    loss_sum: torch.Tensor | None = None  # [] float64, on float64_device of the logits' device
    scratch: dict[str, torch.Tensor] = {}  # float32 [rows, vocab] buffers, reused across chunks and batches

    def buffer(name: str, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        buf = scratch.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != vocab:
            buf = scratch[name] = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        return buf[:rows]

    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(in_device)  # [batch, pos]
        logits = model(input_ids=ids, use_cache=False).logits  # [batch, pos, vocab]
        device = logits.device
        ids = ids.to(device)
        if sums is None:
            sums = torch.zeros(5, dtype=torch.int64, device=device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=float64_device(device))
        b, p, v = logits.shape
        # Every row of the logits as they are (a view, no copy); the last position, which has
        # no target, is dropped from the small per-row results.
        flat = logits.reshape(b * p, v)
        nxt = ids.roll(-1, dims=1).reshape(-1, 1)  # row i's target: ids[:, i + 1] (the last column wraps)
        target = ids[:, 1:]  # [batch, pos-1]
        k = min(10, v)
        top10 = torch.empty(b * p, k, dtype=torch.long, device=device)
        logp = torch.empty(b * p, 1, dtype=torch.float32, device=device)  # log-probability of the target
        # Rows go through in chunks: on the CPU, of _CHUNK_BYTES of float32 logits, so that the
        # log-probabilities (and a float32 upcast of other dtypes) live in small buffers that
        # stay in cache, instead of a fresh logits-sized tensor per batch (allocation, page
        # faults); elsewhere, the whole batch at once.
        rows = max(1, _CHUNK_BYTES // (4 * v)) if device.type == "cpu" else b * p
        for r in range(0, b * p, rows):
            chunk = flat[r : r + rows]
            m = chunk.shape[0]
            if chunk.dtype != torch.float32:
                chunk = buffer("upcast", rows, v, device)[:m].copy_(chunk)
            # Top-10 by torch.topk (a partial selection, not a sort). Not replaced by counting
            # the logits above the target's: on ties (frequent with bf16 logits) that counts a
            # tied target as a hit where topk may leave it out, and the accuracies would change.
            top10[r : r + m] = chunk.topk(k, dim=-1).indices
            lsm = torch.log_softmax(chunk, -1, out=buffer("logp", rows, v, device)[:m])
            torch.gather(lsm, 1, nxt[r : r + m], out=logp[r : r + m])
        top10 = top10.view(b, p, k)[:, :-1]  # [batch, pos-1, 10]
        hit1 = top10[..., 0] == target
        hit10 = (top10 == target[..., None]).any(-1)
        # cross-entropy = -log_softmax at the target; the copy is a no-op except on MPS
        loss_sum -= logp.view(b, p)[:, :-1].to(loss_sum.device).double().sum()
        if skip_ids is not None and skip_table is None:  # built on the host (no device sync), copied once
            skip = skip_ids.cpu()
            table = torch.zeros(v, dtype=torch.bool)
            table[skip[(skip >= 0) & (skip < v)]] = True  # other ids match no target anyway
            skip_table = table.to(device)
        keep = torch.ones_like(target, dtype=torch.bool) if skip_table is None else ~skip_table[target]
        n += target.numel()
        sums += torch.stack([hit1.sum(), hit10.sum(), keep.sum(), (hit1 & keep).sum(), (hit10 & keep).sum()])
    # The only device-to-host transfers (with loss_sum's), then the sum over ranks.
    counts = torch.zeros(6, dtype=torch.int64)  # the five sums, then n
    loss_total = torch.zeros(1, dtype=torch.float64)
    if sums is not None:
        counts[:5] = sums.cpu()
        loss_total[0] = loss_sum.cpu()
    counts[5] = n
    distributed.all_reduce_sum_([counts, loss_total])
    t1, t10, ns, t1s, t10s, n = counts.tolist()
    loss = float(loss_total) / max(n, 1)
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
