"""Packing documents into fixed-length token windows, the unit every statistic and metric is read on.

Documents are shuffled by a seed, joined with EOS and cut into rows of `window` tokens (a
BOS first where the tokenizer adds one): no padding anywhere, so every position is a real
token and a token budget is simply `n_windows * window` (docs/method.md, "Activation
statistics").
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from selprune.errors import SelpruneError


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts BOS first by itself, i.e. the model expects one."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def _documents(texts: Iterable[str] | datasets.Dataset | datasets.IterableDataset, seed: int | None) -> Iterator[str]:
    if isinstance(texts, datasets.Dataset):
        if seed is not None:
            texts = texts.shuffle(seed=seed)
        for start in range(0, len(texts), 256):
            yield from texts[start : start + 256]["text"]
    elif isinstance(texts, datasets.IterableDataset):
        if seed is not None:
            texts = texts.shuffle(seed=seed, buffer_size=1000)
        for row in texts:
            yield row["text"]
    else:
        if isinstance(texts, str):
            texts = [texts]
        if seed is None:
            yield from texts
        else:  # plain iterables are shuffled by `seed` too, as the datasets are
            docs = list(texts)
            random.Random(seed).shuffle(docs)
            yield from docs


class _Packer:
    """The state of `token_windows`: documents go in (in batches, tokenized together),
    EOS-separated token rows of `window` (BOS first where the tokenizer adds one) come out."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, window: int, want: int | None,
                 max_doc_tokens: int | None, skip: int) -> None:
        self.tokenizer, self.want, self.max_doc_tokens, self.skip = tokenizer, want, max_doc_tokens, skip
        self.bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self.sep = tokenizer.eos_token_id
        self.body = window - len(self.bos)
        self.rows: list[list[int]] = []
        self.buf: list[int] = []

    def full(self) -> bool:
        return self.want is not None and len(self.rows) >= self.want

    def add(self, batch: list[str]) -> None:
        for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if self.max_doc_tokens is not None:
                ids = ids[: self.max_doc_tokens]
            if not ids:
                continue
            self.buf.extend(ids)
            if self.sep is not None:
                self.buf.append(self.sep)
            if self.skip:  # seen text: drop the windows it fills, and the rest of the document that ends them
                while len(self.buf) >= self.body and self.skip:
                    del self.buf[: self.body]
                    self.skip -= 1
                if not self.skip:
                    self.buf.clear()
        while len(self.buf) >= self.body and not self.full():
            self.rows.append(self.bos + self.buf[: self.body])
            del self.buf[: self.body]


def token_windows(
    texts: Iterable[str] | datasets.Dataset | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    window: int = 256,
    max_tokens: int | None = None,
    seed: int | None = 0,
    max_doc_tokens: int | None = None,
    strict: bool = True,
    after_windows: int = 0,
) -> torch.Tensor:
    """Pack documents into a `[n_windows, window]` LongTensor of token ids.

    The budget `max_tokens` counts every position of every window, so the result holds
    `max_tokens // window` windows. Documents are shuffled by `seed` (None keeps their
    order), each truncated to `max_doc_tokens` if given, and separated by EOS. If the
    texts run out first, `strict` makes that an error naming the shortfall.

    `after_windows` > 0 leaves out every document that the first `after_windows` windows
    of the same call without it would touch, the one a window boundary cuts included:
    text that a collection of that many windows never saw, from the same documents.
    """
    if window < 2:
        raise SelpruneError(f"window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < window:
        raise SelpruneError(f"token budget {max_tokens} is smaller than one window ({window}); raise it")
    want = None if max_tokens is None else max_tokens // window
    packer = _Packer(tokenizer, window, want, max_doc_tokens, after_windows)
    batch: list[str] = []
    for text in _documents(texts, seed):
        if text:
            batch.append(text)
        if len(batch) == 32:
            packer.add(batch)
            batch = []
            if packer.full():
                break
    if batch and not packer.full():
        packer.add(batch)
    rows = packer.rows
    if want is not None and len(rows) < want and strict:
        raise SelpruneError(
            f"the texts hold only {len(rows) * window} tokens in {len(rows)} windows of {window}, "
            f"short of the budget of {max_tokens}; lower the token budget or use a larger dataset"
        )
    if not rows:
        raise SelpruneError("the texts are empty: no window of tokens could be made; check the dataset")
    return torch.tensor(rows, dtype=torch.long)  # [n_windows, window]


def top_tokens(windows: torch.Tensor, k: int = 50) -> torch.Tensor:
    """The `k` most frequent token ids in `windows` (ties broken by lower id): the "skip"
    set whose targets the skip accuracies leave out."""
    ids, counts = torch.unique(windows, return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), int(ids[i])))
    return ids[order[:k]].sort().values
