"""The pruning loop on a tiny model with random windows: records, schedule, re-collection
with pruned neurons removed, resume, modes, stop conditions, determinism, summaries and
config validation."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import random_windows, tiny_model  # noqa: E402

from selprune import loop  # noqa: E402
from selprune.errors import SelpruneError  # noqa: E402
from selprune.loop import Data, PruneConfig, forget_drop_at_retain_drop, run_pruning, selectivity_area  # noqa: E402
from selprune.prune import Pruner  # noqa: E402
from selprune.scoring import score  # noqa: E402
from selprune.select import select  # noqa: E402
from selprune.sites import KINDS, find_sites, weight_out_in  # noqa: E402
from selprune.stats import FIELDS, collect_stats  # noqa: E402

N_FF, N_ATTN = 2 * 48, 2 * 4 * 8  # tiny llama: neurons per kind
CFG = PruneConfig(model="tiny-llama", forget="f", retain="r", ff_frac=0.1, attn_frac=0.05, steps=3,
                  window=16, collect_tokens=64, eval_tokens=64, batch_size=4, skip_k=5)


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


def make_data(seed: int = 0) -> Data:
    """Forget prompts use token ids 3..63, retain prompts 64..127: the sets activate differently."""
    def win(lo: int, hi: int, s: int) -> torch.Tensor:
        return _greedy_windows(lo, hi, s).clone()

    d = Data(win(3, 64, seed), win(64, 128, seed + 1), win(3, 64, seed + 2), win(64, 128, seed + 3))
    d.skip = {"forget": torch.tensor([3, 4, 5]), "retain": torch.tensor([64, 65])}
    return d


def run(cfg: PruneConfig, run_dir: Path, seed: int = 0, data: Data | None = None):
    return run_pruning(cfg, run_dir, tiny_model("llama", seed=seed), None, data or make_data(), progress=False)


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def step_masks(run_dir: Path, steps: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(1, steps + 1):
        t = load_file(str(run_dir / f"step_{i:03d}.safetensors"))
        out.append({k: t[f"{k}.mask"].bool() for k in KINDS})
    return out


def test_iterative_run(tmp_path: Path) -> None:
    records, pruner = run(CFG, tmp_path)
    assert json.loads((tmp_path / "records.json").read_text()) == records
    assert json.loads((tmp_path / "config.json").read_text())["ff_frac"] == CFG.ff_frac
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert records[0]["fraction"] == {"ff": 0.0, "attn": 0.0}
    k = {"ff": round(CFG.ff_frac * N_FF), "attn": round(CFG.attn_frac * N_ATTN)}
    for i, r in enumerate(records):
        for kind, n in (("ff", N_FF), ("attn", N_ATTN)):
            assert r["fraction"][kind] == i * k[kind] / n  # exactly: no float32 rounding in the records
            assert sum(r["pruned_per_layer"][kind]) == i * k[kind]
        for side in ("forget", "retain"):
            assert {"top1", "top10", "top1_skip", "top10_skip", "loss", "perplexity", "tokens"} <= set(r[side])
            assert r[side]["tokens"] == 4 * 15
    assert all(records[i]["fraction"]["ff"] > records[i - 1]["fraction"]["ff"] for i in range(1, 4))
    assert {"collect", "score", "prune", "eval"} <= set(records[1]["seconds"])
    # never re-selected: the step masks are disjoint and add up to the pruner's masks
    steps = step_masks(tmp_path, 3)
    for kind in KINDS:
        union = torch.zeros_like(pruner.masks[kind])
        for s in steps:
            assert int(s[kind].sum()) == k[kind]
            assert not (union & s[kind]).any()
            union |= s[kind]
        assert torch.equal(union, pruner.masks[kind])
        # the model is left pruned: columns of pruned neurons are zero
        for layer, module in enumerate(pruner.sites.modules(kind)):
            cols = weight_out_in(module)[:, pruner.masks[kind][layer].reshape(-1)]
            assert cols.numel() > 0 and (cols == 0).all()
    assert records[3]["forget"]["loss"] != records[0]["forget"]["loss"]


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
    cfg = replace(CFG, steps=4)
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
    s = score(f_stats, r_stats, cfg.scoring)
    done = calls[-1][0]["ff"]
    assert (s["ff"][done] == 0).all() and (s["ff"][~done] > 0).all()


@pytest.mark.parametrize("overrides", [
    {},
    {"mode": "one-shot", "ablation": "mean"},
    {"mode": "random"},
    {"ablation": "peak", "heads": "mean", "attn_frac": 0.125},
])
def test_resume_equals_uninterrupted(tmp_path: Path, overrides: dict) -> None:
    cfg4 = replace(CFG, steps=4, **overrides)
    full_records, full_pruner = run(cfg4, tmp_path / "full")
    first, _ = run(replace(cfg4, steps=2), tmp_path / "resumed")
    assert len(first) == 3
    # interrupted after writing step 3's file but before its record: that step is redone
    (tmp_path / "resumed" / "step_003.safetensors").write_bytes(b"half-written")
    resumed, pruner = run(cfg4, tmp_path / "resumed")  # a fresh model: the run dir carries everything
    assert len(resumed) == 5
    assert strip(resumed[:3]) == strip(first)
    assert strip(resumed) == strip(full_records)
    assert json.loads((tmp_path / "resumed" / "records.json").read_text()) == resumed
    for kind in KINDS:
        assert torch.equal(pruner.masks[kind], full_pruner.masks[kind])
    if cfg4.heads:  # whole heads only
        m = pruner.masks["attn"]
        assert m.any() and torch.equal(m.any(-1), m.all(-1))
    a, b = pruner.model.state_dict(), full_pruner.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run rerun: nothing new, the same records
    again, _ = run(cfg4, tmp_path / "resumed")
    assert strip(again) == strip(full_records)
    # rerun with fewer steps: the first steps, and the model pruned as of then
    short, short_pruner = run(replace(cfg4, steps=2), tmp_path / "resumed")
    assert strip(short) == strip(first)
    steps = step_masks(tmp_path / "resumed", 2)
    for kind in KINDS:
        assert torch.equal(short_pruner.masks[kind], steps[0][kind] | steps[1][kind])
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["steps"] == 4


def test_run_dir_with_other_params_refused(tmp_path: Path) -> None:
    run(replace(CFG, steps=1), tmp_path)
    with pytest.raises(SelpruneError, match="other parameters") as e:
        run(replace(CFG, steps=1, ff_frac=0.05), tmp_path)
    assert "ff_frac" in str(e.value)
    with pytest.raises(SelpruneError, match="scoring"):
        run(replace(CFG, steps=1, scoring="rms"), tmp_path)


def test_corrupt_run_files(tmp_path: Path) -> None:
    run(replace(CFG, steps=2), tmp_path)
    (tmp_path / "step_002.safetensors").write_bytes(b"broken")
    with pytest.raises(SelpruneError, match="step_002"):
        run(replace(CFG, steps=2), tmp_path)
    (tmp_path / "records.json").write_text("{not json")
    with pytest.raises(SelpruneError, match="records.json"):
        run(replace(CFG, steps=2), tmp_path)


def test_one_shot_holds_cumulative_top_of_unpruned_scores(tmp_path: Path) -> None:
    cfg = replace(CFG, mode="one-shot")
    records, pruner = run(cfg, tmp_path)
    model = tiny_model("llama")
    sites = find_sites(model)
    d = make_data()
    f = collect_stats(model, sites, d.forget_train, cfg.batch_size, progress=False)
    r = collect_stats(model, sites, d.retain_train, cfg.batch_size, progress=False)
    scores = score(f, r, cfg.scoring, eps={"ff": cfg.eps_ff, "attn": cfg.eps_attn})
    steps = step_masks(tmp_path, cfg.steps)
    for kind, n in (("ff", N_FF), ("attn", N_ATTN)):
        k = round(_frac(cfg, kind) * n)
        held = torch.zeros(sites.shape(kind), dtype=torch.bool)
        for i, s in enumerate(steps, start=1):
            held |= s[kind]
            assert torch.equal(held, select(scores[kind], min(1.0, i * k / n)))
    assert records[-1]["fraction"]["ff"] == pytest.approx(3 * round(0.1 * N_FF) / N_FF)


def _frac(cfg: PruneConfig, kind: str) -> float:
    return cfg.ff_frac if kind == "ff" else cfg.attn_frac


def test_random_mode_uniform_among_unpruned(tmp_path: Path) -> None:
    cfg = replace(CFG, mode="random", ff_frac=0.25, attn_frac=0.25, steps=2)
    counts = {k: torch.zeros(n) for k, n in (("ff", N_FF), ("attn", N_ATTN))}
    seeds = range(24)
    for seed in seeds:
        records, pruner = run(replace(cfg, seed=seed), tmp_path / f"s{seed}")
        s1, s2 = step_masks(tmp_path / f"s{seed}", 2)
        for kind in KINDS:
            assert not (s1[kind] & s2[kind]).any()
            assert int(s2[kind].sum()) == int(s1[kind].sum()) == round(0.25 * s1[kind].numel())
            counts[kind] += (s1[kind] | s2[kind]).reshape(-1).float()
    # each neuron is in the pruned half with p = 0.5: 24 runs -> mean 12, sd ~2.45
    for kind in KINDS:
        assert counts[kind].mean() == pytest.approx(12.0)
        assert counts[kind].min() >= 2 and counts[kind].max() <= 22, counts[kind]
        assert counts[kind].std() > 1.0  # not one fixed set
    # the choice does not depend on the data, only on the seed
    other = make_data(seed=5)
    _, p1 = run(replace(cfg, seed=3), tmp_path / "d1", data=other)
    _, p2 = run(replace(cfg, seed=3), tmp_path / "d2")
    assert all(torch.equal(p1.masks[k], p2.masks[k]) for k in KINDS)


def test_stop_conditions(tmp_path: Path) -> None:
    cfg = replace(CFG, steps=5, ff_frac=0.15, attn_frac=0.1)
    full, _ = run(cfg, tmp_path / "full")
    base_r = full[0]["retain"]["top1"]
    drops = [1 - r["retain"]["top1"] / base_r for r in full]
    forget = [r["forget"]["top1"] for r in full]
    # thresholds between observed values (past the first step where possible), so that the
    # expected stop step is unambiguous and stopping one step early or late is caught
    levels = sorted(set(drops))
    j = 1 if len(levels) >= 3 else 0
    limit = (levels[j] + levels[j + 1]) / 2 if len(levels) > 1 else None
    if limit is not None:
        stop_at = next(i for i, d in enumerate(drops) if d > limit)
        recs, _ = run(replace(cfg, max_retain_drop=limit), tmp_path / "retain")
        assert len(recs) == stop_at + 1  # record stop_at is the first past the limit: no step after it
        assert strip(recs) == strip(full[: len(recs)])
    threshold = forget[0] + 1e-9  # already "below" after no pruning: stop before step 1
    recs, _ = run(replace(cfg, stop_forget_top1=threshold), tmp_path / "forget0")
    assert len(recs) == 1
    below = sorted(set(forget[1:]), reverse=True)  # forget accuracies after pruning, largest first
    below = [f for f in below if f < forget[0]]
    if below:
        t = (below[0] + below[1]) / 2 if len(below) > 1 else (forget[0] + below[0]) / 2
        i = next(j for j, f in enumerate(forget) if f < t)
        recs, _ = run(replace(cfg, stop_forget_top1=t), tmp_path / "forget1")
        assert len(recs) == i + 1
        assert strip(recs) == strip(full[: i + 1])
    assert limit is not None or below  # the test exercised at least one stop condition


def test_should_stop_semantics() -> None:
    base = {"forget": {"top1": 0.5}, "retain": {"top1": 0.4}}
    last = {"forget": {"top1": 0.2}, "retain": {"top1": 0.3}}  # retain drop 25%
    assert not loop._should_stop(CFG, last, base)
    assert loop._should_stop(replace(CFG, stop_forget_top1=0.25), last, base)
    assert not loop._should_stop(replace(CFG, stop_forget_top1=0.15), last, base)
    assert loop._should_stop(replace(CFG, max_retain_drop=0.2), last, base)
    assert not loop._should_stop(replace(CFG, max_retain_drop=0.3), last, base)
    assert loop._should_stop(replace(CFG, stop_forget_top1=0.15, max_retain_drop=0.2), last, base)


def test_repeat_is_bit_identical(tmp_path: Path) -> None:
    cfg = replace(CFG, ablation="mean")
    a, pa = run(cfg, tmp_path / "a")
    b, pb = run(cfg, tmp_path / "b")
    assert strip(a) == strip(b)
    assert all(torch.equal(pa.masks[k], pb.masks[k]) for k in KINDS)


def test_loop_leaves_pruner_usable(tmp_path: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, pruner = run_pruning(replace(CFG, ablation="mean"), tmp_path, model, None, make_data(), progress=False)
    assert isinstance(pruner, Pruner) and pruner.model is model
    assert pruner.added_bias == {"ff": True, "attn": True}
    pruner.restore()
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def _records(forget: list[float], retain: list[float]) -> list[dict]:
    return [{"step": i, "forget": {"top1": f}, "retain": {"top1": r}} for i, (f, r) in enumerate(zip(forget, retain, strict=True))]


def test_selectivity_area_orientation_and_value() -> None:
    # forget falls faster than retain; bases 0.4 and 0.5 (normalised away)
    recs = _records([0.4, 0.2, 0.08], [0.5, 0.45, 0.4])
    # relative: forget 1, .5, .2; retain 1, .9, .8; gap 0, .4, .6 -> trapezoid .7 over 2 steps
    assert selectivity_area(recs) == pytest.approx(0.35)
    assert selectivity_area(_records([0.5, 0.45, 0.4], [0.4, 0.2, 0.08])) == pytest.approx(-0.35)
    assert selectivity_area(_records([0.4, 0.3], [0.6, 0.45])) == pytest.approx(0.0)
    assert selectivity_area(recs[:1]) == 0.0


def test_forget_drop_at_retain_drop() -> None:
    # retain relative 1, .95, .85 ; forget relative 1, .7, .4 -> at a 10% retain drop:
    # halfway between steps 1 and 2 -> forget drop .3 + .5 * (.6 - .3) = .45
    recs = _records([0.5, 0.35, 0.2], [0.8, 0.76, 0.68])
    assert forget_drop_at_retain_drop(recs, 0.10) == pytest.approx(0.45)
    assert forget_drop_at_retain_drop(recs, 0.05) == pytest.approx(0.3)
    assert forget_drop_at_retain_drop(recs, 0.02) == pytest.approx(0.3 * 0.02 / 0.05)
    assert forget_drop_at_retain_drop(recs, 0.20) is None
    assert forget_drop_at_retain_drop(recs, 0.15) == pytest.approx(0.6)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"retain": "f"}, "forget and retain"),
    ({"ff_frac": 1.0}, "ff_frac"),
    ({"ff_frac": -0.1}, "ff_frac"),
    ({"attn_frac": 1.5}, "attn_frac"),
    ({"ff_frac": 0.0, "attn_frac": 0.0}, "nothing to prune"),
    ({"steps": 0}, "steps"),
    ({"steps": -3}, "steps"),
    ({"ff_frac": 0.3, "steps": 4}, "more than all"),
    ({"mode": "greedy"}, "mode"),
    ({"ablation": "median"}, "ablation"),
    ({"heads": "max"}, "heads"),
    ({"collect_tokens": 8}, "collect_tokens"),
    ({"score": "quotient"}, "ratio"),
])
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(SelpruneError, match=match):
        replace(CFG, **overrides).validate()


def test_unknown_scoring_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(SelpruneError) as e:
        run(replace(CFG, scoring="entropy"), tmp_path)
    for name in ("abs", "freq", "rms", "std", "sqrt", "rand"):
        assert name in str(e.value)
    assert not (tmp_path / "config.json").exists()  # validated before anything is written


def test_data_without_skip_sets(tmp_path: Path) -> None:
    d = make_data()
    d.skip = {}
    records, _ = run(replace(CFG, steps=1), tmp_path, data=d)
    for r in records:
        for side in ("forget", "retain"):
            assert r[side]["top1_skip"] == r[side]["top1"] and r[side]["tokens_skip"] == r[side]["tokens"]


def test_seed_orders_collection_windows_not_evaluation_windows(smollm_tokenizer) -> None:
    cfg = PruneConfig(forget="code", retain="prose", collect_tokens=512, eval_tokens=512, window=128)
    a, b = loop.prepare_data(cfg, smollm_tokenizer), loop.prepare_data(replace(cfg, seed=1), smollm_tokenizer)
    assert torch.equal(a.forget_test, b.forget_test) and torch.equal(a.retain_test, b.retain_test)
    assert not torch.equal(a.forget_train, b.forget_train) and not torch.equal(a.retain_train, b.retain_train)
