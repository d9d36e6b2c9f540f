"""Neuron sites: where the FF and attention neurons of a causal or masked LM (or a ViT) live.

A neuron is one input channel of an output projection (docs/method.md, "Neurons"):
- FF neuron j of layer l: channel j of the input of block l's FFN output projection,
  after the activation (and gate product). Shape `[n_layers, d_mlp]`.
- attention neuron (h, j): channel h * d_head + j of the input of the attention output
  projection, i.e. head h's attention-weighted value vector. Shape `[n_layers, n_heads, d_head]`.
A forward pre-hook on the projection sees exactly these activations, for every
architecture, without touching model code. `ARCHITECTURES` maps a `config.model_type` to
the projections' paths inside a block (data, not if-chains); an unregistered model type
falls back to a search by structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from selprune.errors import SelpruneError

KINDS = ("ff", "attn")


@dataclass(frozen=True)
class ArchSites:
    """Paths, relative to one decoder block, of the two output projections."""

    ff_out: str
    attn_out: str
    # config flags that give the FF / attention projections a bias when set (for export of
    # mean ablation on architectures whose projections have none); None: no such flag.
    bias_flags: dict[str, str] = field(default_factory=dict)


_LLAMA_LIKE = ArchSites("mlp.down_proj", "self_attn.o_proj", {"attn": "attention_bias"})
_BERT_LIKE = ArchSites("output.dense", "attention.output.dense")  # FF: after the intermediate GELU
ARCHITECTURES: dict[str, ArchSites] = {
    "opt": ArchSites("fc2", "self_attn.out_proj", {"ff": "enable_bias", "attn": "enable_bias"}),
    "gpt2": ArchSites("mlp.c_proj", "attn.c_proj"),
    "gpt_neox": ArchSites("mlp.dense_4h_to_h", "attention.dense", {"attn": "attention_bias"}),
    "gptj": ArchSites("mlp.fc_out", "attn.out_proj"),
    "llama": ArchSites("mlp.down_proj", "self_attn.o_proj", {"ff": "mlp_bias", "attn": "attention_bias"}),
    "mistral": ArchSites("mlp.down_proj", "self_attn.o_proj"),
    "qwen2": ArchSites("mlp.down_proj", "self_attn.o_proj"),
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi": ArchSites("mlp.fc2", "self_attn.dense"),
    "phi3": ArchSites("mlp.down_proj", "self_attn.o_proj"),
    # masked LMs (encoder blocks; the neurons are defined the same way)
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": ArchSites("ffn.lin2", "attention.out_lin"),
    # vision transformers (selprune.vision), over patch tokens (transformers 5's layout)
    "vit": ArchSites("mlp.fc2", "attention.o_proj"),
    "deit": ArchSites("mlp.fc2", "attention.o_proj"),
}
# model types whose layout the neuron definition does not fit, and why
UNSUPPORTED: dict[str, str] = {
    "albert": "ALBERT shares one block's weights across all its layers, so a neuron cannot be pruned in one "
              "layer alone; use BERT, RoBERTa, DistilBERT or ELECTRA",
}


def register_architecture(model_type: str, sites: ArchSites, *, overwrite: bool = False) -> None:
    """Teach selprune a new `config.model_type`."""
    if model_type in ARCHITECTURES and not overwrite:
        raise SelpruneError(f"architecture {model_type!r} is registered already; pass overwrite=True")
    ARCHITECTURES[model_type] = sites


@dataclass
class NeuronSites:
    """The output projections of every block, and the neuron shapes they define."""

    model_type: str
    ff: list[nn.Module]  # FFN output projection of each layer
    attn: list[nn.Module]  # attention output projection of each layer
    n_heads: int
    arch: ArchSites | None  # None when found by structure

    @property
    def n_layers(self) -> int:
        return len(self.ff)

    @property
    def d_mlp(self) -> int:
        return in_features(self.ff[0])

    @property
    def d_head(self) -> int:
        return in_features(self.attn[0]) // self.n_heads

    def shape(self, kind: str) -> tuple[int, ...]:
        """Neuron shape: ff `[n_layers, d_mlp]`, attn `[n_layers, n_heads, d_head]`."""
        if kind == "ff":
            return (self.n_layers, self.d_mlp)
        if kind == "attn":
            return (self.n_layers, self.n_heads, self.d_head)
        raise SelpruneError(f"unknown neuron kind {kind!r}; use one of {KINDS}")

    def modules(self, kind: str) -> list[nn.Module]:
        return self.ff if kind == "ff" else self.attn

    def numel(self, kind: str) -> int:
        return int(torch.Size(self.shape(kind)).numel())


# ----------------------------------------------------------- projection weight access
def in_features(module: nn.Module) -> int:
    """Input width of a projection: nn.Linear weight is [out, in]; GPT-2's Conv1D is [in, out]."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0]
    if isinstance(module, nn.Linear):
        return module.in_features
    raise SelpruneError(f"output projection {type(module).__name__} is neither nn.Linear nor Conv1D")


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an `[out, in]` view (GPT-2's Conv1D stores it transposed): writing
    into the view writes the module's own weight."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


# ---------------------------------------------------------------------- discovery
def _config_value(config, *names: str) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int):
                return value
    return None


def _block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Candidate block lists: ModuleLists with `num_hidden_layers` entries (any length if
    the config does not say), longest first, in model order among equals."""
    n = _config_value(model.config, "num_hidden_layers", "n_layer", "num_layers")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [m for m in lists if len(m) == n]
    return sorted(lists, key=len, reverse=True)


def _has_path(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def decoder_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder blocks: the ModuleList with `num_hidden_layers` entries (the longest if
    the config does not say), found by structure so that wrappers do not matter. With
    `path`, the first such list whose blocks contain it: a multimodal model's vision
    encoder may have as many layers as its language model."""
    lists = _block_lists(model)
    if not lists:
        raise SelpruneError(f"could not find the decoder blocks of {type(model).__name__}")
    if path is not None:
        for blocks in lists:
            if _has_path(blocks[0], path):
                return blocks
    return lists[0]


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def _find_by_structure(block: nn.Module, d_model: int) -> tuple[str, str] | None:
    """Guess the projections in a block: the attention output projection is the last
    linear map into d_model inside a submodule named like attention; the FF output
    projection is the last linear map into d_model elsewhere."""
    attn, ff = None, None
    for name, m in block.named_modules():
        if not _linear_like(m) or out_features(m) != d_model:
            continue
        if any(part in name.lower() for part in ("attn", "attention")):
            attn = name
        elif any(part in name.lower() for part in ("mlp", "ffn", "feed_forward", "fc")):
            ff = name
    return (ff, attn) if ff and attn else None


def find_sites(model: nn.Module) -> NeuronSites:
    """Locate the FF and attention output projections of every block."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type in UNSUPPORTED:
        raise SelpruneError(f"{model_type}: {UNSUPPORTED[model_type]}")
    n_heads = _config_value(model.config, "num_attention_heads", "n_head", "num_heads")
    arch = ARCHITECTURES.get(model_type)
    if arch is not None:
        ff_path, attn_path = arch.ff_out, arch.attn_out
        blocks = decoder_blocks(model, ff_path)
    else:
        blocks = decoder_blocks(model)
        d_model = _config_value(model.config, "hidden_size", "n_embd", "d_model")
        found = None
        for candidate in _block_lists(model) if d_model else []:
            found = _find_by_structure(candidate[0], d_model)
            if found is not None:
                blocks = candidate
                break
        if found is None or n_heads is None:
            raise SelpruneError(
                f"architecture {model_type!r} ({type(model).__name__}) has no registered neuron sites and "
                "its projections could not be found by structure; register them with "
                "selprune.sites.register_architecture(model_type, ArchSites(ff_out='mlp.<name>', "
                "attn_out='self_attn.<name>'))"
            )
        ff_path, attn_path = found
    try:
        ff = [b.get_submodule(ff_path) for b in blocks]
        attn = [b.get_submodule(attn_path) for b in blocks]
    except AttributeError as e:
        raise SelpruneError(
            f"architecture {model_type!r}: registered paths {ff_path!r} / {attn_path!r} do not exist in its "
            f"blocks ({e}); fix the entry with selprune.sites.register_architecture(..., overwrite=True)"
        ) from e
    for m in ff + attn:
        in_features(m)  # raises a clear error for an unsupported projection type
    sites = NeuronSites(model_type, ff, attn, int(n_heads), arch)
    if in_features(attn[0]) % sites.n_heads:
        raise SelpruneError(f"{model_type}: attention projection width is not a multiple of {n_heads} heads")
    return sites
