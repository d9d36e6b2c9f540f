"""Neuron sites: the right output projections for every family, the right shapes, the
structure fallback, and a clear error for an architecture that cannot be found."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import (  # noqa: E402
    D_MLP,
    EXPECTED_PATHS,
    FAMILIES,
    HEAD_DIM,
    N_HEADS,
    N_LAYERS,
    head_dim,
    random_windows,
    tiny_gemma3_multimodal,
    tiny_model,
)

from selprune import sites as sites_mod  # noqa: E402
from selprune.errors import SelpruneError  # noqa: E402
from selprune.sites import ArchSites, decoder_blocks, find_sites, in_features, register_architecture  # noqa: E402


def _capture_widths(model: nn.Module, modules: list[nn.Module]) -> list[int]:
    """Run a forward pass and return the last-dimension width each module's input had."""
    widths: list[int] = [-1] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def hook(mod, args, i=i):
            widths[i] = args[0].shape[-1]
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=random_windows(2, 6))
    finally:
        for h in handles:
            h.remove()
    return widths


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sites_every_family(family: str) -> None:
    model = tiny_model(family)
    s = find_sites(model)
    blocks = decoder_blocks(model)
    assert len(blocks) == N_LAYERS
    ff_path, attn_path = EXPECTED_PATHS[family]
    # the modules are the documented projections, in layer order
    assert [id(m) for m in s.ff] == [id(b.get_submodule(ff_path)) for b in blocks]
    assert [id(m) for m in s.attn] == [id(b.get_submodule(attn_path)) for b in blocks]
    d_head = head_dim(family)
    assert s.shape("ff") == (N_LAYERS, D_MLP)
    assert s.shape("attn") == (N_LAYERS, N_HEADS, d_head)
    assert s.numel("ff") == N_LAYERS * D_MLP and s.numel("attn") == N_LAYERS * N_HEADS * d_head
    # a forward pre-hook on them sees the neurons: width d_mlp / n_heads * d_head
    assert _capture_widths(model, s.ff) == [D_MLP] * N_LAYERS
    assert _capture_widths(model, s.attn) == [N_HEADS * d_head] * N_LAYERS
    assert s.arch is sites_mod.ARCHITECTURES[model.config.model_type]


def test_ff_site_is_after_the_gate_product() -> None:
    """For a gated MLP the FF neuron is act(gate(x)) * up(x), the input of down_proj."""
    model = tiny_model("llama")
    s = find_sites(model)
    mlp = decoder_blocks(model)[1].mlp
    seen = {}
    h1 = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0].clone()))
    h2 = s.ff[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("ff", a[0].clone()))
    with torch.no_grad():
        model(input_ids=random_windows(1, 5))
    h1.remove()
    h2.remove()
    x = seen["mlp_in"]
    expected = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    torch.testing.assert_close(seen["ff"], expected, rtol=1e-5, atol=1e-6)


def test_unknown_kind_rejected() -> None:
    s = find_sites(tiny_model("llama"))
    with pytest.raises(SelpruneError, match="unknown neuron kind"):
        s.shape("mlp")


def test_smollm2_gqa_shapes(smollm) -> None:
    model, _ = smollm  # conftest: the embedded model, fp32, loaded once per session
    s = find_sites(model)
    assert s.shape("ff") == (30, 1536)
    assert s.shape("attn") == (30, 9, 64)  # 9 query heads of 64; only 3 key/value heads
    assert model.config.num_key_value_heads == 3
    widths = {}
    hooks = [s.ff[29].register_forward_pre_hook(lambda m, a: widths.__setitem__("ff", a[0].shape[-1])),
             s.attn[0].register_forward_pre_hook(lambda m, a: widths.__setitem__("attn", a[0].shape[-1]))]
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for h in hooks:
        h.remove()
    assert widths == {"ff": 1536, "attn": 576}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "gptj", "phi", "gemma3", "qwen3", "phi3"])
def test_structure_fallback(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(family)
    registered = find_sites(model)
    monkeypatch.delitem(sites_mod.ARCHITECTURES, model.config.model_type)
    found = find_sites(model)
    assert found.arch is None
    assert [id(m) for m in found.ff] == [id(m) for m in registered.ff]
    assert [id(m) for m in found.attn] == [id(m) for m in registered.attn]
    assert found.shape("ff") == registered.shape("ff") and found.shape("attn") == registered.shape("attn")


class _WeirdConfig(PretrainedConfig):
    model_type = "weird_arch"


class _WeirdBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = nn.Linear(8, 8)
        self.proj = nn.Linear(12, 8)


class _WeirdModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _WeirdConfig(num_hidden_layers=3, hidden_size=8, num_attention_heads=2)
        self.layers = nn.ModuleList(_WeirdBlock() for _ in range(3))


def test_unfindable_architecture_error_and_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _WeirdModel()
    with pytest.raises(SelpruneError) as e:
        find_sites(model)
    assert "weird_arch" in str(e.value) and "register_architecture" in str(e.value)
    monkeypatch.setattr(sites_mod, "ARCHITECTURES", dict(sites_mod.ARCHITECTURES))
    register_architecture("weird_arch", ArchSites(ff_out="proj", attn_out="mixer"))
    s = find_sites(model)
    assert s.ff == [b.proj for b in model.layers] and s.attn == [b.mixer for b in model.layers]
    assert s.shape("ff") == (3, 12) and s.shape("attn") == (3, 2, 4)
    with pytest.raises(SelpruneError, match="overwrite"):
        register_architecture("weird_arch", ArchSites(ff_out="proj", attn_out="mixer"))
    register_architecture("weird_arch", ArchSites(ff_out="nope", attn_out="mixer"), overwrite=True)
    with pytest.raises(SelpruneError, match="nope"):
        find_sites(model)


def test_architecture_without_neuron_sites_names_the_fix(tmp_path: Path, smollm_tokenizer) -> None:
    """A model directory of an architecture with no attention and no MLP (Mamba) loads,
    but finding its sites (the first step of every notebook) says what to register."""
    import transformers as T

    from selprune.models import load_model

    mamba = tmp_path / "tiny-mamba"
    T.MambaForCausalLM(T.MambaConfig(vocab_size=len(smollm_tokenizer), hidden_size=16, state_size=4,
                                     num_hidden_layers=2, intermediate_size=32)).save_pretrained(mamba)
    smollm_tokenizer.save_pretrained(mamba)
    model, _ = load_model(str(mamba), dtype="float32", device="cpu")
    with pytest.raises(SelpruneError, match=r"architecture 'mamba' .* no registered neuron sites.*register_architecture"):
        find_sites(model)


def test_conv1d_in_features_is_transposed() -> None:
    model = tiny_model("gpt2")
    s = find_sites(model)
    assert s.ff[0].weight.shape == (D_MLP, 32)  # Conv1D stores [in, out]
    assert in_features(s.ff[0]) == D_MLP


@pytest.mark.parametrize("registered", [True, False])
def test_multimodal_gemma3_picks_the_language_model(registered: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gemma3_multimodal()
    assert model.config.model_type == "gemma3"
    if not registered:
        monkeypatch.delitem(sites_mod.ARCHITECTURES, "gemma3")
    s = find_sites(model)
    text_layers = model.model.language_model.layers
    assert s.ff == [b.mlp.down_proj for b in text_layers]
    assert s.attn == [b.self_attn.o_proj for b in text_layers]
    assert s.shape("ff") == (N_LAYERS, D_MLP) and s.shape("attn") == (N_LAYERS, N_HEADS, HEAD_DIM)
    assert _capture_widths(model, s.ff) == [D_MLP] * N_LAYERS
