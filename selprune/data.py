"""The token windows of one forget/retain experiment: collection (train) and evaluation (test).

Statistics are collected on train windows and every metric is read on test windows, so
that what a method saw is never what it is judged on. Each set also gets its *skip* tokens
(its `skip_k` most frequent collection tokens), whose targets the skip accuracies leave out
(docs/method.md, "Evaluation").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from selprune.texts import load_texts, token_windows, top_tokens

EVAL_SEED = 0  # the test windows' order: one fixed evaluation set for every seed


@dataclass
class Data:
    """Token windows `[n, window]` of both datasets, and each one's skip token ids.

    For an image classifier (`selprune.vision`) the "windows" are images: pixel values
    `[n, C, h, w]`, with the test images' class `labels` per side and the tokens each image
    puts through the encoder (`tokens_per_item`); there are no skip sets."""

    forget_train: torch.Tensor
    retain_train: torch.Tensor
    forget_test: torch.Tensor
    retain_test: torch.Tensor
    skip: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # images only: "forget"/"retain" -> [n_test]
    tokens_per_item: int | None = None  # images only: patches (+ CLS) per image

    @property
    def is_images(self) -> bool:
        return self.tokens_per_item is not None

    def tokens(self, windows: torch.Tensor) -> int:
        """Tokens that `windows` (one of this data's sets) put through the model."""
        return windows.numel() if self.tokens_per_item is None else len(windows) * self.tokens_per_item

    def with_eval_windows(self, n: int) -> Data:
        """The same data with only the first `n` test windows of each set (cheaper evaluations)."""
        labels = {side: y[:n] for side, y in self.labels.items()}
        return Data(self.forget_train, self.retain_train, self.forget_test[:n], self.retain_test[:n], self.skip,
                    labels, self.tokens_per_item)


def prepare_data(tokenizer: PreTrainedTokenizerBase, *, forget: str, retain: str, window: int,
                 collect_tokens: int, eval_tokens: int, skip_k: int, seed: int) -> Data:
    """Windows for collection (train) and evaluation (test), and each set's skip tokens.

    `seed` orders the collection documents only; the test windows are always drawn in
    the `EVAL_SEED` order, so that runs with different seeds are measured on the same text
    and their spread is the method's (which documents it learnt from), not the sampling
    noise of a small evaluation set."""
    def win(name: str, split: str, budget: int, order: int) -> torch.Tensor:
        return token_windows(load_texts(name, split), tokenizer, window, budget, seed=order)

    d = Data(
        win(forget, "train", collect_tokens, seed),
        win(retain, "train", collect_tokens, seed),
        win(forget, "test", eval_tokens, EVAL_SEED),
        win(retain, "test", eval_tokens, EVAL_SEED),
    )
    d.skip = {"forget": top_tokens(d.forget_train, skip_k), "retain": top_tokens(d.retain_train, skip_k)}
    return d
