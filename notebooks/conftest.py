"""nbval runs the stored notebooks as regression tests (`pytest --nbval-lax notebooks`).

They share one run directory (`runs/notebooks`, the stored `run_dir`), and a run
directory that already holds results would be resumed rather than recomputed, so the
session starts from an empty one: nbval then re-executes every step for real.
"""

import os
import shutil
from pathlib import Path

RUN_DIR = Path(__file__).resolve().parent.parent / "runs" / "notebooks"


def pytest_sessionstart(session) -> None:
    if session.config.getoption("nbval_lax", default=False) or session.config.getoption("nbval", default=False):
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        os.environ["SELPRUNE_PROGRESS"] = "0"  # kernels inherit it: no progress bars in outputs
