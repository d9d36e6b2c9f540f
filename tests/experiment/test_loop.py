"""The pruning loop (selprune/experiment/loop.py) on a tiny model with greedy windows:
records, schedule, re-collection with pruned neurons removed, resume, run kinds, stop
conditions, determinism, what config.json records, and the run folder's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import loop_data as make_data
from tiny_models import tiny_model, without_measured

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment import loop
from selprune.experiment.config import Config, resolve, stage_of
from selprune.experiment.loop import RUN_FORMAT, data_for, run_config, run_pruning
from selprune.experiment.runs import RUN_KINDS
from selprune.prune import Pruner
from selprune.scoring import score
from selprune.select import select
from selprune.selectivity import record_drop
from selprune.sites import KINDS, find_sites, weight_out_in
from selprune.stats import FIELDS, collect_stats

N_FF, N_ATTN = 2 * 48, 2 * 4 * 8  # tiny llama: neurons per kind
# the model and datasets are valid names (validation checks they exist); the windows come from make_data
CFG = Config(ff_frac=0.1, attn_frac=0.05, steps=3, window=16, collect_tokens=64, eval_tokens=64, batch_size=4,
             skip_k=5, retrain_window=16)


def run(cfg: Config, run_dir: Path, kind: str = "both", seed: int = 0, data: Data | None = None):
    return run_pruning(cfg, kind, run_dir, tiny_model("llama", seed=seed), None, data or make_data(), progress=False)


def step_masks(run_dir: Path, steps: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(1, steps + 1):
        t = load_file(str(run_dir / f"step_{i:03d}.safetensors"))
        out.append({k: t[f"{k}.mask"].bool() for k in KINDS})
    return out


def _frac(cfg: Config, kind: str) -> float:
    return cfg.ff_frac if kind == "ff" else cfg.attn_frac


# ------------------------------------------------------------------ the iterative run
@pytest.fixture(scope="module")
def iterative(tmp_path_factory):
    """One iterative 'both' run of CFG: (run folder, records, pruner)."""
    rd = tmp_path_factory.mktemp("iterative")
    records, pruner = run(CFG, rd)
    return rd, records, pruner


def test_iterative_run_records_every_step(iterative):
    rd, records, _ = iterative
    assert json.loads((rd / "records.json").read_text()) == records
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[0]["fraction"] == {"ff": 0.0, "attn": 0.0}
    for r in records:
        for side in ("forget", "retain"):
            assert {"top1", "top10", "top1_skip", "top10_skip", "loss", "perplexity", "tokens"} <= set(r[side])
            assert r[side]["tokens"] == 4 * 15
    assert {"collect", "score", "prune", "eval"} <= set(records[1]["seconds"])
    assert records[3]["forget"]["loss"] != records[0]["forget"]["loss"]


def test_iterative_run_prunes_the_fraction_each_step(iterative):
    _, records, _ = iterative
    k = {"ff": round(CFG.ff_frac * N_FF), "attn": round(CFG.attn_frac * N_ATTN)}
    for i, r in enumerate(records):
        for kind, n in (("ff", N_FF), ("attn", N_ATTN)):
            assert r["fraction"][kind] == i * k[kind] / n  # exactly: no float32 rounding in the records
            assert sum(r["pruned_per_layer"][kind]) == i * k[kind]
    assert all(records[i]["fraction"]["ff"] > records[i - 1]["fraction"]["ff"] for i in range(1, 4))


def test_iterative_run_never_reselects(iterative):
    """The step masks are disjoint and add up to the pruner's masks."""
    rd, _, pruner = iterative
    k = {"ff": round(CFG.ff_frac * N_FF), "attn": round(CFG.attn_frac * N_ATTN)}
    steps = step_masks(rd, 3)
    for kind in KINDS:
        union = torch.zeros_like(pruner.masks[kind])
        for s in steps:
            assert int(s[kind].sum()) == k[kind]
            assert not (union & s[kind]).any()
            union |= s[kind]
        assert torch.equal(union, pruner.masks[kind])


def test_iterative_run_leaves_the_model_pruned(iterative):
    _, _, pruner = iterative
    for kind in KINDS:  # columns of pruned neurons are zero
        for layer, module in enumerate(pruner.sites.modules(kind)):
            cols = weight_out_in(module)[:, pruner.masks[kind][layer].reshape(-1)]
            assert cols.numel() > 0 and (cols == 0).all()


def test_config_json_is_the_run_config(iterative):
    rd, _, _ = iterative
    stored = json.loads((rd / "config.json").read_text())
    assert stored == run_config(CFG, RUN_KINDS["both"])
    assert stored["ff_frac"] == CFG.ff_frac and stored["run"] == "both" and stored["format"] == RUN_FORMAT == 2


@pytest.mark.parametrize(("kind", "pruned", "untouched"), [("ff", "ff", "attn"), ("attn", "attn", "ff")])
def test_a_single_kind_run_prunes_only_its_kind(tmp_path, kind, pruned, untouched):
    records, pruner = run(CFG.replace(steps=1), tmp_path, kind)
    assert records[1]["fraction"][pruned] > 0 and records[1]["fraction"][untouched] == 0.0
    assert not pruner.masks[untouched].any()
    assert json.loads((tmp_path / "config.json").read_text())[f"{untouched}_frac"] == 0.0


def test_recollection_reads_pruned_neurons_as_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = loop.collect_stats

    def spy(model, sites, windows, *a, **kw):
        removed = kw.get("removed", a[1] if len(a) > 1 else None)
        snapshot = None if removed is None else {k: m.clone() for k, m in removed.items()}
        stats = real(model, sites, windows, *a, **kw)
        calls.append((snapshot, stats))
        return stats

    monkeypatch.setattr(loop, "collect_stats", spy)
    cfg = CFG.replace(steps=4)
    records, pruner = run(cfg, tmp_path)
    assert len(calls) == 2 * cfg.steps  # forget and retain, every step
    steps = step_masks(tmp_path, cfg.steps)
    seen_pruned = 0
    for i, (removed, stats) in enumerate(calls):
        step = i // 2  # pruned before this collection: steps 1..step
        for kind in KINDS:
            done = torch.zeros_like(pruner.masks[kind])
            for s in steps[:step]:
                done |= s[kind]
            assert torch.equal(removed[kind], done)
            for f in FIELDS:
                assert (stats.sums[kind][f][done] == 0).all()
            seen_pruned += int(done.sum())
    assert seen_pruned > 0
    # the pruned neurons' inputs are still there: without the mask they would have stats
    sites = find_sites(pruner.model)
    unmasked = real(pruner.model, sites, make_data().forget_train, 4, progress=False)
    assert (unmasked.sums["ff"]["sum_abs"][pruner.masks["ff"]] > 0).all()
    # and with the scores of a masked collection they rank last
    f_stats, r_stats = calls[-2][1], calls[-1][1]
    s = score(f_stats, r_stats, cfg.importance)
    done = calls[-1][0]["ff"]
    assert (s["ff"][done] == 0).all() and (s["ff"][~done] > 0).all()


# ------------------------------------------------------------------------- resume
RESUME_CASES = {
    "iterative": ("both", {}),
    "one-shot-mean": ("both", {"prune_mode": "one-shot", "ablation": "mean"}),
    "random": ("random", {}),
    "heads-peak": ("attn_heads", {"ablation": "peak", "attn_frac": 0.125}),
}


@pytest.fixture(scope="module", params=list(RESUME_CASES))
def resumed(request, tmp_path_factory):
    """An uninterrupted 4-step run and one stopped after 2 steps, its step 3 half-written,
    then resumed on a fresh model: (cfg4, kind, folder, first, full records, full pruner,
    resumed records, resumed pruner)."""
    kind, overrides = RESUME_CASES[request.param]
    tmp = tmp_path_factory.mktemp(f"resume-{request.param}")
    cfg4 = CFG.replace(steps=4, **overrides)
    full_records, full_pruner = run(cfg4, tmp / "full", kind)
    first, _ = run(cfg4.replace(steps=2), tmp / "resumed", kind)
    # interrupted after writing step 3's file but before its record: that step is redone
    (tmp / "resumed" / "step_003.safetensors").write_bytes(b"half-written")
    records, pruner = run(cfg4, tmp / "resumed", kind)  # a fresh model: the run dir carries everything
    return cfg4, kind, tmp / "resumed", first, full_records, full_pruner, records, pruner


def test_resume_equals_uninterrupted(resumed) -> None:
    cfg4, kind, rd, first, full_records, full_pruner, records, pruner = resumed
    assert len(first) == 3 and len(records) == 5
    assert without_measured(records[:3]) == without_measured(first)
    assert without_measured(records) == without_measured(full_records)
    assert json.loads((rd / "records.json").read_text()) == records
    for k in KINDS:
        assert torch.equal(pruner.masks[k], full_pruner.masks[k])
    a, b = pruner.model.state_dict(), full_pruner.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("resumed", ["heads-peak"], indirect=True)
def test_resumed_whole_heads_stay_whole(resumed) -> None:
    _, kind, _, _, _, _, _, pruner = resumed
    assert RUN_KINDS[kind].whole_heads
    m = pruner.masks["attn"]
    assert m.any() and torch.equal(m.any(-1), m.all(-1))
    assert not pruner.masks["ff"].any()


def test_a_finished_run_rerun_adds_nothing(resumed) -> None:
    cfg4, kind, rd, _, full_records, _, _, _ = resumed
    again, _ = run(cfg4, rd, kind)
    assert without_measured(again) == without_measured(full_records)


def test_a_rerun_with_fewer_steps_gives_the_first_steps(resumed) -> None:
    cfg4, kind, rd, first, _, _, _, _ = resumed
    short, short_pruner = run(cfg4.replace(steps=2), rd, kind)
    assert without_measured(short) == without_measured(first)
    steps = step_masks(rd, 2)
    for k in KINDS:  # the model pruned as of then
        assert torch.equal(short_pruner.masks[k], steps[0][k] | steps[1][k])
    assert json.loads((rd / "config.json").read_text())["steps"] == 4, "the recorded steps are never lowered"


def test_a_rerun_with_other_speed_parameters_is_the_same_run(tmp_path):
    first, _ = run(CFG.replace(steps=1), tmp_path)
    again, _ = run(CFG.replace(steps=1, batch_size=2, device="cpu"), tmp_path)  # batch_size and device: speed only
    assert without_measured(again) == without_measured(first)


# ------------------------------------------------------------------ modes and kinds
def test_one_shot_holds_cumulative_top_of_unpruned_scores(tmp_path: Path) -> None:
    cfg = CFG.replace(prune_mode="one-shot")
    records, pruner = run(cfg, tmp_path)
    model = tiny_model("llama")
    sites = find_sites(model)
    d = make_data()
    f = collect_stats(model, sites, d.forget_train, cfg.batch_size, progress=False)
    r = collect_stats(model, sites, d.retain_train, cfg.batch_size, progress=False)
    scores = score(f, r, cfg.importance, cfg.score, eps={"ff": cfg.eps_ff, "attn": cfg.eps_attn})
    steps = step_masks(tmp_path, cfg.steps)
    for kind, n in (("ff", N_FF), ("attn", N_ATTN)):
        k = round(_frac(cfg, kind) * n)
        held = torch.zeros(sites.shape(kind), dtype=torch.bool)
        for i, s in enumerate(steps, start=1):
            held |= s[kind]
            assert torch.equal(held, select(scores[kind], min(1.0, i * k / n)))
    assert records[-1]["fraction"]["ff"] == pytest.approx(3 * round(0.1 * N_FF) / N_FF)


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory):
    """24 seeds of a 2-step random run pruning a quarter of the FF neurons per step."""
    tmp = tmp_path_factory.mktemp("random")
    cfg = CFG.replace(ff_frac=0.25, attn_frac=0.25, steps=2)
    out = {}
    for seed in range(24):
        run(cfg.replace(seed=seed), tmp / f"s{seed}", "random")
        out[seed] = step_masks(tmp / f"s{seed}", 2)
    return cfg, out


def test_random_run_is_uniform_among_unpruned(random_runs) -> None:
    _, runs = random_runs
    counts = torch.zeros(N_FF)
    for s1, s2 in runs.values():
        assert not (s1["ff"] & s2["ff"]).any()
        assert int(s2["ff"].sum()) == int(s1["ff"].sum()) == round(0.25 * s1["ff"].numel())
        assert not (s1["attn"] | s2["attn"]).any(), "the random floor prunes FF neurons only"
        counts += (s1["ff"] | s2["ff"]).reshape(-1).float()
    # each neuron is in the pruned half with p = 0.5: 24 runs -> mean 12, sd ~2.45
    assert counts.mean() == pytest.approx(12.0)
    assert counts.min() >= 2 and counts.max() <= 22, counts
    assert counts.std() > 1.0  # not one fixed set


def test_random_choice_depends_on_the_seed_not_the_data(random_runs, tmp_path) -> None:
    cfg, _ = random_runs
    _, p1 = run(cfg.replace(seed=3), tmp_path / "d1", "random", data=make_data(seed=5))
    _, p2 = run(cfg.replace(seed=3), tmp_path / "d2", "random")
    assert all(torch.equal(p1.masks[k], p2.masks[k]) for k in KINDS)


# -------------------------------------------------------------------- stopping
@pytest.fixture(scope="module")
def unstopped(tmp_path_factory):
    cfg = CFG.replace(steps=5, ff_frac=0.15, attn_frac=0.1)
    full, _ = run(cfg, tmp_path_factory.mktemp("unstopped"))
    return cfg, full


def test_stop_at_the_retain_drop(unstopped, tmp_path) -> None:
    cfg, full = unstopped
    drops = [record_drop(r, full[0], "retain") for r in full]
    # a threshold between observed values (past the first step where possible), so that the
    # expected stop step is unambiguous and stopping one step early or late is caught
    levels = sorted(set(drops))
    assert len(levels) > 1, "pruning must move retain top-1 for this test to mean anything"
    j = 1 if len(levels) >= 3 else 0
    limit = (levels[j] + levels[j + 1]) / 2
    stop_at = next(i for i, d in enumerate(drops) if d > limit)
    recs, _ = run(cfg.replace(max_retain_drop=limit), tmp_path)
    assert len(recs) == stop_at + 1  # record stop_at is the first past the limit: no step after it
    assert without_measured(recs) == without_measured(full[: len(recs)])


def test_stop_before_step_one_when_forget_is_already_below(unstopped, tmp_path) -> None:
    cfg, full = unstopped
    recs, _ = run(cfg.replace(stop_forget_top1=full[0]["forget"]["top1"] + 1e-9), tmp_path)
    assert len(recs) == 1


def test_stop_at_the_forget_accuracy(unstopped, tmp_path) -> None:
    cfg, full = unstopped
    forget = [r["forget"]["top1"] for r in full]
    below = sorted({f for f in forget[1:] if f < forget[0]}, reverse=True)  # after pruning, largest first
    assert below, "pruning must lower forget top-1 for this test to mean anything"
    t = (below[0] + below[1]) / 2 if len(below) > 1 else (forget[0] + below[0]) / 2
    i = next(j for j, f in enumerate(forget) if f < t)
    recs, _ = run(cfg.replace(stop_forget_top1=t), tmp_path)
    assert len(recs) == i + 1
    assert without_measured(recs) == without_measured(full[: i + 1])


# ------------------------------------------------------------------- determinism
def test_repeat_is_bit_identical(tmp_path: Path) -> None:
    cfg = CFG.replace(ablation="mean")
    a, pa = run(cfg, tmp_path / "a")
    b, pb = run(cfg, tmp_path / "b")
    assert without_measured(a) == without_measured(b)
    assert all(torch.equal(pa.masks[k], pb.masks[k]) for k in KINDS)


def test_loop_leaves_pruner_usable(tmp_path: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, pruner = run_pruning(CFG.replace(ablation="mean"), "both", tmp_path, model, None, make_data(), progress=False)
    assert isinstance(pruner, Pruner) and pruner.model is model
    assert pruner.added_bias == {"ff": True, "attn": True}
    pruner.restore()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_base_metrics_are_reused_for_step_0(tmp_path: Path) -> None:
    base = {"forget": {"top1": 0.123, "tag": "forget"}, "retain": {"top1": 0.456, "tag": "retain"}}
    records, _ = run_pruning(CFG.replace(steps=1), "ff", tmp_path, tiny_model("llama"), None, make_data(),
                             progress=False, base=base)
    assert records[0]["forget"] == base["forget"] and records[0]["retain"] == base["retain"]
    assert "tag" not in records[1]["forget"], "later steps are evaluated"


# ------------------------------------------------------------- validation and format
def test_unknown_importance_lists_valid_ones_before_writing_anything(tmp_path: Path) -> None:
    with pytest.raises(SelpruneError) as e:
        run(CFG.replace(importance="entropy"), tmp_path)
    for name in ("abs", "freq", "rms", "std", "sqrt", "rand"):
        assert name in str(e.value)
    assert "importance='entropy'" in str(e.value)
    assert not (tmp_path / "config.json").exists()  # validated before anything is written


def test_unknown_run_kind(tmp_path: Path) -> None:
    with pytest.raises(SelpruneError, match=r"unknown run 'heads'; choose among ff, random, attn, attn_heads, both"):
        run(CFG, tmp_path, "heads")
    assert not tmp_path.joinpath("config.json").exists()


def test_a_config_json_from_before_the_schema_is_refused(tmp_path: Path) -> None:
    old = {k: v for k, v in run_config(CFG, RUN_KINDS["both"]).items() if k not in ("format", "run")}
    old["scoring"] = old.pop("importance")  # what an older selprune wrote
    tmp_path.joinpath("config.json").write_text(json.dumps(old))
    with pytest.raises(SelpruneError, match=r"run directory .* was written by an older selprune \(before the "
                                            r"parameter schema\); use a new run directory, or delete this one"):
        run(CFG, tmp_path)
    assert not (tmp_path / "records.json").exists()


def test_new_parameters_map_onto_the_run_config():
    cfg = resolve({"prune_mode": "one-shot", "selection": "per_layer", "max_retain_drop": 0.25,
                   "runs": "ff,random,both,attn_heads"})
    ff, rnd, both, heads = (run_config(cfg, RUN_KINDS[r]) for r in ("ff", "random", "both", "attn_heads"))
    assert (ff["prune_mode"], ff["selection"], ff["max_retain_drop"], ff["attn_frac"]) == ("one-shot", "per_layer",
                                                                                           0.25, 0.0)
    assert ff["ff_frac"] == cfg.ff_frac > 0 and ff["heads"] is None
    assert rnd["run"] == "random" and rnd["selection"] == "per_layer", "the floor keeps the same selection"
    assert rnd["attn_frac"] == 0.0
    assert both["ff_frac"] == cfg.ff_frac > 0 and both["attn_frac"] == cfg.attn_frac > 0 and both["heads"] is None
    assert heads["ff_frac"] == 0.0 and heads["heads"] == cfg.heads == "mean", "only whole-head runs record heads"
    assert {r["format"] for r in (ff, rnd, both, heads)} == {RUN_FORMAT}


def test_run_config_holds_only_what_shapes_a_runs_results():
    stored = run_config(Config(), RUN_KINDS["ff"])
    assert set(stored) - {"run", "format"} == {n for n in Config.__dataclass_fields__
                                               if stage_of(n) in ("setup", "data", "score", "prune")} - {"batch_size",
                                                                                                       "device"}
    assert not any(n.startswith("retrain_") for n in stored) and "run_dir" not in stored


def test_data_for_passes_the_config_on(smollm_tokenizer, monkeypatch):
    seen = {}
    monkeypatch.setattr(loop, "prepare_data", lambda tok, **kw: seen.update(kw, tok=tok) or "data")
    cfg = Config(forget="code", retain="prose", window=64, collect_tokens=512, eval_tokens=256, skip_k=7, seed=3)
    assert data_for(cfg, smollm_tokenizer) == "data"
    assert seen == {"tok": smollm_tokenizer, "forget": "code", "retain": "prose", "window": 64, "collect_tokens": 512,
                    "eval_tokens": 256, "skip_k": 7, "seed": 3}


# ------------------------------------------------------- the series' unpruned statistics
@pytest.mark.parametrize(("mode", "ablation"), [("iterative", "zero"), ("one-shot", "peak")])
def test_given_unpruned_statistics_give_the_same_run(tmp_path, mode, ablation) -> None:
    """A series hands its notebook-01 statistics to every run (hist_bins=64, the collection
    windows): the first collection is skipped, yet the records, masks and ablation values are
    those of a run that collects for itself, bit for bit."""
    cfg = CFG.replace(prune_mode=mode, ablation=ablation)
    data, model = make_data(), tiny_model("llama", seed=0)
    sites = find_sites(model)
    stats = tuple(collect_stats(model, sites, w, cfg.batch_size, hist_bins=64, progress=False)
                  for w in (data.forget_train, data.retain_train))
    calls = []
    real = loop.collect_stats
    own, _ = run(cfg, tmp_path / "own", data=data)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
        given, _ = run_pruning(cfg, "both", tmp_path / "given", model, None, data, progress=False, unpruned=stats)
    # step 1's pair and the one-shot collection skipped; later steps collect (iterative: to
    # re-score; one-shot with peak ablation: the constants of the model as it is now)
    assert len(calls) == 2 * (cfg.steps - 1)
    assert without_measured(given) == without_measured(own)
    for a, b in zip(step_masks(tmp_path / "own", cfg.steps), step_masks(tmp_path / "given", cfg.steps), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in KINDS)
    own_t, given_t = (load_file(str(tmp_path / d / "step_001.safetensors")) for d in ("own", "given"))
    assert own_t.keys() == given_t.keys() and all(torch.equal(own_t[k], given_t[k]) for k in own_t)


def test_unpruned_statistics_of_other_windows_are_refused(tmp_path) -> None:
    data, model = make_data(), tiny_model("llama", seed=0)
    sites = find_sites(model)
    short = tuple(collect_stats(model, sites, w[:1], 4, progress=False) for w in (data.forget_train, data.retain_train))
    with pytest.raises(SelpruneError, match="statistics count .* tokens"):
        run_pruning(CFG, "ff", tmp_path / "r", model, None, data, progress=False, unpruned=short)
    full = tuple(collect_stats(model, sites, w, 4, progress=False) for w in (data.forget_train, data.retain_train))
    with pytest.raises(SelpruneError, match="histogram"):
        run_pruning(CFG.replace(ablation="peak"), "ff", tmp_path / "p", model, None, data, progress=False,
                    unpruned=full)
