"""A functional code probe: does the model still write Python that parses?

Next-token accuracy on code can stay high while generation falls apart (or the reverse),
so this probe asks the capability itself: from function headers of held-out code (the
header and its docstring, if any), the model continues greedily for `new_tokens` tokens,
and the probe counts the prompts whose prompt + continuation `ast.parse` accepts. Nothing
is ever executed: parsing only.

Rules (docs/method.md, "Probes beyond next-token accuracy"):
- prompts are the first `n_prompts` single-line `def` headers in document order, at most
  `per_document` from one document (so that one long file does not make the whole set),
  each with its docstring when that is at most `MAX_DOC_LINES` lines, the header's indentation
  taken off (a method becomes a top-level function: the text parses on its own), and the
  body's first indentation (`BODY_INDENT`) last: without it the embedded instruct model
  answers a bare header with Markdown or prose (0 of 16 parsed), with it it writes a body;
- the continuation is cut where the function ends (its first non-blank line at column 0:
  what the model writes after the function is not judged), else at its last complete line
  (a fixed token budget ends anywhere), unless generation ended at EOS there;
- a prompt passes when the cut continuation holds a non-blank line (the header and its
  docstring alone would parse: an empty body must not pass) and the whole text parses.

Greedy decoding (`do_sample=False`) of left-padded batches is deterministic on the CPU in
fp32; `greedy_continuations` is shared with the HumanEval probe (`selprune.humaneval`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from selprune.errors import SelpruneError
from selprune.models import input_device

N_PROMPTS = 16  # prompts per probe: ~20-30 s with NEW_TOKENS on the embedded model on 2 shared cores
NEW_TOKENS = 64  # greedy tokens per prompt: room for a short body
PER_DOCUMENT = 2  # headers taken from one document at most
BODY_INDENT = "    "  # the prompt's last characters: the body's indentation
MAX_DOC_LINES = 15  # a longer docstring is left out of the prompt (the header alone is kept)
N_EXAMPLES = 3  # examples kept in the result
# A single-line `def` header (possibly async, with a return annotation or a trailing comment).
_HEADER = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(.*\)[^:]*:[ \t]*(?:#.*)?$")
_DOC_OPEN = re.compile(r"^[ \t]*[rRuU]?(?P<q>\"\"\"|''')")


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return True


def _docstring(lines: list[str], start: int) -> list[str]:
    """The docstring lines from `lines[start]` if a triple-quoted string opens there and
    closes within `MAX_DOC_LINES` lines, else []."""
    if start >= len(lines):
        return []
    m = _DOC_OPEN.match(lines[start])
    if m is None:
        return []
    quote = m.group("q")
    if lines[start].count(quote) >= 2:  # opens and closes on one line
        return [lines[start]]
    for end in range(start + 1, min(len(lines), start + MAX_DOC_LINES)):
        if quote in lines[end]:
            return lines[start : end + 1]
    return []


def function_headers(texts: Iterable[str], n: int = N_PROMPTS, per_document: int = PER_DOCUMENT) -> list[str]:
    """Prompts from the first `n` function headers of `texts`, in document order, at most
    `per_document` from one document: each the header line, its docstring if short, dedented,
    a newline and `BODY_INDENT`. A header that does not parse as the start of a function is skipped."""
    out: list[str] = []
    for text in texts:
        lines, taken = text.splitlines(), 0
        for i, line in enumerate(lines):
            if len(out) >= n or taken >= per_document:
                break
            m = _HEADER.match(line)
            if m is None:
                continue
            indent = m.group("indent")
            doc = _docstring(lines, i + 1)
            # the header's indentation off every line that has it (inside the string, others stay)
            prompt = "".join((d[len(indent):] if d.startswith(indent) else d) + "\n" for d in [line, *doc])
            if not doc or not _parses(prompt):  # no docstring, or one that does not parse here
                prompt = line[len(indent):] + "\n"
                if not _parses(prompt + "    pass\n"):
                    continue
            out.append(prompt + BODY_INDENT)
            taken += 1
        if len(out) >= n:
            break
    return out


class _StopOnStrings(StoppingCriteria):
    """Per row: stop once the generated text holds one of `stops` (rows stop one by one)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, tuple(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SelpruneError("the tokenizer has neither a pad nor an EOS token; generation needs one to pad "
                            "batches: set tokenizer.pad_token")
    return pad


# long: tokenising, left-padding, generating and decoding one batch belong together
def greedy_continuations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                         new_tokens: int, batch_size: int = 8,
                         stops: Sequence[str] = ()) -> list[tuple[str, bool]]:
    """(continuation text, ended at EOS) of each prompt, by greedy decoding of at most
    `new_tokens` tokens, in batches of `batch_size` left-padded prompts; with `stops`, a
    row stops once its text holds one of them (the text is not cut here).

    The continuation is the decoded whole minus the decoded prompt, so that a token that
    merges across the boundary (or a byte-level piece) is not lost."""
    if new_tokens < 1:
        raise SelpruneError(f"new_tokens={new_tokens} is below 1; ask for at least one generated token")
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    device, out = input_device(model), []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids = tokenizer(list(prompts[start : start + batch_size]))["input_ids"]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)  # [batch, width]
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, width, stops)] if stops else [])
            with torch.inference_mode():
                gen = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                     stopping_criteria=criteria)  # [batch, width + <= new_tokens]
            for row, prompt_ids in zip(gen.tolist(), ids, strict=True):
                new = row[width:]
                ended = eos is not None and eos in new
                if ended:
                    new = new[: new.index(eos)]
                whole = tokenizer.decode(prompt_ids + new, skip_special_tokens=True)
                head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
                text = whole[len(head):] if whole.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)
                out.append((text, ended))
    finally:
        model.train(was_training)
    return out


def judged_text(prompt: str, continuation: str, ended: bool) -> str | None:
    """The text `ast.parse` judges: prompt + continuation up to the function's end (the
    first non-blank line at column 0 after the first line, which continues the prompt's
    indentation), else up to its last complete line (all of it if generation ended at
    EOS); None when that adds nothing but blanks (the prompt alone may parse: it must not
    count as a pass)."""
    lines = continuation.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if i > 0 and line.strip() and not line[0].isspace()), None)
    if end is not None:
        body = "".join(lines[:end])
    else:
        body = continuation if ended else continuation[: continuation.rfind("\n") + 1]
    if not body.strip():
        return None
    return prompt + body


def code_probe(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Iterable[str],
               n_prompts: int = N_PROMPTS, new_tokens: int = NEW_TOKENS, batch_size: int = 8,
               n_examples: int = N_EXAMPLES) -> dict:
    """The fraction of function-header prompts from `texts` whose greedy continuation
    parses, with n, the settings and the first `n_examples` (prompt, continuation, parsed).

    `fraction` is None when `texts` hold no function header (e.g. a prose forget set)."""
    prompts = function_headers(texts, n_prompts)
    results = greedy_continuations(model, tokenizer, prompts, new_tokens, batch_size) if prompts else []
    passed = []
    for prompt, (cont, ended) in zip(prompts, results, strict=True):
        text = judged_text(prompt, cont, ended)
        passed.append(text is not None and _parses(text))
    examples = [{"prompt": p, "continuation": c, "parsed": ok}
                for p, (c, _), ok in zip(prompts[:n_examples], results, passed, strict=False)]
    return {"fraction": sum(passed) / len(passed) if passed else None, "n": len(passed),
            "new_tokens": new_tokens, "examples": examples}
