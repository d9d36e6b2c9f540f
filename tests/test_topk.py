"""selprune.topk: the top-1 id and the top-k set equal torch.topk's on every row, including
the rows the block maxima cannot decide (ties, NaN, infinities), which go through topk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_windows, tiny_model  # noqa: E402

import selprune.evaluate as evaluate_module  # noqa: E402
from selprune.evaluate import evaluate  # noqa: E402
from selprune.topk import BLOCK, topk_ids  # noqa: E402


def assert_same_hits(x: torch.Tensor, k: int) -> None:
    ref = x.topk(k, dim=-1).indices
    got = topk_ids(x, k)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.equal(got[:, 0], ref[:, 0]), "top-1 id differs"
    assert torch.equal(got.sort(-1).values, ref.sort(-1).values), "top-k set differs"


@pytest.mark.parametrize("v", [BLOCK * 40, BLOCK * 40 + 77, BLOCK * 11 + 5, BLOCK * 10, 1000])
@pytest.mark.parametrize("k", [1, 10])
def test_random_rows_match_topk(v: int, k: int) -> None:
    """Whole blocks, a tail, just enough blocks, and too few (torch.topk itself)."""
    g = torch.Generator().manual_seed(v + k)
    assert_same_hits(torch.randn(33, v, generator=g) * 4, k)


def test_top_values_in_one_block_or_in_the_tail() -> None:
    v = BLOCK * 30 + 100
    x = torch.randn(4, v, generator=torch.Generator().manual_seed(1))
    x[0, 5 * BLOCK : 5 * BLOCK + 10] = torch.arange(10.0) + 50  # all ten in one block
    x[1, -10:] = torch.arange(10.0) + 50  # all ten in the tail
    x[2, [3, BLOCK * 29 + 3, v - 1]] = 60.0 + torch.arange(3.0)  # spread over blocks and tail
    x[3, BLOCK * 7 + 200] = 99.0  # one winner, the rest ordinary
    assert_same_hits(x, 10)
    assert topk_ids(x, 10)[1].min() >= BLOCK * 30


def test_ties_nan_and_infinities_go_through_topk() -> None:
    """Rows whose hits depend on how ties are broken get torch.topk's own answer, id for id."""
    v, k = BLOCK * 20, 10
    x = torch.randn(9, v, generator=torch.Generator().manual_seed(2))
    x[0, [17, 3000]] = 40.0  # tie at the top: which id is top-1 is topk's choice
    top = x[1].topk(k + 1).indices
    x[1, top[k]] = x[1, top[k - 1]]  # tie at the k-th place: which id is in the set is topk's choice
    x[2, 100] = float("nan")
    x[3, 4000] = float("inf")
    x[3, 9] = float("inf")
    x[4] = float("-inf")
    x[5] = 1.0  # a constant row
    x[6, 7] = float("nan")
    x[6, 8] = float("inf")
    x[7, -1] = float("nan")  # in the last block
    top = x[8].topk(4).indices
    x[8, top[3]] = x[8, top[2]]  # a tie inside the top k: the set and the first id are unique
    got, ref = topk_ids(x, k), x.topk(k, dim=-1).indices
    assert torch.equal(got[:8], ref[:8])
    assert torch.equal(got[8, 0], ref[8, 0]) and set(got[8].tolist()) == set(ref[8].tolist())


def _tied_rows(kind: str, rows: int = 64, v: int = BLOCK * 24, k: int = 10) -> torch.Tensor:
    """Rows where the block maxima alone would pick tied ids in an order of their own, at
    random places, so that a short path that skipped the check would differ somewhere."""
    g = torch.Generator().manual_seed(len(kind))
    x = torch.randn(rows, v, generator=g)
    for r in range(rows):
        spots = torch.randperm(v, generator=g)
        if kind == "top":  # two ids share the maximum
            x[r, spots[:2]] = 30.0
        elif kind == "boundary":  # one maximum, then k ids in k other blocks share the next value:
            blocks = torch.randperm(v // BLOCK, generator=g)[: k + 1]  # k - 1 of them are in the top k
            x[r, blocks[1:] * BLOCK + spots[1 : k + 1] % BLOCK] = 30.0
            x[r, blocks[0] * BLOCK + spots[0] % BLOCK] = 40.0
        else:  # NaN somewhere, which torch.topk orders its own way
            x[r, spots[:3]] = float("nan")
    return x


@pytest.mark.parametrize("kind", ["top", "boundary", "nan"])
def test_rows_the_block_maxima_cannot_decide_match_topk_id_for_id(kind: str) -> None:
    x = _tied_rows(kind)
    assert torch.equal(topk_ids(x, 10), x.topk(10, dim=-1).indices)


def test_other_dtypes_use_topk() -> None:
    x = torch.randn(3, BLOCK * 20, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert torch.equal(topk_ids(x, 10), x.topk(10, dim=-1).indices)


def test_rows_that_are_not_contiguous_use_topk() -> None:
    """A column-major `[rows, v]` (a transposed logits buffer) cannot be cut into block views:
    such input goes through torch.topk rather than failing."""
    x = torch.randn(BLOCK * 20, 5, generator=torch.Generator().manual_seed(4)).t()  # [5, v], stride (1, 5)
    assert x.stride(-1) != 1
    assert torch.equal(topk_ids(x, 10), x.topk(10, dim=-1).indices)


def test_evaluation_metrics_equal_those_of_torch_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a model whose vocabulary has enough blocks for the short path, every metric is
    the same as with torch.topk in its place."""
    model = tiny_model("llama", vocab_size=BLOCK * 16 + 9)
    windows = random_windows(6, 24, seed=5, vocab=BLOCK * 16 + 9)
    skip = torch.arange(3, 60)
    fast = evaluate(model, windows, skip, batch_size=4, progress=False)
    monkeypatch.setattr(evaluate_module, "topk_ids", lambda x, k: x.topk(k, dim=-1).indices)
    assert evaluate(model, windows, skip, batch_size=4, progress=False) == fast
