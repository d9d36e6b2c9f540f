"""Activation statistics: equal to a brute-force float64 computation, independent of the
batching, saved and loaded intact, and guarded against mismatched or broken inputs (a
file from another model, a corrupt file, NaN activations), by the series too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import random_windows, tiny_gemma3_multimodal, tiny_model  # noqa: E402

from selprune.errors import SelpruneError  # noqa: E402
from selprune.sites import KINDS, NeuronSites, decoder_blocks, find_sites  # noqa: E402
from selprune.stats import FIELDS, ActivationStats, StatsCollector, collect_stats, empty_stats  # noqa: E402


class Capture:
    """Our own pre-hooks: store every input of every site, per (kind, layer)."""

    def __init__(self, sites: NeuronSites) -> None:
        self.sites = sites
        self.inputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.handles = []

    def __enter__(self) -> Capture:
        for kind in KINDS:
            for layer, m in enumerate(self.sites.modules(kind)):
                def hook(mod, args, key=(kind, layer)):
                    self.inputs.setdefault(key, []).append(args[0].detach().to(torch.float64).clone())
                self.handles.append(m.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def tokens(self, kind: str, layer: int) -> torch.Tensor:
        """All captured activations as `[tokens, d_in]` float64."""
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in self.inputs[(kind, layer)]])


def brute_force(cap: Capture) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for kind in KINDS:
        shape = cap.sites.shape(kind)
        per_layer = {f: [] for f in FIELDS}
        for layer in range(shape[0]):
            x = cap.tokens(kind, layer)
            per_layer["sum"].append(x.sum(0))
            per_layer["sum_sq"].append((x * x).sum(0))
            per_layer["sum_abs"].append(x.abs().sum(0))
            per_layer["count_pos"].append((x > 0).sum(0).double())
            per_layer["sum_sqrt"].append(x.abs().sqrt().sum(0))
        out[kind] = {f: torch.stack(v).reshape(shape) for f, v in per_layer.items()}
    return out


def assert_sums_close(stats: ActivationStats, expected: dict, rtol: float = 2e-6) -> None:
    for kind in KINDS:
        for f in FIELDS:
            got, want = stats.sums[kind][f], expected[kind][f]
            assert got.dtype == torch.float64
            scale = float(want.abs().max()) + 1e-12
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=f"{kind}.{f}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen3", "gemma3-multimodal"])
def test_collect_equals_brute_force(family: str) -> None:
    model = tiny_gemma3_multimodal() if family == "gemma3-multimodal" else tiny_model(family)
    sites = find_sites(model)
    windows = random_windows(5, 12, seed=1)
    with Capture(sites) as cap:  # registered first: sees exactly what the collector sees
        stats = collect_stats(model, sites, windows, batch_size=2, progress=False)
    assert stats.n_tokens == 5 * 12
    assert stats.meta["tokens"] == 60
    expected = brute_force(cap)
    assert_sums_close(stats, expected)
    # derived moments
    x = cap.tokens("ff", 1)
    torch.testing.assert_close(stats.mean("ff")[1], x.mean(0), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(stats.moment("ff", "sum_sq")[1], (x * x).mean(0), rtol=2e-6, atol=1e-7)
    # counts are counts
    assert torch.equal(stats.sums["attn"]["count_pos"], expected["attn"]["count_pos"])


def test_collect_is_independent_of_batch_size_and_uses_no_lm_head() -> None:
    model = tiny_model("llama")
    sites = find_sites(model)
    windows = random_windows(6, 8, seed=2)
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    a = collect_stats(model, sites, windows, batch_size=6, progress=False)
    b = collect_stats(model, sites, windows, batch_size=4, progress=False)
    h.remove()
    assert not calls
    for kind in KINDS:
        for f in FIELDS:
            torch.testing.assert_close(a.sums[kind][f], b.sums[kind][f], rtol=1e-5, atol=1e-5)


def test_collect_in_eval_mode_even_for_a_training_model() -> None:
    """OPT has dropout 0.1: statistics of a model left in training mode must not be noisy."""
    model = tiny_model("opt")
    assert model.config.dropout > 0
    sites = find_sites(model)
    windows = random_windows(2, 10)
    ref = collect_stats(model, sites, windows, progress=False)
    model.train()
    torch.manual_seed(123)
    noisy = collect_stats(model, sites, windows, progress=False)
    assert model.training  # the caller's mode is left as it was
    for kind in KINDS:
        torch.testing.assert_close(noisy.sums[kind]["sum"], ref.sums[kind]["sum"], rtol=1e-6, atol=1e-6)


def test_collector_counts_every_token_of_every_batch() -> None:
    """StatsCollector used directly (as the explorer and the benchmarks do): every position
    of every forward pass is a real token, and the sums are the same as collect_stats'."""
    model = tiny_model("llama")
    sites = find_sites(model)
    ids = random_windows(2, 7)
    with StatsCollector(sites) as col, torch.no_grad():
        model.model(input_ids=ids)
        model.model(input_ids=ids[:1])
    stats = col.result()
    assert stats.n_tokens == 3 * 7
    ref = collect_stats(model, sites, torch.cat([ids, ids[:1]]), progress=False)
    torch.testing.assert_close(stats.mean("ff"), ref.mean("ff"), rtol=1e-5, atol=1e-6)


def test_collector_makes_every_layers_sums_before_the_first_forward() -> None:
    """The sums, keep-masks and histograms exist once the collector is entered (made lazily
    in the hook, they fragmented the CPU heap: the pruning step's peak memory varied by
    300 MB); a layer on the meta device gets them in its hook, and a layer no token reached
    reads as zeros."""
    model = tiny_model("llama")
    sites = find_sites(model)
    removed = {k: torch.zeros(sites.shape(k), dtype=torch.bool) for k in KINDS}
    removed["ff"][1, 2] = True
    col = StatsCollector(sites, removed, hist_bins=4)
    with col:
        keys = {(k, layer) for k in KINDS for layer in range(sites.n_layers)}
        assert set(col._acc) == set(col._keep) == set(col._hist) == keys
        assert col._keep[("ff", 1)][2] == 0 and col._keep[("ff", 1)].sum() == sites.shape("ff")[1] - 1
        assert all(a.abs().sum() == 0 for a in col._acc.values())
    meta = _linear_sites()
    meta.ff[0].to("meta")
    with StatsCollector(meta) as col:
        assert ("ff", 0) not in col._acc and ("ff", 1) in col._acc
        col._hook("ff", 0)(meta.ff[0], (torch.ones(1, 2, 3),))  # the hook makes what __enter__ could not
        assert col._acc[("ff", 0)][0].tolist() == [2.0, 2.0, 2.0]  # sum over the 2 tokens
    stats = col.result()
    assert stats.sums["ff"]["sum"][1].abs().sum() == 0


def test_histogram_counts_every_token_once_per_neuron() -> None:
    model = tiny_model("gpt2")
    sites = find_sites(model)
    stats = collect_stats(model, sites, random_windows(5, 9, seed=4), hist_bins=16, progress=False)
    assert stats.n_tokens == stats.meta["tokens"] == 45
    for kind in KINDS:
        assert stats.hist[kind].shape == (*sites.shape(kind), 16)
        assert stats.hist[kind].sum() == 45 * sites.numel(kind)
        assert (stats.hist[kind].sum(-1) == 45).all()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = tiny_model("llama")
    sites = find_sites(model)
    stats = collect_stats(model, sites, random_windows(2, 8), hist_bins=8, hist_range=(-2.0, 3.0),
                          meta={"model": "tiny-llama", "dataset": "x"}, progress=False)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = ActivationStats.load(path)
    assert loaded.n_tokens == stats.n_tokens == 16
    assert loaded.meta == {"model": "tiny-llama", "dataset": "x", "tokens": 16}
    assert loaded.hist_range == (-2.0, 3.0)
    for kind in KINDS:
        for f in FIELDS:
            assert torch.equal(loaded.sums[kind][f], stats.sums[kind][f])
        assert torch.equal(loaded.hist[kind], stats.hist[kind])
        assert torch.equal(loaded.peak(kind), stats.peak(kind))
    loaded.check_matches(sites, "tiny-llama")


def _corrupt_files(tmp_path: Path, good: Path) -> list[Path]:
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00\x01not a safetensors file at all" * 10,
        "empty": b"",
    }
    out = []
    for name, content in files.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        out.append(p)
    p = tmp_path / "foreign.safetensors"  # a valid safetensors file, but not ours
    save_file({"w": torch.zeros(3)}, str(p))
    out.append(p)
    p = tmp_path / "badheader.safetensors"  # ours in form, but the header lacks fields
    save_file({f"{k}.{f}": torch.zeros(2) for k in KINDS for f in FIELDS}, str(p), metadata={"selprune": "{}"})
    out.append(p)
    return out


def test_statistics_from_another_model_name_the_fix(tmp_path: Path) -> None:
    """Statistics saved from another model (d_mlp 40, not 48) are refused when loaded for
    this one, with the model they came from and the fix."""
    other = tiny_model("llama", intermediate_size=40)
    f = tmp_path / "forget.safetensors"
    collect_stats(other, find_sites(other), random_windows(2, 8), meta={"model": "other-tiny-llama"},
                  progress=False).save(f)
    model = tiny_model("llama")
    with pytest.raises(SelpruneError, match=r"statistics have ff shape \(2, 40\) but the model has \(2, 48\): they come "
                                            r"from another model \(other-tiny-llama\); collect them again"):
        ActivationStats.load(f).check_matches(find_sites(model), "tiny-llama")


def test_corrupt_statistics_file_names_the_fix(tmp_path: Path) -> None:
    f = tmp_path / "forget.safetensors"
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(SelpruneError, match=r"statistics file .*forget.safetensors is corrupt .*delete it and collect "
                                            r"again"):
        ActivationStats.load(f)


def test_corrupt_or_missing_file(tmp_path: Path) -> None:
    model = tiny_model("llama")
    sites = find_sites(model)
    good = tmp_path / "good.safetensors"
    collect_stats(model, sites, random_windows(1, 4), progress=False).save(good)
    for bad in _corrupt_files(tmp_path, good):
        with pytest.raises(SelpruneError):
            ActivationStats.load(bad)
    with pytest.raises(SelpruneError, match="does not exist"):
        ActivationStats.load(tmp_path / "missing.safetensors")


def test_check_matches_rejects_another_model() -> None:
    llama = tiny_model("llama")
    stats = collect_stats(llama, find_sites(llama), random_windows(1, 4), meta={"model": "a"}, progress=False)
    wider = tiny_model("llama", intermediate_size=64)
    with pytest.raises(SelpruneError, match="another model"):
        stats.check_matches(find_sites(wider))
    qwen3 = tiny_model("qwen3")  # same ff shape, other attention head width
    with pytest.raises(SelpruneError, match="attn"):
        stats.check_matches(find_sites(qwen3))
    stats.check_matches(find_sites(llama))
    stats.check_matches(find_sites(llama), "a")
    with pytest.raises(SelpruneError, match="collected on model 'a'"):
        stats.check_matches(find_sites(llama), "b")


def _linear_sites(d_ff: int = 3, n_heads: int = 2, d_head: int = 2, n_layers: int = 2) -> NeuronSites:
    """Sites on bare nn.Linear modules, to feed the collector hand-made activations."""
    ff = [nn.Linear(d_ff, 1) for _ in range(n_layers)]
    attn = [nn.Linear(n_heads * d_head, 1) for _ in range(n_layers)]
    return NeuronSites("hand", ff, attn, n_heads, None)


def _feed(sites: NeuronSites, col: StatsCollector, xs: dict[str, torch.Tensor]) -> None:
    """xs[kind]: [layers, tokens, d_in], sent through the sites' modules."""
    with torch.no_grad():
        for kind, x in xs.items():
            for layer, m in enumerate(sites.modules(kind)):
                m(x[layer][None])


def test_histogram_peak() -> None:
    sites = _linear_sites()
    g = torch.Generator().manual_seed(0)
    lo, hi, bins = -4.0, 4.0, 16
    # ff: neuron 0 mostly ~1.3, neuron 1 mostly far beyond the range (outer bin), neuron 2 a tie
    ff = torch.randn(2, 40, 3, generator=g)
    ff[:, :30, 0] = 1.3 + 0.01 * torch.randn(2, 30, generator=g)
    ff[:, :30, 1] = 100.0
    ff[:, :, 2] = torch.tensor([-1.1] * 20 + [2.6] * 20)
    attn = torch.randn(2, 40, 4, generator=g)
    col = StatsCollector(sites, hist_bins=bins, hist_range=(lo, hi))
    with col:
        _feed(sites, col, {"ff": ff, "attn": attn})
    stats = col.result()
    assert stats.hist["ff"].shape == (2, 3, bins)
    edges = np.linspace(lo, hi, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for kind, x in (("ff", ff), ("attn", attn)):
        for layer in range(2):
            for j in range(x.shape[-1]):
                v = np.clip(x[layer, :, j].double().numpy(), lo, hi - 1e-9)
                counts, _ = np.histogram(v, bins=edges)
                np.testing.assert_array_equal(stats.hist[kind].reshape(2, -1, bins)[layer, j].numpy(), counts)
                assert stats.peak(kind).reshape(2, -1)[layer, j].item() == pytest.approx(centres[np.argmax(counts)])
    assert stats.peak("ff")[0, 0].item() == pytest.approx(1.25)  # bin [1.0, 1.5)
    assert stats.peak("ff")[0, 1].item() == pytest.approx(3.75)  # outermost bin
    assert stats.peak("ff")[0, 2].item() == pytest.approx(-1.25)  # tie: lower bin
    no_hist = empty_stats(sites)
    with pytest.raises(SelpruneError, match="histogram"):
        no_hist.peak("ff")


def test_nan_activations_name_the_layer_and_the_fix() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        decoder_blocks(model)[1].mlp.up_proj.weight[0, 0] = float("nan")
    sites = find_sites(model)
    with pytest.raises(SelpruneError, match=r"NaN or inf in the ff activations of layer 1: .*try dtype='float32'"):
        collect_stats(model, sites, random_windows(2, 8), progress=False)


def test_removed_neurons_read_as_zero() -> None:
    model = tiny_model("llama")
    sites = find_sites(model)
    windows = random_windows(2, 8, seed=7)
    removed = {k: torch.zeros(sites.shape(k), dtype=torch.bool) for k in KINDS}
    removed["ff"][0, [1, 5]] = True
    removed["ff"][1, 0] = True
    removed["attn"][1, 2, :] = True  # a whole head
    removed["attn"][0, 0, 3] = True
    full = collect_stats(model, sites, windows, progress=False)
    masked = collect_stats(model, sites, windows, removed=removed, hist_bins=4, progress=False)
    assert masked.n_tokens == full.n_tokens
    for kind in KINDS:
        r = removed[kind]
        for f in FIELDS:
            assert (masked.sums[kind][f][r] == 0).all(), (kind, f)
            assert (full.sums[kind]["sum_abs"][r] > 0).all()  # the inputs still carry them
            torch.testing.assert_close(masked.sums[kind][f][~r], full.sums[kind][f][~r], rtol=1e-6, atol=1e-6)
        # removed neurons sit at 0 in the histogram: a peak of (about) 0
        assert (masked.peak(kind)[r].abs() <= 1.0).all()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_neurons_are_laid_out_by_query_head(family: str) -> None:
    """attn[layer, h, j] is dimension j of query head h: silencing one key/value head's
    values (GQA: it serves 2 query heads) zeroes exactly those heads' statistics."""
    model = tiny_model(family)
    sites = find_sites(model)
    _, n_heads, d_head = sites.shape("attn")
    n_kv = model.config.num_key_value_heads
    group = n_heads // n_kv
    with torch.no_grad():
        decoder_blocks(model)[0].self_attn.v_proj.weight[d_head : 2 * d_head] = 0.0  # kv head 1
    stats = collect_stats(model, sites, random_windows(2, 8), progress=False)
    a = stats.sums["attn"]["sum_abs"][0]  # [n_heads, d_head]
    silent = list(range(group, 2 * group))
    assert (a[silent] == 0).all()
    assert (a[[h for h in range(n_heads) if h not in silent]] > 0).all()
    assert (stats.sums["attn"]["sum_abs"][1] > 0).all()


def test_smollm2_few_tokens_brute_force(smollm) -> None:
    model, _ = smollm  # conftest: the embedded model, fp32, loaded once per session
    sites = find_sites(model)
    windows = torch.tensor([[1, 504, 3301, 28, 253, 1345, 30, 378, 2575, 314, 260, 1767, 3070, 30, 2, 45]])
    with Capture(sites) as cap:
        stats = collect_stats(model, sites, windows, progress=False)
    assert stats.shape("attn") == (30, 9, 64) and stats.n_tokens == 16
    assert_sums_close(stats, brute_force(cap), rtol=1e-5)


# ----------------------------------------------------- statistics a series finds there
SERIES = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "retrain_window": 32, "steps": 2,
          "ff_frac": 0.05, "attn_frac": 0.05, "dtype": "float32", "device": "cpu"}


def _series(run_dir: Path, model_dir: Path):
    from selprune.experiment.series import Series

    return Series(progress=False, **SERIES, model=str(model_dir), run_dir=str(run_dir))


def test_series_refuses_statistics_from_another_model(tmp_path: Path, shared_tiny_llama_dir: Path,
                                                      tiny_llama) -> None:
    """Statistics left in a run directory by another model (d_mlp 48, not the tiny Llama's 64)
    are refused by notebook 01's step, not used."""
    other = tiny_llama(intermediate_size=48)
    windows = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    st = collect_stats(other, find_sites(other), windows, meta={"model": "other-tiny-llama"}, progress=False)
    for side in ("forget", "retain"):
        st.save(tmp_path / "run" / "stats" / f"{side}.safetensors")
    with pytest.raises(SelpruneError, match=r"statistics have ff shape \(2, 48\) but the model has \(2, 64\): they come "
                                            r"from another model \(other-tiny-llama\); collect them again"):
        _series(tmp_path / "run", shared_tiny_llama_dir).collect()


def test_series_refuses_a_corrupt_statistics_file(tmp_path: Path, shared_tiny_llama_dir: Path) -> None:
    f = tmp_path / "run" / "stats" / "forget.safetensors"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(SelpruneError, match=r"statistics file .*forget.safetensors is corrupt .*delete it and collect "
                                            r"again"):
        _series(tmp_path / "run", shared_tiny_llama_dir).collect()
