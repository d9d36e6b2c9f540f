"""Tiny random-init causal LMs of every supported family, built from configs (no download).

`tiny_model(family, seed=...)` returns a seeded model in eval mode. Widths are chosen so
that the neuron shapes are distinguishable: d_model 32, d_mlp 48, 4 heads, and, where the
config allows it, a head width (12) that is *not* d_model / n_heads, so a test that
confuses the two fails. Weights are initialised with a larger spread than the
transformers default (std 0.02 gives near-uniform logits), so pruning changes outputs
visibly.

Importing this module sets torch to one CPU thread: with two cores shared by several
processes, torch's two-thread kernels spin and run tiny matmuls ~1000x slower.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as T

from selprune.data import Data

torch.set_num_threads(1)

D_MODEL, D_MLP, N_HEADS, N_LAYERS, VOCAB = 32, 48, 4, 2, 128
HEAD_DIM = 12  # for configs with an explicit head_dim (≠ D_MODEL // N_HEADS = 8)

_COMMON = dict(hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
               vocab_size=VOCAB, max_position_embeddings=128)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "opt": (T.OPTConfig, T.OPTForCausalLM,
            dict(hidden_size=D_MODEL, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                 vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=D_MODEL)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel,
             dict(n_embd=D_MODEL, n_inner=D_MLP, n_layer=N_LAYERS, n_head=N_HEADS, vocab_size=VOCAB, n_positions=128)),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(_COMMON)),
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM,
             dict(n_embd=D_MODEL, n_inner=D_MLP, n_layer=N_LAYERS, n_head=N_HEADS, vocab_size=VOCAB, n_positions=128,
                  rotary_dim=4)),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(_COMMON, num_key_value_heads=2)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(_COMMON, num_key_value_heads=2)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(_COMMON, num_key_value_heads=2)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(_COMMON, num_key_value_heads=2, head_dim=HEAD_DIM)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(_COMMON, num_key_value_heads=1, head_dim=HEAD_DIM)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(_COMMON, num_key_value_heads=2, head_dim=HEAD_DIM)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(_COMMON, num_key_value_heads=2, head_dim=HEAD_DIM)),
    "phi": (T.PhiConfig, T.PhiForCausalLM, dict(_COMMON)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(_COMMON, num_key_value_heads=2)),
}

# expected (ff module path, attn module path) inside a block, per family (method.md)
EXPECTED_PATHS: dict[str, tuple[str, str]] = {
    "opt": ("fc2", "self_attn.out_proj"),
    "gpt2": ("mlp.c_proj", "attn.c_proj"),
    "gpt_neox": ("mlp.dense_4h_to_h", "attention.dense"),
    "gptj": ("mlp.fc_out", "attn.out_proj"),
    "phi": ("mlp.fc2", "self_attn.dense"),
    **{f: ("mlp.down_proj", "self_attn.o_proj")
       for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")},
}


def head_dim(family: str) -> int:
    return FAMILIES[family][2].get("head_dim", D_MODEL // N_HEADS)


def tiny_config(family: str, **overrides: Any):
    cfg_cls, _, kw = FAMILIES[family]
    return cfg_cls(**{**kw, **_TOKENS, **overrides})


def _reinit(model: torch.nn.Module, std: float, gen: torch.Generator) -> None:
    """Deterministic weights with a visible spread; normalisation layers keep their defaults."""
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                continue
            for name, p in module.named_parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * (std * 0.5 if name == "bias" else std))


def tiny_model(family: str, seed: int = 0, std: float = 0.3, dtype: torch.dtype = torch.float32,
               **overrides: Any) -> torch.nn.Module:
    """A seeded tiny model of `family` in eval mode. `overrides` go to the config."""
    _, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, **overrides))
    _reinit(model, std, torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    return tiny_model("llama", seed, **overrides)


def random_windows(n: int, window: int, seed: int = 0, vocab: int = VOCAB, low: int = 3) -> torch.Tensor:
    """`[n, window]` random token ids (ids below `low` are kept for special tokens)."""
    return torch.randint(low, vocab, (n, window), generator=torch.Generator().manual_seed(seed))


def zero_input_hook(idx: torch.Tensor | list[int], value: float | torch.Tensor = 0.0) -> Callable:
    """A forward pre-hook replacing input channels `idx` of a projection by `value`."""
    idx = torch.as_tensor(idx)

    def hook(module, args):
        x = args[0].clone()
        x[..., idx] = torch.as_tensor(value, dtype=x.dtype)
        return (x, *args[1:])

    return hook


def tiny_gemma3_multimodal(seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Gemma3ForConditionalGeneration (model_type "gemma3") whose SigLIP vision encoder has
    as many layers as its language model: a trap for finding the decoder blocks by length."""
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                  image_size=28, patch_size=14)
    cfg = T.Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision, mm_tokens_per_image=1)
    torch.manual_seed(seed)
    model = T.Gemma3ForConditionalGeneration(cfg)
    _reinit(model, std, torch.Generator().manual_seed(seed))
    return model.eval()


@functools.cache
def _greedy_windows(lo: int, hi: int, seed: int) -> torch.Tensor:
    """4 windows of 16 tokens: a random 4-token prompt from ids lo..hi-1, continued greedily
    by the tiny llama (seed 0) that the runs prune, so that its unpruned top-1 accuracy is
    high and pruning visibly lowers it."""
    model = tiny_model("llama", seed=0)
    ids = random_windows(4, 4, seed=seed, vocab=hi - lo, low=0) + lo
    with torch.no_grad():
        while ids.shape[1] < 16:
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def loop_data(seed: int = 0) -> Data:
    """Forget prompts use token ids 3..63, retain prompts 64..127: the sets activate differently."""
    def win(lo: int, hi: int, s: int) -> torch.Tensor:
        return _greedy_windows(lo, hi, s).clone()

    d = Data(win(3, 64, seed), win(64, 128, seed + 1), win(3, 64, seed + 2), win(64, 128, seed + 3))
    d.skip = {"forget": torch.tensor([3, 4, 5]), "retain": torch.tensor([64, 65])}
    return d


def pattern_data(window: int = 16, n: int = 8) -> Data:
    """Forget: a repetitive sequence (period 7) that a tiny model learns in a few steps;
    retain: random tokens. For retraining tests."""
    from selprune.windows import top_tokens

    g = torch.Generator().manual_seed(1)

    def pattern(starts: torch.Tensor) -> torch.Tensor:
        return (starts[:, None] + torch.arange(window)) % 7 + 1  # [n, window]

    d = Data(pattern(torch.randint(0, 7, (n,), generator=g)), torch.randint(0, VOCAB, (n, window), generator=g),
             pattern(torch.arange(4)), torch.randint(0, VOCAB, (4, window), generator=g))
    d.skip = {"forget": top_tokens(d.forget_train, 3), "retain": top_tokens(d.retain_train, 3)}
    return d


def random_masks(sites, frac: float = 0.25, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random `frac` of FF and attention neurons, as bool masks."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(sites.shape(k), generator=g) < frac for k in ("ff", "attn")}


def small_datasets(root: Path) -> Path:
    """Local datasets `code` and `prose` under `root`, each a folder with train.jsonl and
    test.jsonl of 12 short documents: enough for a pruning run of a tiny model."""
    texts = {"code": "def f{i}(x):\n    return [y * {i} for y in range(x)]  # {split}\n",
             "prose": "It is a truth universally acknowledged, said Mr {i}, in the {split} chapter.\n"}
    for name, text in texts.items():
        (root / name).mkdir(parents=True)
        for split in ("train", "test"):
            docs = [json.dumps({"text": text.format(i=i, split=split) * 3}) for i in range(12)]
            (root / name / f"{split}.jsonl").write_text("\n".join(docs) + "\n")
    return root


def without_measured(records: list[dict]) -> list[dict]:
    """Step records without what is measured, not computed (wall seconds, memory peaks):
    the rest, the compute's token counts included, must repeat exactly."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "seconds"}
        if "compute" in r:
            r["compute"] = {k: v for k, v in r["compute"].items() if k not in ("seconds", "peak_memory_mb")}
        out.append(r)
    return out
