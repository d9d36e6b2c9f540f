"""The code probe: header extraction, the parse judgement, fake models whose answer is
known, and a tiny real model (runs, bounded, reproducible)."""

from __future__ import annotations

import torch
from tiny_models import random_windows  # noqa: F401 - also sets torch to one thread (see tiny_models)
from torch import nn

from selprune.code_probe import BODY_INDENT, code_probe, function_headers, greedy_continuations, judged_text

SOURCE = '''import os


def first(a, b=2):
    """Add.

    More words."""
    return a + b


class Thing:
    def method(self) -> int:  # a comment
        \'\'\'One line.\'\'\'
        return 1

    def bare(self):
        return 2


def multi(a,
          b):
    return a


def one_liner(x): return x


async def later(x):
    return x
'''


def test_headers_in_document_order_with_docstrings_dedented() -> None:
    got = function_headers([SOURCE], n=10, per_document=10)
    assert got == [
        'def first(a, b=2):\n    """Add.\n\n    More words."""\n' + BODY_INDENT,
        "def method(self) -> int:  # a comment\n    '''One line.'''\n" + BODY_INDENT,
        "def bare(self):\n" + BODY_INDENT,
        "async def later(x):\n" + BODY_INDENT,
    ]  # multi-line headers and one-liners are not taken


def test_headers_capped_per_document_and_in_all() -> None:
    docs = [SOURCE, "def second_doc():\n    pass\n", "def third_doc():\n    pass\n"]
    assert [h.split("(")[0] for h in function_headers(docs, n=3, per_document=2)] == \
        ["def first", "def method", "def second_doc"]
    assert function_headers(docs, n=10, per_document=1)[1:] == ["def second_doc():\n" + BODY_INDENT,
                                                                "def third_doc():\n" + BODY_INDENT]
    assert function_headers(["x = 1\n"], n=5) == []


def test_long_docstring_is_left_out() -> None:
    doc = 'def f():\n    """Start.\n' + "    line\n" * 30 + '    """\n    return 1\n'
    assert function_headers([doc]) == ["def f():\n" + BODY_INDENT]


def test_judged_text_cuts_at_the_function_end_or_last_complete_line() -> None:
    p = "def f():\n    "
    assert judged_text(p, "return 1\n\nprint(oops\n", False) == p + "return 1\n\n"  # the function ended
    assert judged_text(p, "x = 1\n    y = (2", False) == p + "x = 1\n"  # the unfinished line is dropped
    assert judged_text(p, "x = 1\n    y = 2", True) == p + "x = 1\n    y = 2"  # EOS: complete as it is
    assert judged_text(p, "\n\n", False) is None  # nothing written: no pass
    assert judged_text(p, "x = (1", False) is None  # no complete line


class FakeModel(nn.Module):
    """A "model" whose generate appends the tokens of `text` (then EOS) to every row."""

    def __init__(self, tokenizer, text: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.new = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.seen: list[torch.Tensor] = []

    def generate(self, input_ids, attention_mask, generation_config, **kwargs) -> torch.Tensor:
        self.seen.append(attention_mask)
        n = min(len(self.new), generation_config.max_new_tokens)
        tail = torch.tensor(self.new[:n]).expand(len(input_ids), n)
        return torch.cat([input_ids, tail], 1)


def test_fake_valid_body_scores_one_and_invalid_zero(smollm_tokenizer) -> None:
    docs = [SOURCE, SOURCE]  # two headers from each
    good = code_probe(FakeModel(smollm_tokenizer, "return 1\n\n\ndef other():\n"), smollm_tokenizer, docs,
                      n_prompts=4, new_tokens=32, batch_size=3)
    assert good["fraction"] == 1.0 and good["n"] == 4
    bad = code_probe(FakeModel(smollm_tokenizer, "return (1 +\n    ]\n"), smollm_tokenizer, docs,
                     n_prompts=4, new_tokens=32, batch_size=3)
    assert bad["fraction"] == 0.0 and bad["n"] == 4
    assert not any(e["parsed"] for e in bad["examples"])


def test_left_padding_and_continuations(smollm_tokenizer) -> None:
    fake = FakeModel(smollm_tokenizer, "return 1\n")
    prompts = ["def a():\n    ", 'def longer_name(x, y):\n    """Doc."""\n    ']
    out = greedy_continuations(fake, smollm_tokenizer, prompts, new_tokens=16, batch_size=2)
    assert out == [("return 1\n", True), ("return 1\n", True)]
    mask = fake.seen[0]
    assert mask[0, 0] == 0 and mask[1].all() and mask[:, -1].all()  # the shorter prompt is padded on the left


def test_no_headers_gives_none(smollm_tokenizer) -> None:
    r = code_probe(FakeModel(smollm_tokenizer, "x\n"), smollm_tokenizer, ["just prose.\n"], n_prompts=4)
    assert r["fraction"] is None and r["n"] == 0


def test_tiny_model_runs_bounded_and_reproducible(tiny_llama, smollm_tokenizer) -> None:
    model, docs = tiny_llama(seed=0), [SOURCE, SOURCE]
    a = code_probe(model, smollm_tokenizer, docs, n_prompts=3, new_tokens=12, batch_size=2)
    b = code_probe(model, smollm_tokenizer, docs, n_prompts=3, new_tokens=12, batch_size=2)
    assert a["n"] == 3 and 0.0 <= a["fraction"] <= 1.0
    assert a == b


def test_continuation_is_the_greedy_argmax(tiny_llama, smollm_tokenizer) -> None:
    model = tiny_llama(seed=3, initializer_range=0.5)  # wide weights: varied tokens, not one repeated
    prompt = function_headers([SOURCE])[0]
    ids = torch.tensor([smollm_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    want = smollm_tokenizer.decode(ids[0], skip_special_tokens=True)[len(prompt):]
    [(got, _)] = greedy_continuations(model, smollm_tokenizer, [prompt], new_tokens=10)
    assert got == want and len(set(got)) > 3
