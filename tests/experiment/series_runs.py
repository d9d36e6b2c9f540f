"""One uninterrupted `selprune run` of the whole series on the tiny model, shared by the
tests that need a finished run directory made by the real command (kernels included):
the killed-run resumption (test_prune_command), the environment record (test_results)
and the failing notebook (test_notebooks).

pytest runs a session fixture once per test module that defines or imports it, so the
run is cached here, in this module, once per test session: each module's thin fixture
calls `uninterrupted`, and only the first call pays for the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "attn_frac": 0.05,
        "retrain_steps": 2, "retrain_batch": 2, "retrain_window": 32, "retrain_eval_tokens": 64, "dtype": "float32",
        "device": "cpu"}
RUN = {**TINY, "steps": 3, "runs": "ff,random,attn,attn_heads,both,ga", "unlearn_steps": 4, "unlearn_checkpoints": 2,
       "unlearn_lr": 1e-3}  # one baseline: notebook 07 resumes and reproduces too
PRUNING_RUNS = ("ff", "random", "attn", "attn_heads", "both")
SELPRUNE = Path(sys.executable).parent / "selprune"  # the console script of the environment running the tests

_CACHE: dict[str, object] = {}


def small_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small pre-split forget and retain folders cut from the bundled corpora: every
    notebook tokenises a few short documents instead of whole source files and chapters."""
    if "sets" not in _CACHE:
        from selprune import load_texts

        root = tmp_path_factory.mktemp("sets")
        out = {}
        for name, corpus in (("forget", "code"), ("retain", "prose")):
            (root / name).mkdir()
            for split in ("train", "test"):
                docs = load_texts(corpus, split)["text"][:6]
                (root / name / f"{split}.jsonl").write_text("".join(json.dumps({"text": d[:1500]}) + "\n"
                                                                    for d in docs))
            out[name] = root / name
        _CACHE["sets"] = out
    return _CACHE["sets"]  # type: ignore[return-value]


def command(run_dir: Path, model: Path, sets: dict[str, Path]) -> list[str]:
    params = {**RUN, "model": model, "forget": sets["forget"], "retain": sets["retain"]}
    return [str(SELPRUNE), "run", "--quiet", "--out", str(run_dir)] + [x for k, v in params.items()
                                                                      for x in ("-p", k, str(v))]


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as err:
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, timeout=900).returncode
    assert rc == 0, f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}"


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI's process group and its kernels (jupyter starts each kernel in a
    session of its own, so killing the group alone would leave them running a while)."""
    import psutil

    os.killpg(proc.pid, signal.SIGSTOP)  # frozen, the CLI can start no new kernel
    kernels = psutil.Process(proc.pid).children(recursive=True)
    for k in kernels:
        try:
            os.killpg(os.getpgid(k.pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(kernels, timeout=30)
    assert not alive, f"kernels still running after SIGKILL: {alive}"


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Relative path -> (mtime in ns, bytes) of every file under `run_dir`."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in run_dir.rglob("*") if p.is_file()}


def uninterrupted(tmp_path_factory: pytest.TempPathFactory, model: Path) -> tuple[Path, float]:
    """One uninterrupted `selprune run` (steps 3 on the tiny model `model`): its run
    directory and its wall-clock duration. Made once per session and model."""
    key = f"run:{model}"
    if key not in _CACHE:
        run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
        t0 = time.perf_counter()
        run(command(run_dir, model, small_sets(tmp_path_factory)), run_dir.parent / "stderr.txt")
        _CACHE[key] = (run_dir, time.perf_counter() - t0)
    return _CACHE[key]  # type: ignore[return-value]
