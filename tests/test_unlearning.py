"""The baselines' losses and building blocks (selprune/unlearning.py), on tiny random-init
models: each loss against its definition computed another way, RMU's layer read where the
model's own hidden states put it, and the frozen quantities taken from the model as given."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import loop_data, tiny_model  # sets torch to one thread

from selprune.sites import find_sites
from selprune.unlearning import (
    METHODS,
    RMU_COEFF_SCALE,
    RMU_SKIP_POSITIONS,
    Hyper,
    StepBatch,
    hidden_at,
    nll,
    npo_prepare,
    rmu_direction,
    rmu_layer_for,
    rmu_params,
    rmu_prepare,
    rmu_trained_layers,
    sequence_logprobs,
)

FAMILIES = ("llama", "gpt2", "opt", "gpt_neox")


def _batch(d) -> StepBatch:
    idx = torch.arange(2)
    return StepBatch(d.forget_train[:2], idx, d.retain_train[:2], idx)


def _manual_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(next token) by log_softmax and gather: `[batch, window-1]`."""
    logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_nll_and_sequence_logprobs_match_a_manual_computation():
    model, d = tiny_model("llama"), loop_data()
    with torch.no_grad():
        lp = _manual_logprobs(model, d.forget_train)
        torch.testing.assert_close(nll(model, d.forget_train), -lp.mean())
        torch.testing.assert_close(sequence_logprobs(model, d.forget_train), lp.sum(1))


def test_ga_and_graddiff_losses_are_their_definitions():
    model, d = tiny_model("llama"), loop_data()
    b, hp = _batch(d), Hyper(retain_weight=0.7)
    with torch.no_grad():
        f, r = -_manual_logprobs(model, b.forget).mean(), -_manual_logprobs(model, b.retain).mean()
        torch.testing.assert_close(METHODS["ga"].loss(model, b, {}, hp)[0], -f)
        torch.testing.assert_close(METHODS["graddiff"].loss(model, b, {}, hp)[0], -f + 0.7 * r)


def test_npo_loss_is_the_papers_formula_and_zero_ratio_gives_2_log2_over_beta():
    model, d = tiny_model("llama"), loop_data()
    b, hp = _batch(d), Hyper(npo_beta=0.25, retain_weight=2.0)
    with torch.no_grad():
        state = npo_prepare(model, d.forget_train, d.retain_train, hp, batch=3)
        # the model is its own reference: every log-ratio is 0, so the loss is (2/beta) log 2
        loss, terms = METHODS["npo"].loss(model, b, state, hp)
        assert loss.item() == pytest.approx(2 / 0.25 * math.log(2), rel=1e-6)
        assert terms["log_ratio"].item() == pytest.approx(0.0, abs=1e-4)
        shifted = {"ref_logp": state["ref_logp"] + torch.tensor([3.0, -5.0, 0, 0])}
        ratio = sequence_logprobs(model, b.forget) - shifted["ref_logp"][:2]
        want = -(2 / 0.25) * torch.nn.functional.logsigmoid(-0.25 * ratio).mean()
        torch.testing.assert_close(METHODS["npo"].loss(model, b, shifted, hp)[0], want)
        retain = -_manual_logprobs(model, b.retain).mean()
        torch.testing.assert_close(METHODS["npo_rt"].loss(model, b, shifted, hp)[0], want + 2.0 * retain)


def test_npo_reference_is_the_unmodified_models_log_probability_of_each_window():
    model, d = tiny_model("llama"), loop_data()
    with torch.no_grad():
        ref = npo_prepare(model, d.forget_train, d.retain_train, Hyper(), batch=3)["ref_logp"]
        want = _manual_logprobs(model, d.forget_train).sum(1)
    assert ref.shape == (len(d.forget_train),) and not ref.requires_grad
    torch.testing.assert_close(ref, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_at_is_the_residual_stream_after_the_block_and_stops_there(family):
    model, d = tiny_model(family), loop_data()
    sites = find_sites(model)
    ran = []
    handle = sites.ff[1].register_forward_hook(lambda *a: ran.append(1))  # the block above layer 0
    with torch.no_grad():
        h = hidden_at(model, d.forget_train, 0)
    handle.remove()
    assert not ran  # nothing above layer 0 ran
    with torch.no_grad():
        want = model(input_ids=d.forget_train, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(h, want)


def test_rmu_direction_is_a_seeded_unit_vector_in_the_positive_orthant():
    u = rmu_direction(64, seed=3)
    assert u.norm().item() == pytest.approx(1.0, rel=1e-6) and (u >= 0).all()
    assert torch.equal(u, rmu_direction(64, seed=3)) and not torch.equal(u, rmu_direction(64, seed=4))


def test_rmu_layer_default_follows_the_papers_relative_depth():
    assert rmu_layer_for(32) == 7  # zephyr-7b: the paper's layer
    assert rmu_layer_for(30) == 7  # smollm2-135m
    assert rmu_layer_for(2) == 0 and rmu_layer_for(1) == 0
    assert list(rmu_trained_layers(Hyper(rmu_layer=7, rmu_layers=3))) == [5, 6, 7]
    assert list(rmu_trained_layers(Hyper(rmu_layer=1, rmu_layers=3))) == [0, 1]  # clipped at the bottom


def test_rmu_prepare_freezes_retain_activations_and_measures_the_coefficient():
    model, d = tiny_model("llama", num_hidden_layers=3), loop_data()  # hidden_states[2]: not the last (normed)
    hp = Hyper(rmu_layer=1, rmu_coeff=None, seed=5)
    with torch.no_grad():
        state = rmu_prepare(model, d.forget_train, d.retain_train, hp, batch=3)
        want = model(input_ids=d.retain_train, output_hidden_states=True).hidden_states[2]
        forget = model(input_ids=d.forget_train, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(state["frozen_retain"], want[:, RMU_SKIP_POSITIONS:])
    coeff = RMU_COEFF_SCALE * forget[:, RMU_SKIP_POSITIONS:].norm(dim=-1).mean()
    assert state["coeff"].item() == pytest.approx(coeff.item(), rel=1e-5)
    assert torch.equal(state["direction"], rmu_direction(want.shape[-1], 5))
    given = rmu_prepare(model, d.forget_train, d.retain_train, Hyper(rmu_layer=1, rmu_coeff=3.5), batch=3)
    assert given["coeff"].item() == 3.5


def test_rmu_loss_is_the_mean_squared_distances_at_the_layer():
    model, d = tiny_model("llama"), loop_data()
    hp = Hyper(rmu_layer=0, rmu_alpha=10.0, rmu_coeff=4.0)
    b = _batch(d)
    with torch.no_grad():
        state = rmu_prepare(model, d.forget_train, d.retain_train, hp, batch=4)
        state["frozen_retain"] = state["frozen_retain"] + 0.5  # a known retain offset
        loss, terms = METHODS["rmu"].loss(model, b, state, hp)
        hf = model(input_ids=b.forget, output_hidden_states=True).hidden_states[1][:, 1:]
        forget = ((hf - 4.0 * state["direction"]) ** 2).mean()
    torch.testing.assert_close(terms["forget_mse"], forget)
    assert terms["retain_mse"].item() == pytest.approx(0.25, rel=1e-5)
    torch.testing.assert_close(loss, forget + 10.0 * terms["retain_mse"])


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_rmu_params_are_the_mlp_output_weights_of_its_layers(family):
    model = tiny_model(family)
    ff = find_sites(model).ff
    got = rmu_params(model, Hyper(rmu_layer=1, rmu_layers=1))
    assert len(got) == 1 and got[0] is ff[1].weight


def test_registry_holds_the_five_methods_with_their_needs():
    assert list(METHODS) == ["ga", "graddiff", "npo", "npo_rt", "rmu"]
    needs = {name: (m.needs_retain, m.needs_reference) for name, m in METHODS.items()}
    assert needs == {"ga": (False, False), "graddiff": (True, False), "npo": (False, True),
                     "npo_rt": (True, True), "rmu": (True, True)}
    assert all(m.lr > 0 and m.description for m in METHODS.values())
