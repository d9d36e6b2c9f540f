"""The ids of each row's k largest logits, for the top-1 and top-k hits of an evaluation.

`torch.topk` over a whole vocabulary row copies and partially sorts all of it: on the
CPU it was the largest cost of evaluation after the matmuls (0.49 s of 11.2 s for 8 x 256
tokens of a 262k vocabulary). `topk_ids` finds the same hits from block maxima: the row's
k largest values lie in the k blocks with the largest maxima (or in the tail the blocks do
not cover), so `torch.topk` runs over those ~k x 256 candidates only.

Exactness. A row takes the short path only when its answer is unique: every value outside
the candidates (at most the (k+1)-th largest block maximum) is below the k-th largest
candidate, the k-th and (k+1)-th candidates differ (the top-k *set* is unique) and so do the
first two (the top-1 id is unique). Then any exact top-k returns this set and this first
id, which is all that the hits read: the order of ids 2..k may differ from `torch.topk`'s.
Every other row (ties at those places, NaN, a row of -inf) goes through `torch.topk` itself,
so top-1 and top-k hits are bit-identical to it on every row.
"""

from __future__ import annotations

import torch

BLOCK = 256  # values per block: its maximum is one vectorised pass; k blocks are ~k x 256 candidates


def topk_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """`[rows, k]` int64 ids of the k largest values of each row of `x` `[rows, v]` (float32):
    the first the largest, the set of k exactly `torch.topk`'s (see the module docstring)."""
    m, v = x.shape
    nb = v // BLOCK
    if nb <= k or x.dtype != torch.float32 or x.stride(-1) != 1:  # blocks are views of contiguous rows
        return x.topk(k, dim=-1).indices
    main = x[:, : nb * BLOCK].view(m, nb, BLOCK)  # [rows, blocks, BLOCK], a view
    block_max = main.amax(-1)  # [rows, blocks]
    top_blocks = block_max.topk(k + 1, dim=-1)  # sorted: the k blocks, then the best of the rest
    blocks = top_blocks.indices[:, :k]  # [rows, k]
    outside = top_blocks.values[:, k]  # [rows]: no value outside the k blocks and the tail exceeds it
    cand = main.gather(1, blocks[:, :, None].expand(m, k, BLOCK)).reshape(m, k * BLOCK)  # [rows, k * BLOCK]
    if nb * BLOCK < v:  # the tail the blocks do not cover is always a candidate
        cand = torch.cat([cand, x[:, nb * BLOCK :]], dim=1)
    vals, pos = cand.topk(k + 1, dim=-1)  # [rows, k + 1], sorted
    in_block = pos < k * BLOCK
    block_of = blocks.gather(1, torch.where(in_block, pos // BLOCK, 0))
    ids = torch.where(in_block, block_of * BLOCK + pos % BLOCK, nb * BLOCK + pos - k * BLOCK)[:, :k]
    # NaN needs no test of its own: topk ranks it above every number, so a row with one has a
    # NaN among its candidates' first values, and every comparison below is false for it.
    unique = (outside < vals[:, k - 1]) & (vals[:, k - 1] > vals[:, k]) & (vals[:, 0] > vals[:, 1])
    if not bool(unique.all()):
        redo = (~unique).nonzero().squeeze(1)
        ids[redo] = x[redo].topk(k, dim=-1).indices
    return ids
