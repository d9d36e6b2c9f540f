"""Fixtures shared by the experiment tests that need a whole small `selprune run`
(one per module that asks: tests/experiment/series_runs.py holds the run itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import series_runs


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> dict[str, Path]:
    return series_runs.small_sets(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_tiny_llama_dir) -> tuple[Path, float]:
    return series_runs.uninterrupted(tmp_path_factory, shared_tiny_llama_dir)
