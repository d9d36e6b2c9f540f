"""Shared fixtures: the embedded model, its tokenizer (plain and BOS-adding), tiny Llamas.

Tests never download: the hub is marked offline before transformers or datasets are
imported (a test that needs the real reachability probe unsets the variable itself).
The embedded model is read from the real selprune cache, converted there from the
packaged GGUF on a fresh machine, whatever a test does to SELPRUNE_CACHE.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase  # noqa: E402

from selprune.paths import cache_dir  # noqa: E402

REAL_CACHE = cache_dir()  # before any test can point SELPRUNE_CACHE elsewhere
EMBEDDED = "smollm2-135m"


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """The selprune cache as it was when the session started (tests may override it)."""
    return REAL_CACHE


@pytest.fixture(scope="session")
def smollm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the embedded model in fp32, loaded once per session."""
    from selprune.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELPRUNE_CACHE", str(REAL_CACHE))
        return load_model(EMBEDDED, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm) -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer; it adds no BOS by itself."""
    return smollm[1]


@pytest.fixture(scope="session")
def bos_tokenizer(smollm_tokenizer) -> PreTrainedTokenizerBase:
    """A copy of the embedded tokenizer whose post-processor puts BOS first."""
    tok = copy.deepcopy(smollm_tokenizer)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    return tok


@pytest.fixture(scope="session")
def tiny_llama(smollm_tokenizer) -> Callable[..., LlamaForCausalLM]:
    """A factory of tiny random-init Llamas (vocabulary of the embedded tokenizer, so that
    they run on its token ids); keyword arguments override the LlamaConfig."""

    def make(seed: int = 0, **overrides) -> LlamaForCausalLM:
        tok = smollm_tokenizer
        cfg = {
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "tie_word_embeddings": True,
        }
        cfg.update(overrides)
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**cfg)).eval()

    return make


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama, smollm_tokenizer) -> Path:
    """A local Hugging Face model directory: a tiny random Llama plus the embedded tokenizer."""
    return _save_tiny_llama(tmp_path / "tiny-llama", tiny_llama, smollm_tokenizer)


@pytest.fixture(scope="session")
def shared_tiny_llama_dir(tmp_path_factory, tiny_llama, smollm_tokenizer) -> Path:
    """The same, made once per session for tests that only read it (runs write elsewhere)."""
    return _save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", tiny_llama, smollm_tokenizer)


def _save_tiny_llama(out: Path, tiny_llama, tokenizer) -> Path:
    tiny_llama().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
