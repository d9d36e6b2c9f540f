"""Devices without a GPU: no device-to-host sync per batch (checked on the meta device,
where any sync raises), float64 placement, input placement, and models placed by
accelerate (sharded with hooks: same results; offloaded: collection and evaluation work,
pruning is refused with the fix)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from torch import nn
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import random_windows, tiny_model  # noqa: E402

from selprune import stats as stats_module  # noqa: E402
from selprune.errors import SelpruneError  # noqa: E402
from selprune.evaluate import evaluate  # noqa: E402
from selprune.experiment.config import Config  # noqa: E402
from selprune.experiment.loop import run_pruning  # noqa: E402
from selprune.models import float64_device, input_device, load_model  # noqa: E402
from selprune.prune import Pruner  # noqa: E402
from selprune.sites import KINDS, find_sites, weight_out_in  # noqa: E402
from selprune.stats import FIELDS, collect_stats  # noqa: E402

D, F, V, LAYERS, HEADS = 16, 24, 40, 2, 4


# --------------------------------------------------------------- no per-batch sync
class _MetaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.mlp = nn.Module(), nn.Module()
        self.self_attn.o_proj = nn.Linear(D, D, device="meta")
        self.mlp.up = nn.Linear(D, F, device="meta")
        self.mlp.down_proj = nn.Linear(F, D, device="meta")

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [batch, pos, D]
        h = h + self.self_attn.o_proj(torch.tanh(h))
        return h + self.mlp.down_proj(torch.relu(self.mlp.up(h)))


class _MetaBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, D, device="meta")
        self.layers = nn.ModuleList([_MetaBlock() for _ in range(LAYERS)])
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        self.calls += 1
        h = self.embed_tokens(input_ids)
        for block in self.layers:
            h = block(h)
        return h


class MetaLM(nn.Module):
    """A Llama-shaped LM whose weights are all on the meta device: its forward pass does no
    arithmetic and has no data, so anything that reads a value back to the host (`.item()`,
    `float()`, `.cpu()`, `.tolist()`, a data-dependent shape) raises. Unlike a real
    transformers model, its own forward reads nothing back, so every raise is selprune's."""

    base_model_prefix = "model"

    def __init__(self) -> None:
        super().__init__()
        self.config = LlamaConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, vocab_size=V)
        self.model = _MetaBody()
        self.lm_head = nn.Linear(D, V, device="meta")

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids)))


@pytest.mark.parametrize("hist_bins", [0, 8])
def test_collection_reads_nothing_back_until_the_end(hist_bins: int) -> None:
    """Every batch runs on the meta device without a host read; the first read is the one
    transfer of the finished sums (it fails on meta, which is how we know when it comes)."""
    model = MetaLM()
    sites = find_sites(model)
    removed = {k: torch.zeros(sites.shape(k), dtype=torch.bool) for k in KINDS}
    removed["ff"][0, :3] = True
    with pytest.raises(NotImplementedError, match="meta"):
        collect_stats(model, sites, random_windows(7, 6, vocab=V), batch_size=2, removed=removed,
                      hist_bins=hist_bins, progress=False)
    assert model.model.calls == 4  # all four batches ran before the read


def test_evaluation_reads_nothing_back_until_the_end() -> None:
    model = MetaLM()
    with pytest.raises(NotImplementedError, match="meta"):
        evaluate(model, random_windows(7, 6, vocab=V), torch.tensor([3, 4, 99]), batch_size=3, progress=False)
    assert model.model.calls == 3


def test_histogram_without_bincount_counts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync-free histogram path (index_add_, used on CUDA) equals bincount's."""
    model = tiny_model("llama")
    sites = find_sites(model)
    windows = random_windows(3, 10, seed=2)
    want = collect_stats(model, sites, windows, hist_bins=16, progress=False)
    monkeypatch.setattr(stats_module, "_BINCOUNT_DEVICES", ())
    got = collect_stats(model, sites, windows, hist_bins=16, progress=False)
    for kind in KINDS:
        assert want.hist[kind].sum() > 0
        assert torch.equal(got.hist[kind], want.hist[kind])


# ------------------------------------------------------------------ placement
def test_float64_device() -> None:
    assert float64_device(torch.device("cpu")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device(torch.device("mps")) == torch.device("cpu")  # MPS has no float64


def test_input_device() -> None:
    assert input_device(tiny_model("llama")) == torch.device("cpu")
    assert input_device(MetaLM()) == torch.device("meta")  # no hook: the weight's own device
    offloaded = cpu_offload(tiny_model("llama"), execution_device=torch.device("cpu"))
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    assert input_device(offloaded) == torch.device("cpu")  # the hook's execution device


# ------------------------------------------------------------- accelerate placement
def _device_map(model: nn.Module, layer1: str) -> dict[str, str]:
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": layer1, "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _assert_stats_equal(a, b) -> None:
    assert a.n_tokens == b.n_tokens
    for kind in KINDS:
        for f in FIELDS:
            torch.testing.assert_close(a.sums[kind][f], b.sums[kind][f], rtol=1e-6, atol=1e-9, msg=f"{kind}.{f}")


def test_sharded_model_collects_evaluates_and_prunes_like_the_plain_one() -> None:
    """A model dispatched by accelerate with a hook on every block (what device_map='auto'
    gives over several GPUs): same statistics, metrics and pruned outputs."""
    plain = tiny_model("llama")
    sharded = dispatch_model(tiny_model("llama"), device_map=_device_map(plain, "cpu"), force_hooks=True)
    assert hasattr(sharded.model.layers[1], "_hf_hook")
    windows, skip = random_windows(5, 10, seed=3), torch.tensor([5, 6, 7])
    sp, ss = find_sites(plain), find_sites(sharded)
    _assert_stats_equal(collect_stats(sharded, ss, windows, batch_size=2, progress=False),
                        collect_stats(plain, sp, windows, batch_size=2, progress=False))
    assert evaluate(sharded, windows, skip, 2, progress=False) == pytest.approx(evaluate(plain, windows, skip, 2, progress=False))
    new = {"ff": torch.zeros(sp.shape("ff"), dtype=torch.bool), "attn": torch.zeros(sp.shape("attn"), dtype=torch.bool)}
    new["ff"][1, ::3] = True
    new["attn"][1, 2] = True
    values = {k: torch.linspace(-1, 1, sp.numel(k), dtype=torch.float64).reshape(sp.shape(k)) for k in KINDS}
    pp, ps = Pruner(plain, sp), Pruner(sharded, ss)
    for kind in KINDS:
        pp.prune(kind, new[kind], values[kind])
        ps.prune(kind, new[kind], values[kind])
    assert (weight_out_in(ss.ff[1])[:, ::3] == 0).all() and ss.ff[1].bias is not None
    torch.testing.assert_close(sharded(input_ids=windows).logits, plain(input_ids=windows).logits)
    ps.restore()
    assert weight_out_in(ss.ff[1]).abs().sum() > 0 and ss.ff[1].bias is None


def test_offloaded_model_collects_but_refuses_pruning(tmp_path: Path) -> None:
    """Disk offload (weights on the meta device between passes): statistics and metrics
    are still right, but pruning has nothing to write into, so it is refused, with the fix,
    before a run directory is made."""
    plain = tiny_model("llama")
    offloaded = dispatch_model(tiny_model("llama"), device_map=_device_map(plain, "disk"),
                               offload_dir=str(tmp_path / "offload"))
    sites = find_sites(offloaded)
    assert sites.ff[1].weight.device.type == "meta"
    windows = random_windows(4, 10, seed=4)
    _assert_stats_equal(collect_stats(offloaded, sites, windows, progress=False),
                        collect_stats(plain, find_sites(plain), windows, progress=False))
    assert evaluate(offloaded, windows, progress=False) == pytest.approx(evaluate(plain, windows, progress=False))
    with pytest.raises(SelpruneError, match=r"layer 1 has its weights offloaded.*device_map='auto' over enough GPUs"):
        Pruner(offloaded, sites)
    cfg = Config(ff_frac=0.1, steps=1, window=10, retrain_window=10, collect_tokens=40, eval_tokens=40)
    with pytest.raises(SelpruneError, match="offloaded"):
        run_pruning(cfg, "ff", tmp_path / "run", offloaded, None, None, progress=False)
    assert not (tmp_path / "run").exists()


def test_cpu_offload_refused_too() -> None:
    model = cpu_offload(tiny_model("llama"), execution_device=torch.device("cpu"))
    with pytest.raises(SelpruneError, match="ff output projection of layer 0 has its weights offloaded"):
        Pruner(model)


def test_load_model_with_device_map(tiny_llama_dir: Path) -> None:
    """device_map goes through to transformers (on a machine without a GPU, "auto" puts
    everything on the CPU, with or without accelerate's bookkeeping)."""
    model, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu", device_map="auto")
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    plain, _ = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    windows = random_windows(2, 8, seed=5)
    _assert_stats_equal(collect_stats(model, find_sites(model), windows, progress=False),
                        collect_stats(plain, find_sites(plain), windows, progress=False))
