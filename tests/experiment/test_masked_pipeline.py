"""A masked LM through the whole pruning pipeline, offline: a tiny random-init BERT saved as
a local Hugging Face directory with a character-level WordPiece tokenizer built here, loaded
by `load_model`, windows from the bundled corpora, a pruning run (statistics, scores,
pruning, masked-token evaluation), export and reload; and the causal-only work refused."""

from __future__ import annotations

import string

import pytest
import torch
import transformers as T

from selprune.errors import SelpruneError
from selprune.evaluate import evaluate_both
from selprune.experiment.config import Config
from selprune.experiment.loop import data_for, run_pruning
from selprune.masked import evaluate_masked, is_masked_lm
from selprune.models import load_model
from selprune.prune import export_pruned

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(folder) -> T.PreTrainedTokenizerBase:
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = SPECIAL + chars + [f"##{c}" for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return T.BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(folder)
    cfg = T.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    T.BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


CFG = Config(window=32, collect_tokens=256, eval_tokens=256, batch_size=4, steps=2, ff_frac=0.1, attn_frac=0.1,
             skip_k=5, dtype="float32", device="cpu")


def test_a_local_masked_lm_loads_as_one_with_its_mask_token(bert_dir) -> None:
    model, tok = load_model(str(bert_dir), dtype="float32", device="cpu")
    assert is_masked_lm(model) and model.config.mask_token_id == tok.mask_token_id == 4


@pytest.mark.parametrize("kind", ["ff", "both"])
def test_pruning_run_on_a_masked_lm_evaluates_masked_tokens_and_exports(bert_dir, tmp_path, kind) -> None:
    model, tok = load_model(str(bert_dir), dtype="float32", device="cpu")
    cfg = CFG.replace(model=str(bert_dir))
    data = data_for(cfg, tok)
    records, pruner = run_pruning(cfg, kind, tmp_path / kind, model, tok, data, progress=False)
    assert len(records) == 3 and records[-1]["fraction"]["ff"] == pytest.approx(0.2, abs=0.01)
    # record 0 is masked-token evaluation of the unpruned model (15% of 8 windows x 32 positions)
    want = evaluate_masked(model, data.forget_test, tok.mask_token_id, data.skip["forget"], cfg.batch_size)
    assert records[-1]["forget"] == pytest.approx(want)
    assert records[-1]["forget"]["tokens"] == data.forget_test.shape[0] * round(0.15 * 32)
    assert records[0]["forget"] != records[-1]["forget"]  # pruning changed what the model recovers
    out = export_pruned(model, pruner, tmp_path / "export", tok)
    again, _ = load_model(str(out), dtype="float32", device="cpu")
    assert evaluate_both(again, data, cfg.batch_size, False) == evaluate_both(model, data, cfg.batch_size, False)


def test_the_hub_path_loads_a_masked_lm_as_one(bert_dir) -> None:
    from selprune.models import _load_hub_id

    model, tok = _load_hub_id(str(bert_dir), dtype=torch.float32)  # a local folder stands in for the hub
    assert is_masked_lm(model) and tok.mask_token_id == 4


def test_causal_only_work_is_refused_for_a_masked_lm(bert_dir) -> None:
    from selprune.experiment.baselines import unlearn
    from selprune.experiment.retrain import retrain

    model, tok = load_model(str(bert_dir), dtype="float32", device="cpu")
    data = data_for(CFG.replace(model=str(bert_dir)), tok)
    with pytest.raises(SelpruneError, match="needs a causal LM"):
        unlearn(model, data, CFG, "ga", progress=False)
    with pytest.raises(SelpruneError, match="needs a causal LM"):
        retrain(model, None, None, data, CFG, progress=False, train=data.forget_train)
