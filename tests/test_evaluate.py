"""Evaluation metrics against a direct per-token computation on a tiny model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import random_windows, tiny_gemma3_multimodal, tiny_model  # noqa: E402

from selprune import evaluate as ev  # noqa: E402
from selprune.evaluate import METRICS, evaluate  # noqa: E402


def direct_metrics(model, windows: torch.Tensor, skip: set[int]) -> dict[str, float]:
    """Per target, in float64, by ranks: top-k hit iff fewer than k logits beat the target's."""
    with torch.no_grad():
        lg = model(input_ids=windows).logits.double()
    hits1, hits10, ces, kept1, kept10 = [], [], [], [], []
    for b in range(windows.shape[0]):
        for p in range(windows.shape[1] - 1):
            row, t = lg[b, p], int(windows[b, p + 1])
            rank = int((row > row[t]).sum())
            ce = float(torch.logsumexp(row, 0) - row[t])
            hits1.append(rank < 1)
            hits10.append(rank < 10)
            ces.append(ce)
            if t not in skip:
                kept1.append(rank < 1)
                kept10.append(rank < 10)
    n = len(ces)
    loss = sum(ces) / n
    return {
        "top1": sum(hits1) / n, "top10": sum(hits10) / n,
        "top1_skip": sum(kept1) / max(len(kept1), 1), "top10_skip": sum(kept10) / max(len(kept10), 1),
        "loss": loss, "perplexity": math.exp(loss), "tokens": n, "tokens_skip": len(kept1),
    }


@pytest.fixture(scope="module")
def model():
    # a small vocabulary (40) so that top-1 and top-10 hits happen often enough to be tested
    return tiny_model("llama", seed=3, vocab_size=40, std=0.5)


@pytest.fixture(scope="module")
def windows():
    w = random_windows(5, 14, seed=9, vocab=40)
    w[:, 1::2] = w[:, 0::2][:, : w[:, 1::2].shape[1]]  # some repetition: a little predictable
    return w


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_metrics_equal_direct_computation(model, windows, batch_size: int) -> None:
    skip_ids = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23])
    got = evaluate(model, windows, skip_ids, batch_size=batch_size, progress=False)
    want = direct_metrics(model, windows, set(skip_ids.tolist()))
    assert set(METRICS) <= set(got)
    assert got["tokens"] == want["tokens"] == 5 * 13
    assert got["tokens_skip"] == want["tokens_skip"]
    assert 0 < want["tokens_skip"] < want["tokens"]  # the skip set does matter here
    for m in ("top1", "top10", "top1_skip", "top10_skip"):
        assert got[m] == pytest.approx(want[m], abs=1e-12), m
    assert 0 < want["top10"] < 1 and want["top1"] > 0
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_perplexity_is_exp_of_mean_loss(model, windows) -> None:
    got = evaluate(model, windows, progress=False)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    # and not the mean of per-token exponentials (which is larger: Jensen)
    with torch.no_grad():
        lg = model(input_ids=windows).logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
    assert got["perplexity"] < float(ce.exp().mean()) - 1e-6


def test_skip_excludes_targets_and_budget_counts_all(model, windows) -> None:
    plain = evaluate(model, windows, progress=False)
    assert plain["top1_skip"] == plain["top1"] and plain["tokens_skip"] == plain["tokens"]
    # skipping every target that the model gets right: skip top-1 must be 0
    with torch.no_grad():
        pred = model(input_ids=windows).logits[:, :-1].argmax(-1)
    target = windows[:, 1:]
    right = target[pred == target].unique()
    assert right.numel() > 0
    skipped = evaluate(model, windows, right, progress=False)
    assert skipped["top1_skip"] == 0.0
    assert skipped["tokens"] == plain["tokens"] == target.numel()  # budget: every target
    assert skipped["tokens_skip"] == int((~torch.isin(target, right)).sum())
    for m in ("top1", "top10", "loss"):
        assert skipped[m] == plain[m]  # skip ids change only the skip metrics


def test_evaluation_in_eval_mode_even_for_a_training_model() -> None:
    model = tiny_model("opt", vocab_size=40)
    assert model.config.dropout > 0
    w = random_windows(3, 12, vocab=40)
    ref = evaluate(model, w, progress=False)
    model.train()
    torch.manual_seed(0)
    got = evaluate(model, w, progress=False)
    assert model.training
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_vocabulary_smaller_than_ten() -> None:
    model = tiny_model("gpt2", vocab_size=6)
    w = random_windows(2, 9, vocab=6, low=0)
    got = evaluate(model, w, progress=False)
    assert got["top10"] == 1.0  # every target is within the top 10 of 6 tokens
    assert got["top1"] == pytest.approx(direct_metrics(model, w, set())["top1"])


# ------------------------------------------- body once, LM head over chunks of rows
# (family, config overrides): a plain Linear head, GPT-2's tied head over Conv1D blocks, OPT's
# final layer norm and project_out (in the body), Phi's head with a bias, Gemma 2/3's soft-capping
HEAD_FAMILIES = [("llama", {}), ("gpt2", {}), ("opt", dict(word_embed_proj_dim=24)), ("phi", {}), ("gemma2", {}),
                 ("gemma3", dict(final_logit_softcapping=3.0))]


def _full_forward_metrics(model, windows, skip_ids, batch_size, monkeypatch) -> dict[str, float]:
    """The metrics of the full forward `model(input_ids=...)`: the implementation before the
    head was chunked, kept as the fallback."""
    with monkeypatch.context() as m:
        m.setattr(ev, "_body_and_head", lambda model: None)
        return evaluate(model, windows, skip_ids, batch_size=batch_size, progress=False)


def _head_inputs(model) -> tuple[list[tuple[int, ...]], object]:
    shapes: list[tuple[int, ...]] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    return shapes, handle


@pytest.mark.parametrize(("family", "overrides"), HEAD_FAMILIES, ids=[f for f, _ in HEAD_FAMILIES])
@pytest.mark.parametrize("head_rows", [None, 16, 21])  # None: the default (one chunk for these tiny batches)
@pytest.mark.parametrize("block", [None, 37])  # None: the default (one vocabulary block of these tiny heads)
def test_chunked_head_metrics_bit_identical_to_full_forward(family, overrides, head_rows, block, monkeypatch) -> None:
    vocab = 300
    model = tiny_model(family, seed=2, vocab_size=vocab, **overrides)
    assert ev._body_and_head(model) is not None  # the chunked path is taken
    if head_rows:
        monkeypatch.setattr(ev, "_HEAD_BYTES", 4 * vocab * head_rows)
    if block:  # blocks of at most 37 columns: 9 of 33-34
        monkeypatch.setattr(ev, "_HEAD_BLOCK_BYTES", 4 * model.get_output_embeddings().in_features * block)
    windows = random_windows(7, 33, seed=5, vocab=vocab)
    windows[:, 1::3] = windows[:, 0::3][:, : windows[:, 1::3].shape[1]]  # some repetition: top-1 hits
    skip_ids = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 250])
    want = _full_forward_metrics(model, windows, skip_ids, 3, monkeypatch)
    shapes, buffered = [], []
    head_into = ev._head_into

    def recording(head, x, rows, scratch):  # the head calls, and whether each wrote into the reused buffer
        out = head_into(head, x, rows, scratch)
        shapes.append(tuple(x.shape))
        buffered.append(out.untyped_storage().data_ptr() == scratch["head"].untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(ev, "_head_into", recording)
    got = evaluate(model, windows, skip_ids, batch_size=3, progress=False)
    assert all(buffered)  # no hook on the head: every chunk went into the one buffer
    assert got == want  # every metric, bit for bit
    assert 0 < got["tokens_skip"] < got["tokens"] and got["top10"] > 0
    rows = [s[0] for s in shapes]
    assert all(len(s) == 2 for s in shapes) and sum(rows) == 7 * 33  # 2-D chunks of the batches' rows
    # batches of 99, 99 and 33 rows in the fewest calls of at most head_rows rows, of equal size, none under 16
    per_batch = {None: [[99], [33]], 16: [[16, 17] * 3, [16, 17]], 21: [[19, 20, 20, 20, 20], [16, 17]]}[head_rows]
    assert rows == per_batch[0] * 2 + per_batch[1]


@pytest.mark.parametrize(("family", "overrides"), HEAD_FAMILIES[:1] + HEAD_FAMILIES[-1:], ids=["llama", "gemma3"])
def test_chunked_logits_equal_full_forward_logits(family, overrides, monkeypatch) -> None:
    """The logits themselves, chunk by chunk, against the full forward's: torch.equal, not close."""
    model = tiny_model(family, seed=4, vocab_size=200, **overrides)
    monkeypatch.setattr(ev, "_HEAD_BYTES", 4 * 200 * 17)
    ids = random_windows(4, 30, seed=1, vocab=200)
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits.reshape(4 * 30, 200)
        chunks = [(lo, lg.clone()) for lo, lg in ev._logit_chunks(model, ids, ev._body_and_head(model))]
    # 120 rows at most 17 per call would be 8 calls, one under 16 rows: 7 calls of 17-18
    assert [len(lg) for _, lg in chunks] == [17] * 6 + [18]
    assert [lo for lo, _ in chunks] == list(range(0, 103, 17))
    assert torch.equal(torch.cat([lg for _, lg in chunks]), full)
    if overrides:
        assert full.abs().max() <= 3.0  # soft-capped


class _MatmulCalls(TorchFunctionMode):
    """The `[rows, columns]` of the output of every torch.mm / torch.addmm call made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.mm, torch.addmm):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("bias", [False, True])
def test_head_calls_go_over_equal_vocabulary_blocks_with_the_same_bits(bias, monkeypatch) -> None:
    """On the CPU one LM-head call is a matmul per block of the vocabulary, written into its
    columns of the buffer: blocks of equal size within one column, none under 16 columns (a
    37-column budget over 301 columns: 9 blocks of 33-34; a 5-column one: 18 of 16-17), and
    the logits those of `head(x)`, bit for bit."""
    torch.manual_seed(0)
    head = nn.Linear(24, 301, bias=bias)
    x = torch.randn(40, 24)
    with torch.inference_mode():
        want = head(x)
        for cols, sizes in ((37, [33, 34]), (5, [16, 17]), (10**6, [301])):
            monkeypatch.setattr(ev, "_HEAD_BLOCK_BYTES", 4 * 24 * cols)
            with _MatmulCalls() as calls:
                got = ev._head_into(head, x, 50, {})
            widths = [c for r, c in calls.shapes]
            assert all(r == 40 for r, _ in calls.shapes) and sum(widths) == 301, calls.shapes
            assert sorted(set(widths)) == sizes, widths
            assert torch.equal(got, want)


@pytest.mark.parametrize("knob", ["bytes", "rows"])
@pytest.mark.parametrize("budget", [16, 17, 40, 320, 1024])
def test_head_bounds_fewest_equal_calls_within_the_budget(budget, knob, monkeypatch) -> None:
    """Every row in exactly one call; calls of equal size within a row; none over the budget
    (of logit bytes, or of rows, whichever binds) unless keeping every call at 16 rows or more
    needs it; none under 16 unless the batch is; and no fewer calls would do."""
    vocab = 1000
    monkeypatch.setattr(ev, "_HEAD_BYTES", 4 * vocab * (budget if knob == "bytes" else 10**6))
    monkeypatch.setattr(ev, "_MAX_HEAD_ROWS", budget if knob == "rows" else 10**6)
    for n in [*range(1, 80), 99, 120, 2048, 2049, 5000]:
        bounds = ev.head_bounds(n, vocab)
        sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        assert bounds[0] == 0 and bounds[-1] == n and all(s > 0 for s in sizes), (n, bounds)
        assert max(sizes) - min(sizes) <= 1, (n, sizes)
        assert min(sizes) >= 16 or len(sizes) == 1, (n, sizes)
        if max(sizes) > budget:  # over the budget only where one more call would go under 16 rows
            assert n // (len(sizes) + 1) < 16, (n, sizes)
        if len(sizes) > 1:  # the fewest calls: one fewer would go over the budget
            assert -(-n // (len(sizes) - 1)) > budget, (n, sizes)


def test_head_calls_of_a_default_batch_keep_the_pruning_step_small() -> None:
    """The calls a batch of 8 x 256 rows makes at the shipped budgets: 4 of 512 rows on the
    default model's 49,152-token vocabulary (a 96 MiB logits buffer, what keeps one pruning
    step's peak well below the reference library's 1.39 GB), 7 of 292-293 on a 262k one
    (293 MiB, under a quarter of the bare forward's 2 GiB of logits)."""
    for vocab, sizes in ((49_152, [512] * 4), (262_144, [292] * 3 + [293] * 4)):
        bounds = ev.head_bounds(2048, vocab)
        got = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        assert sorted(got) == sizes, (vocab, got)
        assert 4 * vocab * max(got) <= ev._HEAD_BYTES


def test_a_hook_on_the_head_still_runs_on_every_chunk() -> None:
    """The reused logits buffer bypasses `head(...)`, so a head with a hook (a user's, or
    accelerate's device hook) is called as a module: the hook sees every chunk and what it
    returns is what the metrics are made of."""
    model = tiny_model("llama", seed=3, vocab_size=40, std=0.5)
    w = random_windows(4, 12, seed=2, vocab=40)
    plain = evaluate(model, w, batch_size=2, progress=False)
    shapes, handle = _head_inputs(model)
    again = evaluate(model, w, batch_size=2, progress=False)
    handle.remove()
    assert [s[0] for s in shapes] == [24, 24] and again == plain  # 2-D chunks of 2 x 12 rows
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out * 2)
    doubled = evaluate(model, w, batch_size=2, progress=False)
    handle.remove()
    assert doubled["top10"] == plain["top10"] and doubled["loss"] != pytest.approx(plain["loss"], rel=1e-3)


class _ScaledLlama(LlamaForCausalLM):
    """A subclass whose forward does more than head(body): doubled logits."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unknown_heads_fall_back_to_the_full_forward() -> None:
    """Where the logits may be more than head(body) (an overridden forward, a hook on the
    model, another class), evaluation runs the full forward: lm_head sees whole 3-D batches,
    and the metrics are those of the model's own logits."""
    scaled = _ScaledLlama(tiny_model("llama", seed=3, vocab_size=40, std=0.5).config)
    scaled.load_state_dict(tiny_model("llama", seed=3, vocab_size=40, std=0.5).state_dict())
    scaled.eval()
    hooked = tiny_model("llama", seed=3, vocab_size=40, std=0.5)
    hooked.register_forward_hook(lambda m, a, out: setattr(out, "logits", out.logits * 2) or out)
    plain = tiny_model("llama", seed=3, vocab_size=40, std=0.5)
    w = random_windows(4, 12, seed=2, vocab=40)
    for model in (scaled, hooked, tiny_gemma3_multimodal()):
        assert ev._body_and_head(model) is None
        shapes, handle = _head_inputs(model)
        got = evaluate(model, w, batch_size=2, progress=False)
        handle.remove()
        assert [len(s) for s in shapes] == [3, 3]  # one full forward per batch
        if model is not plain and model.config.model_type == "llama":
            want = direct_metrics(model, w, set())
            assert got["top1"] == pytest.approx(want["top1"], abs=1e-12)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            # doubled logits: the same ranks but another loss than the plain model's
            ref = evaluate(plain, w, batch_size=2, progress=False)
            assert got["top10"] == ref["top10"] and got["loss"] != pytest.approx(ref["loss"], rel=1e-3)
    assert ev._body_and_head(plain) is not None
