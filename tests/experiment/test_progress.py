"""Other libraries' progress bars (selprune/experiment/progress.py): switched off inside
`quiet_libraries`, and back as they were afterwards, also when the block raises."""

from __future__ import annotations

import datasets
import pytest
from transformers.utils import logging as hf_logging

from selprune.experiment.progress import quiet_libraries


def bars() -> tuple[bool, bool]:
    """(transformers' bars on, datasets' bars on)."""
    return hf_logging.is_progress_bar_enabled(), not datasets.are_progress_bars_disabled()


def set_bars(hf: bool, ds: bool) -> None:
    hf_logging.enable_progress_bar() if hf else hf_logging.disable_progress_bar()
    datasets.enable_progress_bars() if ds else datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def restore_bars():
    was = bars()
    yield
    set_bars(*was)


@pytest.mark.parametrize("state", [(True, True), (True, False), (False, True), (False, False)])
def test_quiet_libraries_silences_both_inside_and_restores_them_after(state):
    set_bars(*state)
    with quiet_libraries():
        assert bars() == (False, False)
    assert bars() == state


@pytest.mark.parametrize("state", [(True, True), (False, True)])
def test_quiet_libraries_restores_them_when_the_block_raises(state):
    set_bars(*state)
    with pytest.raises(KeyError), quiet_libraries():
        assert bars() == (False, False)
        raise KeyError("inside")
    assert bars() == state


def test_quiet_false_changes_nothing():
    set_bars(True, True)
    with quiet_libraries(False):
        assert bars() == (True, True)
    assert bars() == (True, True)
