"""Removal: pruning equals ablating the activation with a hook; restore is bit-exact;
export reloads with plain transformers and gives the pruned logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import random_windows, tiny_model  # noqa: E402

from selprune.errors import SelpruneError  # noqa: E402
from selprune.prune import Pruner, ablation_values, export_pruned, masks_summary  # noqa: E402
from selprune.sites import KINDS, NeuronSites, find_sites  # noqa: E402
from selprune.stats import collect_stats  # noqa: E402

WINDOWS = random_windows(2, 10, seed=42)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=WINDOWS).logits.double()


def random_mask(sites: NeuronSites, kind: str, frac: float = 0.25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(sites.shape(kind), generator=g) < frac


def hooked_logits(model, sites: NeuronSites, kind: str, mask: torch.Tensor, values: torch.Tensor | None = None):
    """Logits of the *unpruned* model with a pre-hook that sets activation j of every
    masked neuron to 0 (or to values[j])."""
    handles = []
    for layer, module in enumerate(sites.modules(kind)):
        m = mask[layer].reshape(-1)
        c = None if values is None else values[layer].reshape(-1)

        def hook(mod, args, m=m, c=c):
            x = args[0].clone()
            x[..., m] = 0.0 if c is None else c[m].to(x.dtype)
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        return logits(model)
    finally:
        for h in handles:
            h.remove()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(before)
    for k, v in before.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_ablation_equals_hook(family: str, kind: str) -> None:
    model = tiny_model(family)
    sites = find_sites(model)
    mask = random_mask(sites, kind, seed=1)
    base = logits(model)
    want = hooked_logits(model, sites, kind, mask)
    assert (want - base).abs().max() > 1e-3  # the ablation matters
    pruner = Pruner(model, sites)
    assert pruner.prune(kind, mask) == int(mask.sum())
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(pruner.masks[kind], mask)
    assert pruner.fraction(kind) == int(mask.sum()) / mask.numel()
    assert not pruner.masks[[k for k in KINDS if k != kind][0]].any()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", KINDS)
def test_mean_ablation_equals_constant_hook(family: str, kind: str) -> None:
    model = tiny_model(family)
    sites = find_sites(model)
    had_bias = sites.modules(kind)[0].bias is not None
    g = torch.Generator().manual_seed(7)
    m1, m2 = random_mask(sites, kind, 0.15, seed=2), random_mask(sites, kind, 0.15, seed=3)
    c1 = torch.randn(sites.shape(kind), generator=g, dtype=torch.float64)
    c2 = torch.randn(sites.shape(kind), generator=g, dtype=torch.float64)
    # two steps: each neuron keeps the constant of the step that pruned it
    values = torch.where(m1, c1, c2)
    want = hooked_logits(model, sites, kind, m1 | m2, values)
    zero = hooked_logits(model, sites, kind, m1 | m2)
    assert (want - zero).abs().max() > 1e-3  # the constants matter
    pruner = Pruner(model, sites)
    pruner.prune(kind, m1, c1)
    pruner.prune(kind, m2, c2)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    assert all(m.bias is not None for m in sites.modules(kind))
    assert pruner.added_bias[kind] == (not had_bias)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_bit_identical(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype=dtype)
    sites = find_sites(model)
    before = snapshot(model)
    base = logits(model)
    pruner = Pruner(model, sites)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        for kind in KINDS:
            values = torch.randn(sites.shape(kind), generator=g, dtype=torch.float64) if step != 1 else None
            pruner.prune(kind, random_mask(sites, kind, 0.2, seed=10 * step + len(kind)), values)
    assert not torch.equal(logits(model), base)
    pruner.restore()
    assert_state_equal(model, before)  # includes: no bias left behind on bias-less projections
    if family == "llama":
        assert all(m.bias is None for k in KINDS for m in sites.modules(k))
    assert torch.equal(logits(model), base)
    assert not any(m.any() for m in pruner.masks.values())
    # and it can be pruned again after a restore
    pruner.prune("ff", random_mask(sites, "ff", seed=5))
    assert not torch.equal(logits(model), base)


def test_prune_twice_and_bad_shapes() -> None:
    model = tiny_model("llama")
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    mask = random_mask(sites, "ff")
    assert pruner.prune("ff", mask) == int(mask.sum())
    assert pruner.prune("ff", mask) == 0
    with pytest.raises(SelpruneError, match="shape"):
        pruner.prune("ff", torch.ones(sites.shape("ff")[1], dtype=torch.bool))  # one layer's worth: no broadcast
    with pytest.raises(SelpruneError, match="shape"):
        pruner.prune("attn", torch.zeros(2, 32, dtype=torch.bool))
    with pytest.raises(SelpruneError, match="shape"):
        pruner.prune("ff", ~mask, torch.zeros(3))


def test_masks_roundtrip_and_summary(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    for kind in KINDS:
        pruner.prune(kind, random_mask(sites, kind, seed=len(kind)))
    pruner.save_masks(tmp_path / "m.safetensors")
    loaded = load_file(str(tmp_path / "m.safetensors"))
    assert set(loaded) == set(KINDS)
    for kind in KINDS:
        assert loaded[kind].dtype == torch.uint8 and torch.equal(loaded[kind].bool(), pruner.masks[kind])
    summary = masks_summary(pruner.masks)
    for kind in KINDS:
        m = pruner.masks[kind]
        assert summary[kind] == [int(m[i].sum()) for i in range(m.shape[0])]


def test_ablation_values() -> None:
    model = tiny_model("llama")
    sites = find_sites(model)
    stats = collect_stats(model, sites, WINDOWS, hist_bins=8, progress=False)
    assert ablation_values("zero", stats, "ff") is None
    assert torch.equal(ablation_values("mean", stats, "attn"), stats.sums["attn"]["sum"] / stats.n_tokens)
    assert torch.equal(ablation_values("peak", stats, "ff"), stats.peak("ff"))
    with pytest.raises(SelpruneError, match="retain"):
        ablation_values("mean", None, "ff")
    with pytest.raises(SelpruneError, match="zero"):
        ablation_values("median", stats, "ff")


def _reload(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_zero_ablation(family: str, tmp_path: Path, smollm_tokenizer) -> None:
    model = tiny_model(family)
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    for kind in KINDS:
        pruner.prune(kind, random_mask(sites, kind, seed=len(kind)))
    pruned = logits(model)
    out = export_pruned(model, pruner, tmp_path / "export", smollm_tokenizer)
    assert out == tmp_path / "export"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind
    reloaded = _reload(out)
    torch.testing.assert_close(logits(reloaded), pruned, rtol=1e-6, atol=1e-6)
    assert torch.equal(load_file(str(out / "selprune_masks.safetensors"))["ff"].bool(), pruner.masks["ff"])
    counts = json.loads((out / "selprune_pruning.json").read_text())
    assert counts == {k: int(pruner.masks[k].sum()) for k in KINDS}
    export_pruned(model, pruner, out, smollm_tokenizer)  # overwriting an export works


@pytest.mark.parametrize("kinds", [("ff",), ("attn",), ("ff", "attn")])
def test_export_mean_ablation_on_biasless_llama(kinds: tuple[str, ...], tmp_path: Path, smollm_tokenizer) -> None:
    model = tiny_model("llama")
    assert not model.config.mlp_bias and not model.config.attention_bias
    sites = find_sites(model)
    stats = collect_stats(model, sites, WINDOWS, progress=False)
    pruner = Pruner(model, sites)
    for kind in kinds:
        pruner.prune(kind, random_mask(sites, kind, seed=len(kind)), ablation_values("mean", stats, kind))
    pruned = logits(model)
    fresh = tiny_model("llama")  # the same masks with zero ablation, for contrast
    zero_pruner = Pruner(fresh)
    for kind in kinds:
        zero_pruner.prune(kind, pruner.masks[kind])
    zero = logits(fresh)
    out = export_pruned(model, pruner, tmp_path / "export", smollm_tokenizer)
    assert not model.config.mlp_bias and not model.config.attention_bias  # the live config is left alone
    reloaded = _reload(out)
    assert reloaded.config.mlp_bias == ("ff" in kinds)
    assert reloaded.config.attention_bias == ("attn" in kinds)
    got = logits(reloaded)
    torch.testing.assert_close(got, pruned, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, zero, atol=1e-3)
    rs = find_sites(reloaded)
    for kind in kinds:  # the bias really is there
        assert all(m.bias is not None for m in rs.modules(kind))


@pytest.mark.parametrize(("family", "overrides"), [
    ("qwen3", {}), ("gemma", {}), ("gemma3", {}), ("gpt_neox", {"attention_bias": False}),
])
def test_export_mean_ablation_attention_bias_flag(family: str, overrides: dict, tmp_path: Path, smollm_tokenizer) -> None:
    """Other families whose attention output projection gets its bias from `attention_bias`."""
    model = tiny_model(family, **overrides)
    sites = find_sites(model)
    assert sites.attn[0].bias is None
    pruner = Pruner(model, sites)
    g = torch.Generator().manual_seed(1)
    pruner.prune("attn", random_mask(sites, "attn"), torch.randn(sites.shape("attn"), generator=g, dtype=torch.float64))
    pruned = logits(model)
    reloaded = _reload(export_pruned(model, pruner, tmp_path / "export", smollm_tokenizer))
    assert reloaded.config.attention_bias
    torch.testing.assert_close(logits(reloaded), pruned, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("family", "kind"), [("mistral", "ff"), ("mistral", "attn"), ("gptj", "attn"),
                                              ("qwen2", "attn"), ("phi3", "ff"), ("gemma3", "ff")])
def test_export_mean_ablation_without_bias_flag_fails_clearly(family: str, kind: str, tmp_path: Path, smollm_tokenizer) -> None:
    model = tiny_model(family)
    sites = find_sites(model)
    assert sites.modules(kind)[0].bias is None
    pruner = Pruner(model, sites)
    pruner.prune(kind, random_mask(sites, kind), torch.ones(sites.shape(kind), dtype=torch.float64))
    with pytest.raises(SelpruneError) as e:
        export_pruned(model, pruner, tmp_path / "export", smollm_tokenizer)
    assert model.config.model_type in str(e.value) and "zero" in str(e.value)
    assert not (tmp_path / "export").exists()


# ------------------------------------------------- the export is a complete model (#20)
COMPLETE = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
PROMPT = "def add(a, b):\n    return"


def _export_mean_pruned(tiny_llama, tokenizer, out: Path):
    """A tiny Llama on the embedded tokenizer's vocabulary, FF mean-ablated (so the export
    gains biases and a config flag), exported with the tokenizer: (out, pruned logits)."""
    model = tiny_llama()
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    pruner.prune("ff", random_mask(sites, "ff"), ablation_values("mean", collect_stats(model, sites, WINDOWS,
                                                                                       progress=False), "ff"))
    return export_pruned(model, pruner, out, tokenizer), logits(model)


def test_export_loads_with_plain_transformers(tmp_path: Path, tiny_llama, smollm_tokenizer) -> None:
    """AutoModelForCausalLM, AutoTokenizer and pipeline on the folder alone (#20: it had no tokenizer)."""
    from transformers import AutoTokenizer, pipeline

    out, pruned = _export_mean_pruned(tiny_llama, smollm_tokenizer, tmp_path / "pruned-model")
    assert COMPLETE <= {p.name for p in out.iterdir()}, sorted(p.name for p in out.iterdir())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(PROMPT).input_ids == smollm_tokenizer(PROMPT).input_ids
    assert tok.eos_token_id == smollm_tokenizer.eos_token_id
    model = _reload(out)
    torch.testing.assert_close(logits(model), pruned, rtol=1e-6, atol=1e-6)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    expected = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0])
    generate = pipeline("text-generation", model=str(out), device="cpu")
    text = generate(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text == expected and text.startswith(PROMPT) and len(text) > len(PROMPT)


def test_export_loads_in_selprune_to_prune_evaluate_and_retrain(tmp_path: Path, tiny_llama, smollm_tokenizer) -> None:
    """`load_model` on the export, then a further pruning run, an evaluation and a short retraining."""
    from tiny_models import loop_data

    from selprune.evaluate import evaluate_both
    from selprune.experiment.config import Config, validate
    from selprune.experiment.loop import run_pruning
    from selprune.experiment.retrain import retrain
    from selprune.models import load_model

    out, pruned = _export_mean_pruned(tiny_llama, smollm_tokenizer, tmp_path / "pruned-model")
    model, tok = load_model(str(out), dtype="float32", device="cpu")
    torch.testing.assert_close(logits(model), pruned, rtol=1e-6, atol=1e-6)
    assert tok(PROMPT).input_ids == smollm_tokenizer(PROMPT).input_ids
    cfg = Config(ff_frac=0.1, attn_frac=0.05, steps=2, window=16, collect_tokens=64, eval_tokens=64, batch_size=4,
                 skip_k=5, ablation="mean", retrain_window=16, retrain_steps=2, retrain_batch=2)
    validate(cfg, relearn=True)
    data = loop_data()
    records, pruner = run_pruning(cfg, "both", tmp_path / "run", model, tok, data, progress=False)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["fraction"]["ff"] == pytest.approx(0.2, abs=0.03) and records[-1]["fraction"]["attn"] > 0
    metrics = evaluate_both(model, data, cfg.batch_size, False)  # the model is left pruned as of the last step
    assert metrics["forget"] == pytest.approx(records[-1]["forget"])
    assert metrics["retain"] == pytest.approx(records[-1]["retain"])
    before = snapshot(model)
    curve = retrain(model, pruner.masks, pruner.sites, data, cfg, progress=False)
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 2
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()), "retraining changed nothing"



def test_selprune_prune_runs_on_its_own_export(tmp_path: Path, shared_tiny_llama_dir: Path, capsys) -> None:
    """`selprune prune --save-model`, then `selprune prune -p model RUN/pruned-model`: the
    command that died on the tokenizer (#20, item 1)."""
    from selprune.experiment import cli

    sets = {}
    for side, word in (("forget", "def f(x): return x + 1"), ("retain", "It was a quiet morning in the town.")):
        sets[side] = tmp_path / side
        sets[side].mkdir()
        for split in ("train", "test"):
            docs = [f"{word} {i} {split}" * 8 for i in range(6)]
            (sets[side] / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    params = {"forget": sets["forget"], "retain": sets["retain"], "window": 16, "collect_tokens": 64,
              "eval_tokens": 64, "steps": 1, "ff_frac": 0.1, "skip_k": 3, "dtype": "float32", "device": "cpu"}
    argv = [x for k, v in params.items() for x in ("-p", k, str(v))]
    first = tmp_path / "first"
    assert cli.main(["prune", "--quiet", "-p", "model", str(shared_tiny_llama_dir), *argv, "--out", str(first),
                     "--save-model"]) == 0
    assert COMPLETE <= {p.name for p in (first / "pruned-model").iterdir()}
    second = tmp_path / "second"
    assert cli.main(["prune", "--quiet", "-p", "model", str(first / "pruned-model"), *argv, "--out", str(second)]) == 0
    before, records = (json.loads((d / "records.json").read_text()) for d in (first, second))
    assert [r["step"] for r in records] == [0, 1] and records[1]["fraction"]["ff"] > 0
    for side in ("forget", "retain"):  # the export is the model as pruned: same data, same metrics
        assert records[0][side] == pytest.approx(before[-1][side], rel=1e-5)
    capsys.readouterr()
