"""Orchestration: the parameter schema, run directories, the pruning loop, the relearning
experiment, the notebook series, sweeps, the leaderboard and the command line.

It builds on the method modules at the top of `selprune` and is never imported by them
(tests/test_layers.py checks the direction). Importing it changes no global state.
"""

from selprune.experiment.config import Config, resolve
from selprune.experiment.series import Series

__all__ = ["Config", "Series", "resolve"]
