"""selprune: machine unlearning by selective pruning of language-model neurons.

A thin helper package behind the notebook series: load a model and texts, collect
activation statistics on a forget and a retain set, score neurons, prune, evaluate.
"""

import logging

from selprune.errors import SelpruneError
from selprune.models import MODELS, ModelEntry, load_model, register_model
from selprune.texts import DATASETS, TextSource, load_texts, register_dataset, token_windows, top_tokens

__version__ = "0.1.0"

# a library adds no handler of its own: `selprune` commands show its notes (cli.setup_logging)
logging.getLogger("selprune").addHandler(logging.NullHandler())

__all__ = [
    "DATASETS",
    "MODELS",
    "ModelEntry",
    "SelpruneError",
    "TextSource",
    "load_model",
    "load_texts",
    "register_dataset",
    "register_model",
    "token_windows",
    "top_tokens",
]
