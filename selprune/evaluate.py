"""Next-token evaluation: top-1, top-10, their "skip" variants, cross-entropy, perplexity.

Every target position in the windows counts toward the token budget (the reference
counted only non-skip tokens). "Skip" accuracies leave out targets among the dataset's k
most frequent tokens, since predicting "the" or "    " says little about a capability.
Perplexity is exp(mean cross-entropy), not a per-token average of exponentials.

Under torch.distributed (`selprune.distributed`), every rank evaluates its shard of the
windows and the counts and the loss sum are added over the ranks, so every rank gets the
metrics of all the windows: the counts exactly those of one process, the loss up to the
float64 order of adding batches.

Memory: the full-vocabulary logits of a batch never exist at once. The transformer body
runs once per batch, then the LM head (and, for Gemma 2/3, the final logit soft-capping)
runs over chunks of rows (`_HEAD_BYTES` of float32 logits each; on the CPU, each call over
cache-sized blocks of the vocabulary) into one logits buffer reused for every chunk and batch,
and every chunk is reduced to top-10 and the target's log-probability before the next is
made. The logits are bit-identical to the full forward's (same head, same rows, each matmul
of at least `_MIN_HEAD_ROWS` rows and columns: MKL's small kernels round differently), so
the metrics are those of `model(input_ids=...)`. Models whose logits are more than
head(body) in a way not known here fall back to the full forward (`_body_and_head`).

Definitions: docs/method.md, "Evaluation".
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from selprune import distributed
from selprune.data import Data
from selprune.masked import evaluate_masked, is_masked_lm, mask_token_id
from selprune.models import float64_device, input_device
from selprune.topk import topk_ids
from selprune.vision import evaluate_classes

METRICS = ("top1", "top10", "top1_skip", "top10_skip", "loss", "perplexity")
_CHUNK_BYTES = 8 << 20  # on the CPU, float32 logits per chunk of rows (8 MiB: ~40 rows of a 49k vocabulary)
# float32 logits per LM-head call at most (320 MiB: 320 rows of a 262k vocabulary, so a batch of
# 8 x 256 rows goes in 7 calls of 292-293; on a 49k one `_MAX_HEAD_ROWS` binds first). Fewer rows per call
# cost speed: every call re-packs the whole head weight. On the 262k config (2026-12-02): the
# head's matmuls over 8 x 256 rows in calls of 256, 384 and 1024 rows took 1.05x, 1.00x and 0.99x
# one 2048-row call. With equal calls, evaluation added 0.170 of a bare forward's memory at this
# budget, 0.191 at 384 MiB (6 calls of 341-342 rows), each at 1.2x the speed of the bare forward,
# whose fresh 2 GiB of logits took ~2 s of page faults on that host (this buffer is reused).
_HEAD_BYTES = 320 << 20
# The most rows in one LM-head call: 512 rows of a 49k vocabulary are 96 MiB, a quarter of a
# whole batch's logits. Before the vocabulary blocks below, 512-row calls cost 7% against 1024;
# with them (2026-12-07, default model, 16 windows, 12 interleaved repeats) evaluation took 1.007x
# the speed of 1024-row calls, 1.02x at 384, 0.97x at 256 and 0.88x at 128 (every metric the
# same), and one pruning step's whole-process peak (`bench.py --step-memory`, two fresh runs
# each) was 1,268-1,277 MiB at 512 rows against 1,368 at 1024 and 1,203-1,205 at 256.
_MAX_HEAD_ROWS = 512
# The fewest rows in one LM-head call, unless the batch has fewer: on this MKL (2024.2, AVX-512)
# a matmul of 1-3, 5-7 or 9-11 rows rounds differently from one of many rows (other kernels).
_MIN_HEAD_ROWS = 16
# On the CPU, each LM-head call goes over blocks of the vocabulary, of at most this many bytes
# of head weight (2 MiB: 819 rows of a 640-wide head), so that a block of the weight and its
# columns of logits stay in cache while the call's rows go through them; every call otherwise
# streams the whole head from memory again. The blocks are of equal size, none under
# `_MIN_HEAD_ROWS` columns (a matmul of under 12 columns rounds differently too), and every
# logit keeps its bits (the same dot product; checked on heads of 1k-262k rows, 32-896 wide,
# with and without a bias, under MKL's AVX2 and AVX-512 kernels). On the 262k config
# (2026-12-04, 2-core EPYC): 7 calls of 293 rows took 3.5-3.7 s in blocks of 256-2048 columns,
# 4.5 s unblocked, and one unblocked 2048-row call (the bare forward's) 4.0 s; on the default
# head 2 calls took 0.58 s in blocks against 0.63 s unblocked and 0.61 s as one call.
_HEAD_BLOCK_BYTES = 2 << 20
# CausalLM classes of transformers whose logits are exactly lm_head(body(ids).last_hidden_state),
# then (True) final_logit_softcapping if the config sets it. Any other class, or a subclass that
# overrides forward, takes the full forward: its head may do more (logit scaling, another head).
_HEADS: dict[str, bool] = {
    **dict.fromkeys(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "GemmaForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
                     "GPTJForCausalLM", "OPTForCausalLM"), False),
    "Gemma2ForCausalLM": True,
    "Gemma3ForCausalLM": True,
}


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
    """Metrics of forget and retain on their test windows, each with its own skip set:
    next-token metrics for a causal LM, masked-token ones for a masked LM (`selprune.masked`),
    per-class accuracy for an image classifier's images (`selprune.vision`)."""
    if data.is_images:
        return {side: evaluate_classes(model, images, data.labels[side], batch_size, progress, f"eval {side}")
                for side, images in (("forget", data.forget_test), ("retain", data.retain_test))}
    if is_masked_lm(model):
        mid = mask_token_id(model)
        return {side: evaluate_masked(model, windows, mid, data.skip.get(side), batch_size, progress=progress,
                                      desc=f"eval {side}")
                for side, windows in (("forget", data.forget_test), ("retain", data.retain_test))}
    return {
        # a hand-made Data without skip sets: the skip metrics equal the plain ones
        "forget": evaluate(model, data.forget_test, data.skip.get("forget"), batch_size, progress, "eval forget"),
        "retain": evaluate(model, data.retain_test, data.skip.get("retain"), batch_size, progress, "eval retain"),
    }


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(body, LM head, soft-cap) when the model's logits are known to be
    head(body(input_ids).last_hidden_state), soft-capped when the cap is not None; None when
    they may be more than that: evaluation then runs the full forward, right by definition.

    Known means one of `_HEADS`' classes of transformers, its forward not overridden, and
    no torch hook on the model itself (which the body-then-head path would skip). Accelerate's
    device hook (`_hf_hook`) only moves tensors, and the body's and head's own hooks still run."""
    cls = next((c for c in type(model).__mro__ if c.__name__ in _HEADS and c.__module__.startswith("transformers.")),
               None)
    if cls is None or type(model).forward is not cls.forward or model._forward_hooks or model._forward_pre_hooks:
        return None
    if "forward" in vars(model) and not hasattr(model, "_hf_hook"):  # an instance-level forward: unknown
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if not isinstance(body, nn.Module) or body is model or type(head) is not nn.Linear:
        return None
    cap = getattr(model.config, "final_logit_softcapping", None) if _HEADS[cls.__name__] else None
    return body, head, cap


def _logit_chunks(model: nn.Module, ids: torch.Tensor, parts: tuple[nn.Module, nn.Module, float | None] | None,
                  scratch: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, logits `[rows, vocab]`) over the rows (b * pos + p) of the batch `ids`
    `[batch, pos]`: chunks from the body's hidden states through the head when `parts` (of
    `_body_and_head`) is given, else one chunk, the full forward's logits.

    Chunks (`head_bounds`) have at most `_HEAD_BYTES` of float32 logits and `_MAX_HEAD_ROWS`
    rows, at least `_MIN_HEAD_ROWS`, or the whole batch if it has fewer rows: then every
    head call is a matmul of the same kind as the full forward's, and its logits the same bits.
    With `scratch`, the chunks are written into one buffer kept there (`_head_into`): the
    yielded logits are a view of it, valid until the next chunk is asked for."""
    if parts is None:
        logits = model(input_ids=ids, use_cache=False).logits  # [batch, pos, vocab]
        yield 0, logits.reshape(-1, logits.shape[-1])  # a view
        return
    body, head, cap = parts
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # [batch, pos, d_model]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [batch * pos, d_model]
    bounds = head_bounds(len(hidden), head.weight.shape[0])
    rows = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        logits = _head_into(head, hidden[lo:hi], rows, scratch)  # [hi - lo, vocab]
        if cap is not None:  # the model's own "/ cap, tanh, * cap", in place (the same bits, no copies)
            logits = logits.div_(cap).tanh_().mul_(cap)
        yield lo, logits
        del logits  # before the next chunk is made: one chunk of logits at a time


def head_bounds(n: int, vocab: int) -> list[int]:
    """Row bounds of the LM-head calls over `n` rows of a `vocab`-sized head: the fewest calls
    of at most `_HEAD_BYTES` of float32 logits (and `_MAX_HEAD_ROWS` rows) each, of equal size
    within a row; fewer, larger calls where that would make one of under `_MIN_HEAD_ROWS`
    (then one call if `n` itself is under it).

    Equal sizes make the logits buffer no larger than the calls need: 2,048 rows of a 262k
    vocabulary at 320 rows per call are 7 calls of 292-293 rows (a 293-row buffer), where
    320-row calls and the 128 left over needed 320."""
    return equal_bounds(n, min(_MAX_HEAD_ROWS, _HEAD_BYTES // (4 * vocab)))


def equal_bounds(n: int, most: int) -> list[int]:
    """Bounds of the fewest parts of `n` of at most `most` each (at least `_MIN_HEAD_ROWS`),
    of equal size within one; fewer, larger parts where that would make one of under
    `_MIN_HEAD_ROWS` (then one part if `n` itself is under it): the rows of `head_bounds`,
    the vocabulary blocks of `_head_into`."""
    most = max(_MIN_HEAD_ROWS, most)
    parts = max(1, min(-(-n // most), n // _MIN_HEAD_ROWS))
    return [i * n // parts for i in range(parts + 1)]


def _head_into(head: nn.Linear, x: torch.Tensor, rows: int, scratch: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """`head(x)` `[m, vocab]`, written into a `[rows, vocab]` buffer kept in `scratch` when
    that is safe: no autograd, and no hook on the head (accelerate's device hook, a user's
    hook) that calling the head itself would run. The same ATen call as `nn.Linear`'s
    (mm, or addmm with a bias), per block of the vocabulary on the CPU, gives the same bits;
    what the buffer saves is a fresh logits-sized allocation, and its page faults, per chunk;
    what the blocks save is re-reading the whole head from memory in every call."""
    if (scratch is None or torch.is_grad_enabled() or head._forward_hooks or head._forward_pre_hooks
            or hasattr(head, "_hf_hook") or x.device != head.weight.device or x.dtype != head.weight.dtype):
        return head(x)
    w = head.weight  # [vocab, d_model]
    buf = scratch.get("head")
    if buf is None or buf.shape[0] < rows or buf.shape[1] != w.shape[0] or buf.dtype != w.dtype \
            or buf.device != w.device:
        buf = scratch["head"] = torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)
    out = buf[: len(x)]  # [m, vocab]
    # On the CPU, blocks of the vocabulary (`_HEAD_BLOCK_BYTES`), each written in place into
    # its columns of `out` (a strided view that BLAS takes as it is); elsewhere one call.
    cols = _HEAD_BLOCK_BYTES // (w.element_size() * w.shape[1]) if w.device.type == "cpu" else w.shape[0]
    bounds = equal_bounds(w.shape[0], cols)
    for v0, v1 in zip(bounds, bounds[1:], strict=False):
        if head.bias is None:
            torch.mm(x, w[v0:v1].t(), out=out[:, v0:v1])
        else:
            torch.addmm(head.bias[v0:v1], x, w[v0:v1].t(), out=out[:, v0:v1])
    return out


def _allocate(weight: torch.Tensor, scratch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulators of `_evaluate` (`[5]` int64 counts, `[]` float64 loss sum) on the LM
    head `weight`'s device, and on the CPU `_reduce_rows`' log-probability buffer, made before
    the first forward pass. Made after it, these small long-lived tensors land on the heap
    above the body's freed temporaries, which glibc then can neither trim nor reuse: the
    pruning step's peak resident memory varied by ~100 MB from run to run."""
    device = weight.device
    if device.type == "cpu":
        rows = max(1, _CHUNK_BYTES // (4 * weight.shape[0]))
        scratch["logp"] = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=device)
    return _accumulators(device, None, None)


def _accumulators(device: torch.device, sums: torch.Tensor | None,
                  loss_sum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_evaluate`'s `[5]` int64 counts and `[]` float64 loss sum on `device` (the loss sum on
    its float64 device): made (zeros) where None, moved where they live elsewhere."""
    sums = torch.zeros(5, dtype=torch.int64, device=device) if sums is None else sums.to(device)
    f64 = float64_device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=f64) if loss_sum is None else loss_sum.to(f64)
    return sums, loss_sum


def _reduce_rows(logits: torch.Tensor, nxt: torch.Tensor, top10: torch.Tensor, logp: torch.Tensor,
                 scratch: dict[str, torch.Tensor]) -> None:
    """Write the top-k ids of every row of `logits` `[rows, vocab]` (any float dtype) into
    `top10` `[rows, k]` and the log-probability of its target `nxt` `[rows, 1]` into `logp`
    `[rows, 1]`.

    Rows go through in chunks: on the CPU, of _CHUNK_BYTES of float32 logits, so that the
    log-probabilities (and a float32 upcast of other dtypes) live in small buffers, reused
    from `scratch` across calls, that stay in cache, instead of a fresh logits-sized tensor
    per call (allocation, page faults); elsewhere, all rows at once."""
    n, v = logits.shape
    device = logits.device
    rows = max(1, _CHUNK_BYTES // (4 * v)) if device.type == "cpu" else n

    def buffer(name: str) -> torch.Tensor:  # float32 [rows, vocab]
        buf = scratch.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != v or buf.device != device:
            buf = scratch[name] = torch.empty(rows, v, dtype=torch.float32, device=device)
        return buf

    for r in range(0, n, rows):
        chunk = logits[r : r + rows]
        m = chunk.shape[0]
        if chunk.dtype != torch.float32:
            chunk = buffer("upcast")[:m].copy_(chunk)
        # Top-10 ids: on the CPU from block maxima (`selprune.topk`: the hits bit-identical
        # to torch.topk's, ties and NaN rows through torch.topk itself; 2.7x faster on a
        # 49k vocabulary, 3.9x on 262k), elsewhere torch.topk (fast there; no host sync).
        # Not counting the logits above the target's: on ties (frequent with bf16 logits)
        # that counts a tied target as a hit where topk may leave it out.
        k = top10.shape[1]
        top10[r : r + m] = topk_ids(chunk, k) if device.type == "cpu" else chunk.topk(k, dim=-1).indices
        lsm = torch.log_softmax(chunk, -1, out=buffer("logp")[:m])
        torch.gather(lsm, 1, nxt[r : r + m], out=logp[r : r + m])


# long: the loop of every evaluation keeps its device-side accumulators in locals, so that
# no per-batch host sync hides behind a helper call
def _evaluate(model: nn.Module, windows: torch.Tensor, skip_ids: torch.Tensor | None, batch_size: int,
              progress: bool, desc: str) -> dict[str, float]:
    windows = distributed.shard(windows, batch_size)  # this rank's batches (all of them single-process)
    in_device = input_device(model)
    parts = _body_and_head(model)  # None: the full forward
    skip_table = None  # [vocab] bool: is this token id a skip id (a lookup, faster than torch.isin)
    n = 0  # targets, counted on the host
    # Accumulators on the logits' device (a sharded model may put its LM head on another
    # device than its embedding), made at the first batch; None while this rank has none.
    sums: torch.Tensor | None = None  # [5] int64: top1, top10, n_skip, top1_skip, top10_skip
    loss_sum: torch.Tensor | None = None  # [] float64, on float64_device of the logits' device
    scratch: dict[str, torch.Tensor] = {}  # [rows, vocab] buffers (logits, float32), reused across chunks and batches
    if parts is not None:  # the long-lived buffers before the first forward pass: see `_allocate`
        sums, loss_sum = _allocate(parts[1].weight, scratch)
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(in_device)  # [batch, pos]
        b, p = ids.shape
        top10 = logp = nxt = None
        for lo, logits in _logit_chunks(model, ids, parts, scratch):  # [rows, vocab], rows lo.. of the batch's b*p
            if top10 is None:  # the first chunk tells the logits' device and the vocabulary
                device, v = logits.device, logits.shape[1]
                ids = ids.to(device)
                nxt = ids.roll(-1, dims=1).reshape(-1, 1)  # row i's target: ids[:, i + 1] (the last column wraps)
                top10 = torch.empty(b * p, min(10, v), dtype=torch.long, device=device)
                logp = torch.empty(b * p, 1, dtype=torch.float32, device=device)  # log-probability of the target
            hi = lo + logits.shape[0]
            _reduce_rows(logits, nxt[lo:hi], top10[lo:hi], logp[lo:hi], scratch)
            del logits  # before the next chunk is made
        if sums is None or sums.device != device:  # none yet (the full forward), or the head's output moved
            sums, loss_sum = _accumulators(device, sums, loss_sum)
        # The last position of each window, which has no target, is dropped from the small per-row results.
        target = ids[:, 1:]  # [batch, pos-1]
        top10 = top10.view(b, p, -1)[:, :-1]  # [batch, pos-1, 10]
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
