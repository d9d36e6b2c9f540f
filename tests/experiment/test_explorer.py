"""Looking inside (selprune/experiment/explorer.py): one neuron's report and generations
before and after pruning, on a tiny random Llama with the embedded tokenizer. Nothing
here may write to a run directory or leave the model changed."""

from __future__ import annotations

import pytest
import torch

from selprune.errors import SelpruneError
from selprune.experiment.explorer import generate, generations, neuron_report
from selprune.experiment.rundir import RunDir
from selprune.prune import Pruner
from selprune.scoring import score
from selprune.sites import KINDS, find_sites
from selprune.stats import collect_stats


@pytest.fixture(scope="module")
def setup(tiny_llama, smollm_tokenizer):
    model = tiny_llama()
    sites = find_sites(model)
    g = torch.Generator().manual_seed(0)
    windows = {side: torch.randint(3, 1000, (3, 12), generator=g) for side in ("forget", "retain")}
    stats = {side: collect_stats(model, sites, w, progress=False) for side, w in windows.items()}
    return model, smollm_tokenizer, sites, stats, windows


def report(setup, kind="ff", layer=1, index=3, top=2):
    model, tok, sites, stats, windows = setup
    return neuron_report(model, tok, sites, stats, windows, "abs", kind, layer, index, top)


# ------------------------------------------------------------------ neuron report
@pytest.mark.parametrize("kind, layer, index", [("ff", 1, 3), ("attn", 0, 5)])
def test_neuron_report_ranks_the_neuron_by_its_score(setup, kind, layer, index):
    _, _, sites, stats, _ = setup
    r = report(setup, kind, layer, index)
    flat = score(stats["forget"], stats["retain"], "abs")[kind].reshape(-1)
    at = layer * (flat.numel() // sites.shape(kind)[0]) + index
    assert r["score"] == pytest.approx(float(flat[at]))
    assert r["rank"] == int((flat > flat[at]).sum()) + 1 and r["of"] == sites.numel(kind)
    assert (r["kind"], r["layer"], r["index"]) == (kind, layer, index)


def test_neuron_report_gives_the_neurons_statistics(setup):
    _, _, _, stats, _ = setup
    r = report(setup)
    for side, st in stats.items():
        assert r["mean"][side] == pytest.approx(float(st.moment("ff", "sum")[1, 3]))
        assert r["mean_abs"][side] == pytest.approx(float(st.moment("ff", "sum_abs")[1, 3]))
        assert 0 <= r["frac_positive"][side] <= 1


def test_neuron_report_snippets_are_the_strongest_activations_per_dataset(setup):
    r = report(setup, top=3)
    snippets = r["snippets"]
    assert list(snippets["dataset"]) == ["forget"] * 3 + ["retain"] * 3
    for side in ("forget", "retain"):
        acts = snippets[snippets["dataset"] == side]["activation"].abs().tolist()
        assert acts == sorted(acts, reverse=True), "strongest first"
    assert all(t.count("[[") == 1 and t.endswith("]]") for t in snippets["text"]), "the firing token is bracketed"


@pytest.mark.parametrize("layer, index", [(99, 0), (0, 10_000), (-1, 0)])
def test_neuron_report_out_of_range_names_the_ranges(setup, layer, index):
    with pytest.raises(SelpruneError, match=r"ff neuron .* is out of range: layers 0\.\.1, neurons 0\.\.\d+"):
        report(setup, "ff", layer, index)


def test_neuron_report_leaves_the_model_unhooked(setup):
    model = setup[0]
    report(setup)
    assert not any(m._forward_pre_hooks for m in model.modules()), "a hook was left on the model"


# ------------------------------------------------------------------- generations
def test_generate_is_greedy_and_repeatable(setup):
    model, tok = setup[0], setup[1]
    assert generate(model, tok, "def f(x):", 5) == generate(model, tok, "def f(x):", 5)


@pytest.fixture
def pruned_run(tmp_path, setup) -> RunDir:
    """A finished one-step run that prunes the first 16 FF neurons of every layer."""
    sites = setup[2]
    rd = RunDir(tmp_path / "ff")
    new = {k: torch.zeros(sites.shape(k), dtype=torch.bool) for k in KINDS}
    new["ff"][:, :16] = True
    rd.save_step(1, new, {k: None for k in KINDS})
    rd.save_records([{"step": 0}, {"step": 1}])
    return rd


def test_generations_compare_unpruned_and_pruned_and_restore_the_model(setup, pruned_run):
    model, tok, sites = setup[0], setup[1], setup[2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = {"code": "def f(x):", "prose": "Once upon a time"}
    table = generations(model, tok, prompts, pruned_run, "ff", max_new_tokens=4)
    assert list(table["model"]) == ["unpruned"] * 2 + ["pruned (ff)"] * 2
    assert list(table["prompt"]) == list(prompts) * 2
    after = model.state_dict()
    assert all((before[k] == after[k]).all() for k in before), "generations must restore the model"
    unpruned = {p: generate(model, tok, prompts[p], 4) for p in prompts}
    assert list(table["text"][:2]) == list(unpruned.values())
    pruner = Pruner(model, sites)
    pruner.prune("ff", pruned_run.load_step(1)[0]["ff"])
    try:
        assert list(table["text"][2:]) == [generate(model, tok, prompts[p], 4) for p in prompts]
    finally:
        pruner.restore()
    assert sorted(p.name for p in pruned_run.path.iterdir()) == ["records.json", "step_001.safetensors"]
