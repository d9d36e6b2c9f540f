"""Masked language models (BERT, RoBERTa, DistilBERT, ELECTRA) on tiny random-init configs:
neuron sites, pruning one neuron removes exactly its contribution, statistics, masked-token
evaluation against a brute-force count, and export that reloads logits-exact."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from selprune.errors import SelpruneError
from selprune.masked import evaluate_masked, mask_positions, mask_token_id
from selprune.prune import Pruner, export_pruned
from selprune.sites import find_sites, weight_out_in
from selprune.stats import collect_stats

VOCAB, D, D_MLP, HEADS, LAYERS = 60, 32, 48, 4, 2
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64)
MASKED = {
    "bert": (T.BertConfig, T.BertForMaskedLM, dict(hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=LAYERS,
                                                  num_attention_heads=HEADS)),
    "roberta": (T.RobertaConfig, T.RobertaForMaskedLM, dict(hidden_size=D, intermediate_size=D_MLP,
                                                           num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                           pad_token_id=1, max_position_embeddings=70)),
    "distilbert": (T.DistilBertConfig, T.DistilBertForMaskedLM, dict(dim=D, hidden_dim=D_MLP, n_layers=LAYERS,
                                                                    n_heads=HEADS)),
    "electra": (T.ElectraConfig, T.ElectraForMaskedLM, dict(hidden_size=D, intermediate_size=D_MLP, embedding_size=D,
                                                           num_hidden_layers=LAYERS, num_attention_heads=HEADS)),
}
MASK_ID = 4


def masked_lm(family: str, seed: int = 0) -> torch.nn.Module:
    cfg_cls, model_cls, kw = MASKED[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**_COMMON, **kw}))
    gen = torch.Generator().manual_seed(seed)  # not hash(name): Python salts str hashes per process
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def windows(n: int = 5, window: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (n, window), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", MASKED)
def test_sites_of_masked_lms(family) -> None:
    sites = find_sites(masked_lm(family))
    assert sites.n_layers == LAYERS and sites.shape("ff") == (LAYERS, D_MLP)
    assert sites.shape("attn") == (LAYERS, HEADS, D // HEADS)


def test_albert_is_refused_with_the_reason() -> None:
    cfg = T.AlbertConfig(**_COMMON, hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, embedding_size=16)
    with pytest.raises(SelpruneError, match="shares one block's weights"):
        find_sites(T.AlbertForMaskedLM(cfg))


@pytest.mark.parametrize("family", MASKED)
@pytest.mark.parametrize("kind", ["ff", "attn"])
def test_pruning_one_neuron_removes_exactly_its_contribution(family, kind) -> None:
    model = masked_lm(family, seed=1)
    sites = find_sites(model)
    layer, proj = 1, getattr(sites, kind)[1]
    seen = {}
    handle = proj.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach().clone(), y=out.detach().clone()))
    ids = windows(2, 12)
    model(input_ids=ids)
    before_x, before_y = seen["x"], seen["y"]
    mask = torch.zeros(sites.shape(kind), dtype=torch.bool)
    index = (layer, 7) if kind == "ff" else (layer, 2, 3)
    mask[index] = True
    Pruner(model, sites).prune(kind, mask)
    model(input_ids=ids)
    handle.remove()
    channel = 7 if kind == "ff" else 2 * (D // HEADS) + 3
    assert torch.equal(seen["x"], before_x)  # the layer's input is untouched (pruning acts on the projection)
    w = weight_out_in(proj)  # [out, in], now with the channel zeroed
    want = before_y - before_x[..., channel : channel + 1] * _orig_column(family, kind)
    assert torch.allclose(seen["y"], want, atol=1e-5)
    assert float(w[:, channel].abs().sum()) == 0.0


def _orig_column(family: str, kind: str) -> torch.Tensor:
    """The pruned channel's weight column in an unpruned copy: what it added."""
    fresh = find_sites(masked_lm(family, seed=1))
    return weight_out_in(getattr(fresh, kind)[1])[:, 7 if kind == "ff" else 2 * (D // HEADS) + 3]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_statistics_collect_on_masked_lms(family) -> None:
    model = masked_lm(family)
    st = collect_stats(model, find_sites(model), windows(4, 16), batch_size=2, progress=False)
    assert st.n_tokens == 64
    assert all(t.shape[:2] == (LAYERS, D_MLP) for t in st.sums["ff"].values())
    assert all(t.abs().sum() > 0 for t in st.sums["ff"].values())


def test_mask_positions_are_fixed_by_shape_and_seed() -> None:
    m = mask_positions((6, 40), 0.15, seed=3)
    assert m.sum(1).tolist() == [6] * 6  # round(0.15 * 40)
    assert torch.equal(m, mask_positions((6, 40), 0.15, seed=3))
    assert not torch.equal(m, mask_positions((6, 40), 0.15, seed=4))
    assert mask_positions((2, 3), 0.15).sum(1).tolist() == [1, 1]  # at least one
    with pytest.raises(SelpruneError, match="mask fraction"):
        mask_positions((2, 3), 1.5)


def _brute(model, w: torch.Tensor, skip: set[int], seed: int) -> dict[str, float]:
    mask = mask_positions(tuple(w.shape), seed=seed)
    hit1 = hit10 = n = ns = hit1s = hit10s = 0
    loss = 0.0
    for i in range(len(w)):
        inp = w[i : i + 1].clone()
        inp[0, mask[i]] = MASK_ID
        with torch.no_grad():
            logits = model(input_ids=inp).logits[0].double()  # [window, vocab]
        for p in mask[i].nonzero().flatten().tolist():
            t, row = int(w[i, p]), logits[p]
            rank = int((row > row[t]).sum())
            h1, h10 = rank == 0, rank < 10
            loss -= float(row.log_softmax(-1)[t])
            hit1, hit10, n = hit1 + h1, hit10 + h10, n + 1
            if t not in skip:
                ns, hit1s, hit10s = ns + 1, hit1s + h1, hit10s + h10
    return {"top1": hit1 / n, "top10": hit10 / n, "top1_skip": hit1s / ns, "top10_skip": hit10s / ns,
            "loss": loss / n, "tokens": n, "tokens_skip": ns}


@pytest.mark.parametrize("family", MASKED)
def test_masked_evaluation_matches_a_brute_force_count(family) -> None:
    model, w = masked_lm(family, seed=2), windows(5, 20, seed=1)
    w[:, ::4] = 7  # a frequent token, in the skip set
    skip = {7, 9}
    got = evaluate_masked(model, w, MASK_ID, torch.tensor(sorted(skip)), batch_size=2, seed=5)
    want = _brute(model, w, skip, seed=5)
    assert got["tokens"] == want["tokens"] == 5 * 3 and 0 < got["tokens_skip"] < got["tokens"]
    for k in ("top1", "top10", "top1_skip", "top10_skip"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["top10"] > 0


def test_mask_token_comes_from_the_tokenizer_or_the_config() -> None:
    model = masked_lm("bert")

    class Tok:
        mask_token_id = 3

    assert mask_token_id(model, Tok()) == 3
    model.config.mask_token_id = 2
    assert mask_token_id(model) == 2
    del model.config.mask_token_id
    with pytest.raises(SelpruneError, match="no mask token"):
        mask_token_id(model)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_export_of_a_pruned_masked_lm_reloads_logits_exact(family, tmp_path, smollm_tokenizer) -> None:
    model = masked_lm(family, seed=3)
    sites = find_sites(model)
    pruner = Pruner(model, sites)
    mask = torch.zeros(sites.shape("ff"), dtype=torch.bool)
    mask[0, :5] = True
    pruner.prune("ff", mask)
    out = export_pruned(model, pruner, tmp_path / "pruned", smollm_tokenizer)
    again = T.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids = windows(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
