"""Looking inside: one neuron's statistics and where it fires, and generations before and
after pruning (notebook 05's explorer). Read-only: nothing here writes to a run directory."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune.errors import SelpruneError
from selprune.experiment.rundir import RunDir
from selprune.scoring import score
from selprune.sites import NeuronSites
from selprune.stats import ActivationStats

MOMENTS = ("sum", "sum_abs", "sum_sq", "count_pos", "sum_sqrt")  # per-token means of x, |x|, x^2, x > 0, sqrt|x|


@torch.inference_mode()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: dict[str, str], run: RunDir,
                label: str, max_new_tokens: int = 32) -> pd.DataFrame:
    """Greedy continuations of each prompt by the unpruned model and after the last step
    of the pruning run in `run` (the model is restored afterwards)."""
    rows = [{"prompt": name, "model": "unpruned", "text": generate(model, tokenizer, p, max_new_tokens)}
            for name, p in prompts.items()]
    pruner = run.replay(model)
    try:
        rows += [{"prompt": name, "model": f"pruned ({label})", "text": generate(model, tokenizer, p, max_new_tokens)}
                 for name, p in prompts.items()]
    finally:
        pruner.restore()
    return pd.DataFrame(rows)


def neuron_report(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sites: NeuronSites,
                  stats: dict[str, ActivationStats], windows: dict[str, torch.Tensor], importance: str,
                  kind: str, layer: int, index: int, top: int = 5, context: int = 8) -> dict[str, Any]:
    """One neuron: its statistics on forget and retain (`stats`: side -> statistics), its
    score rank under `importance`, and the text snippets of `windows` (side -> a few
    collection windows) where it fires most, the firing token in [[brackets]]."""
    shape = sites.shape(kind)
    per_layer = int(torch.Size(shape[1:]).numel())
    if not (0 <= layer < shape[0] and 0 <= index < per_layer):
        raise SelpruneError(f"{kind} neuron ({layer}, {index}) is out of range: layers 0..{shape[0] - 1}, "
                            f"neurons 0..{per_layer - 1}")
    flat = score(stats["forget"], stats["retain"], importance)[kind].reshape(-1)
    at = layer * per_layer + index
    moments = {side: {m: float(st.moment(kind, m).reshape(shape[0], -1)[layer, index]) for m in MOMENTS}
               for side, st in stats.items()}
    snippets = []
    for side, w in windows.items():
        acts = _activations(model, sites.modules(kind)[layer], w, index)  # [batch, pos]
        for flat_i in acts.reshape(-1).abs().argsort(descending=True, stable=True)[:top].tolist():
            row, pos = divmod(flat_i, acts.shape[1])
            ids = w[row, max(0, pos - context): pos + 1].tolist()
            snippets.append({"dataset": side, "activation": float(acts[row, pos]),
                             "text": tokenizer.decode(ids[:-1]) + "[[" + tokenizer.decode(ids[-1:]) + "]]"})
    return {"kind": kind, "layer": layer, "index": index, "score": float(flat[at]),
            "rank": int((flat > flat[at]).sum()) + 1, "of": flat.numel(),
            "mean": {k: v["sum"] for k, v in moments.items()},
            "mean_abs": {k: v["sum_abs"] for k, v in moments.items()},
            "frac_positive": {k: v["count_pos"] for k, v in moments.items()},
            "snippets": pd.DataFrame(snippets)}


def _activations(model: nn.Module, module: nn.Module, windows: torch.Tensor, index: int) -> torch.Tensor:
    """Channel `index` of `module`'s input over `windows`: `[batch, pos]` float32 on the CPU."""
    acts: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, a: acts.append(a[0][..., index].float().cpu()))
    try:
        with torch.inference_mode():
            model(input_ids=windows.to(model.device), use_cache=False)
    finally:
        handle.remove()
    return acts[0]
