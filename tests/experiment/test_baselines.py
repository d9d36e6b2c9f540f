"""Running the gradient unlearning baselines (selprune/experiment/baselines.py) on tiny
random-init models: each does what its loss says (GA and NPO lower the forget likelihood,
GradDiff's retain term holds retain, RMU steers at its layer only through its MLPs), the
frozen quantities stay frozen, a seeded run repeats bit for bit, the records have the
pruning record format with compute counts that add up, and bad hyperparameters are refused
before any work."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import loop_data, tiny_model  # sets torch to one thread

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.experiment.baselines import Unlearner, checkpoint_steps, compute_record, unlearn
from selprune.experiment.config import Config
from selprune.sites import find_sites
from selprune.unlearning import METHODS, hidden_at, nll, sequence_logprobs

LR = 1e-2  # high, so that a few steps on a tiny model move it far


def cfg(**kw) -> Config:
    return Config(**{"unlearn_steps": 8, "unlearn_checkpoints": 2, "unlearn_lr": LR, "batch_size": 4, **kw})


def nlls(model, d: Data) -> tuple[float, float]:
    with torch.no_grad():
        return nll(model, d.forget_train).item(), nll(model, d.retain_train).item()


@pytest.mark.parametrize("method", ["ga", "npo"])
def test_ga_and_npo_lower_the_forget_likelihood(method):
    model, d = tiny_model("llama"), loop_data()
    before = nlls(model, d)[0]
    unlearn(model, d, cfg(), method, progress=False)
    assert nlls(model, d)[0] > before + 1.0


def test_graddiffs_retain_term_holds_retain_loss_where_ga_does_not():
    d = loop_data()
    after = {}
    for method in ("ga", "graddiff"):
        model = tiny_model("llama")
        before = nlls(model, d)
        unlearn(model, d, cfg(unlearn_steps=16), method, progress=False)
        after[method] = nlls(model, d)
        assert after[method][0] > before[0] + 1.0  # both unlearn
    assert after["ga"][1] > 1.5 * before[1]  # gradient ascent alone drags retain along
    assert after["graddiff"][1] <= before[1]  # the retain term holds it


def _rmu_distances(model, d: Data, state: dict, layer: int) -> tuple[float, float]:
    """(forget distance to c u, retain distance to the frozen activations), RMS per token."""
    with torch.no_grad():
        hf = hidden_at(model, d.forget_train, layer)[:, 1:]
        hr = hidden_at(model, d.retain_train, layer)[:, 1:]
    target = state["coeff"] * state["direction"]
    return (hf - target).norm(dim=-1).mean().item(), (hr - state["frozen_retain"]).norm(dim=-1).mean().item()


def test_rmu_steers_forget_activations_keeps_retain_ones_and_trains_only_its_mlps():
    d = loop_data()
    dist = {}
    for alpha in (10.0, 0.0):
        model = tiny_model("llama", num_hidden_layers=3)
        original = copy.deepcopy(model.state_dict())
        c = cfg(unlearn_steps=16, unlearn_lr=3e-2, rmu_layer=1, rmu_layers=2, rmu_alpha=alpha)
        run = Unlearner(model, d, c, "rmu")
        run.run(progress=False)
        dist[alpha] = _rmu_distances(model, d, run.state, 1)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
        assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}  # not layer 2, nor attention
    base = _rmu_distances(tiny_model("llama", num_hidden_layers=3), d, run.state, 1)
    assert base[1] == 0  # the frozen retain activations are the original model's
    assert dist[10.0][0] < 0.7 * base[0]  # forget activations moved towards c u
    assert dist[10.0][1] < 0.5 * dist[0.0][1]  # and the retain term kept retain near the frozen model


def test_npos_reference_is_the_original_models_and_stays_frozen():
    model, d = tiny_model("llama"), loop_data()
    original = copy.deepcopy(model)
    run = Unlearner(model, d, cfg(), "npo_rt")
    run.run(progress=False)
    ref = run.state["ref_logp"]
    with torch.no_grad():
        torch.testing.assert_close(ref, sequence_logprobs(original, d.forget_train), rtol=0, atol=1e-4)
        assert (sequence_logprobs(model, d.forget_train) < ref - 1).all()  # the model moved, its reference did not
    assert not ref.requires_grad


def _without_timings(records: list[dict]) -> list[dict]:
    out = copy.deepcopy(records)
    for r in out:
        r.pop("seconds")
        r["compute"].pop("seconds")
        r["compute"].pop("peak_memory_mb")
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_method_repeats_bit_for_bit_and_leaves_the_callers_state(method, family):
    d = loop_data()
    runs = []
    for _ in range(2):
        model = tiny_model(family)
        next(model.parameters()).requires_grad_(False)  # a caller's frozen flag: trained, then restored
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        rng = torch.get_rng_state()
        records = unlearn(model, d, cfg(seed=3), method, progress=False)
        assert torch.equal(torch.get_rng_state(), rng)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
        runs.append((model.state_dict(), _without_timings(records)))
    (w0, r0), (w1, r1) = runs
    assert r0 == r1
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("method", list(METHODS))
def test_records_have_the_pruning_format_and_compute_adds_up(method):
    model, d = tiny_model("llama", num_hidden_layers=3), loop_data()
    c = cfg(unlearn_steps=6, unlearn_checkpoints=3, unlearn_batch=3, rmu_layer=1, rmu_layers=2)
    records = unlearn(model, d, c, method, progress=False)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["train_step"] for r in records] == [0, 2, 4, 6] == [0, *checkpoint_steps(6, 3)]
    m, window, n = METHODS[method], d.forget_train.shape[1], len(d.forget_train)
    passes = 2 if m.needs_retain else 1
    per_step = c.unlearn_batch * window * passes  # tokens per step through forward and backward
    prep = {"ga": 0, "graddiff": 0, "npo": n, "npo_rt": n, "rmu": n + len(d.retain_train)}[method] * window
    fwd_depth, bwd_depth = ((2 / 3), (2 / 3)) if method == "rmu" else (1.0, 1.0)  # layers 0-1 of 3, both trained
    for r in records:
        assert set(r) >= {"step", "train_step", "fraction", "forget", "retain", "train_loss", "seconds", "compute"}
        assert r["fraction"] == {"ff": 0.0, "attn": 0.0}
        assert set(r["forget"]) >= {"top1", "loss"} and set(r["seconds"]) == {"train", "eval"}
        s, comp = r["train_step"], r["compute"]
        fwd = s * per_step + (prep if s else 0)
        assert comp["forward_tokens"] == fwd and comp["backward_tokens"] == s * per_step
        want_equiv = (prep if s else 0) * fwd_depth + s * per_step * (fwd_depth + 2 * bwd_depth)
        assert comp["forward_equiv_tokens"] == pytest.approx(want_equiv)
        assert (r["train_loss"] is None) == (s == 0)
    assert records[-1]["compute"]["seconds"] > 0
    assert records[-1]["compute"]["peak_memory_mb"] is None or records[-1]["compute"]["peak_memory_mb"] >= 0


def _glibc_linux() -> bool:
    import ctypes
    import os

    try:
        return hasattr(ctypes.CDLL(None), "malloc_trim") and os.access("/proc/self/clear_refs", os.W_OK)
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_linux(), reason="CPU peak memory is read from Linux /proc with glibc's heap")
def test_cpu_peak_counts_memory_the_heap_kept_from_earlier_work():
    """Memory that earlier work freed stays resident in the C heap; a meter made after it must
    still count what its own work needs (the second of two identical baselines in one process
    measured ~0 MB before the heap was released first)."""
    from selprune.experiment.baselines import ComputeMeter, release_free_heap

    def fill(n: int) -> list[torch.Tensor]:  # n x 64 KiB blocks: below glibc's mmap threshold, on the heap
        return [torch.ones(16384) for _ in range(n)]

    release_free_heap()
    blocks = fill(2000)  # 125 MiB
    pin = fill(1)  # above them: the heap cannot shrink past it on its own
    del blocks  # freed, but resident
    meter = ComputeMeter(torch.device("cpu"))
    with meter.measure():
        again = fill(2000)
    del again, pin
    assert meter.peak_bytes is not None and meter.peak_bytes > 100 << 20, meter.peak_bytes


def test_compute_record_defaults_to_forward_plus_twice_backward():
    assert compute_record(100, 30)["forward_equiv_tokens"] == 160
    assert compute_record(100, 0, 50.0, 3 << 20, 1.5) == {
        "forward_tokens": 100, "backward_tokens": 0, "forward_equiv_tokens": 50.0, "peak_memory_mb": 3.0,
        "seconds": 1.5}


def _no_retain(d: Data) -> Data:
    return Data(d.forget_train, d.retain_train[:0], d.forget_test, d.retain_test, d.skip)


@pytest.mark.parametrize("method, kw, data_fn, names", [
    ("sgd", {}, None, "method='sgd'"),
    ("ga", {"unlearn_lr": -1e-5}, None, "unlearn_lr=-1e-05"),
    ("ga", {"unlearn_lr": 0.0}, None, "unlearn_lr=0.0"),
    ("npo", {"npo_beta": 0.0}, None, "npo_beta=0.0"),
    ("rmu", {"rmu_layer": 2}, None, "rmu_layer=2"),
    ("rmu", {"rmu_coeff": -1.0}, None, "rmu_coeff=-1.0"),
    ("rmu", {"rmu_layers": 0}, None, "rmu_layers=0"),
    ("graddiff", {"retain_weight": -1.0}, None, "retain_weight=-1.0"),
    ("ga", {"unlearn_checkpoints": 9}, None, "unlearn_checkpoints=9"),
    ("ga", {"unlearn_steps": 0}, None, "unlearn_steps=0"),
    ("graddiff", {}, _no_retain, "retain training windows"),
    ("rmu", {}, _no_retain, "retain training windows"),
])
def test_bad_hyperparameters_are_refused_before_any_work(method, kw, data_fn, names):
    model, d = tiny_model("llama"), loop_data()
    d = data_fn(d) if data_fn else d
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SelpruneError, match=names.replace("(", r"\(").replace("[", r"\[")):
        unlearn(model, d, cfg(**kw), method, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ga_without_retain_windows_runs():
    model, d = tiny_model("llama"), loop_data()
    records = unlearn(model, _no_retain(d), cfg(), "ga", progress=False)
    assert len(records) == 3


def test_rmu_default_layer_and_coefficient_are_resolved_from_the_model():
    model, d = tiny_model("llama", num_hidden_layers=4), loop_data()
    run = Unlearner(model, d, cfg(), "rmu")
    assert run.hp.rmu_layer == 1  # round(7/32 x 4)
    run.run(progress=False)
    assert run.state["coeff"].item() > 0
    assert find_sites(model).n_layers == 4
