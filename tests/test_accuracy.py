"""The embedded model really predicts: next-token accuracy on the bundled test splits is
far above chance (1/49152), in fp32 and in bf16 (issue #2)."""

from __future__ import annotations

import pytest
import torch

from selprune.evaluate import evaluate
from selprune.models import load_model
from selprune.texts import load_texts, token_windows

WINDOW = 128


@pytest.fixture(scope="module")
def smollm_bf16(real_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELPRUNE_CACHE", str(real_cache))
        return load_model("smollm2-135m", dtype="bfloat16", device="cpu")


def windows(name: str, tokenizer, max_tokens: int) -> torch.Tensor:
    return token_windows(load_texts(name, "test"), tokenizer, window=WINDOW, max_tokens=max_tokens, seed=0)


@pytest.mark.parametrize("name", ["prose", "code"])
def test_fp32_accuracy_far_above_chance(smollm, name):
    model, tok = smollm
    w = windows(name, tok, 1024)
    metrics = evaluate(model, w, skip_ids=None, batch_size=8, progress=False)
    assert metrics["tokens"] == w.shape[0] * (WINDOW - 1) == 8 * 127
    assert metrics["top1"] > 0.2, metrics
    assert metrics["top10"] > 0.4, metrics
    assert metrics["top10"] >= metrics["top1"]
    assert metrics["loss"] < 0.5 * torch.log(torch.tensor(float(len(tok)))).item()  # far below uniform


@pytest.mark.parametrize("name", ["prose", "code"])
def test_bf16_accuracy_far_above_chance_and_near_fp32(smollm, smollm_bf16, name):
    model, tok = smollm_bf16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    w = windows(name, tok, WINDOW)  # one window: bf16 matmuls are slow on most CPUs
    metrics = evaluate(model, w, skip_ids=None, batch_size=8, progress=False)
    assert metrics["tokens"] == WINDOW - 1
    assert metrics["top1"] > 0.2, metrics
    assert metrics["top10"] > 0.4, metrics
    fp32 = evaluate(smollm[0], w, skip_ids=None, batch_size=8, progress=False)
    assert abs(metrics["top1"] - fp32["top1"]) < 0.1, (metrics, fp32)
