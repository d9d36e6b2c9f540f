"""Progress bars of the libraries selprune calls, switched off for a block and restored.

Stored notebook outputs must carry no progress noise, but turning transformers' or
datasets' bars off process-wide would change the caller's session; this does it only
while selprune loads a model or reads data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """Inside the block, no progress bars from transformers or datasets (if `quiet`)."""
    if not quiet:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    hf_was_on = hf_logging.is_progress_bar_enabled()
    ds_was_on = not datasets.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if ds_was_on:
            datasets.enable_progress_bars()
