"""Running the notebook series: with papermill into a run directory (`selprune run`), or
in place to regenerate the stored outputs that nbval checks (`make notebooks`).

A failing cell stops the series with an error naming the notebook and the cell; the
notebooks and results already written stay as they were (every write is atomic).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nbformat

from selprune.errors import SelpruneError
from selprune.experiment.config import resolve
from selprune.experiment.loop import PROGRESS_ADDR_ENV
from selprune.experiment.rundir import HELD_ENV, RunDir, write_errors
from selprune.models import MODELS
from selprune.paths import REPO_ROOT
from selprune.texts import DATASETS

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = (
    "01_collect_activations.ipynb",
    "02_score_neurons.ipynb",
    "03_prune_ffn.ipynb",
    "04_prune_attention.ipynb",
    "05_evaluate.ipynb",
    "06_retraining_anamnesia.ipynb",
    "07_compare_methods.ipynb",
)
STORED_RUN_DIR = REPO_ROOT / "runs" / "notebooks"  # the stored notebooks' run_dir
STORED_RUN_PARAM = "../runs/notebooks"  # ... as their parameters cell writes it (relative to notebooks/)


def run_series(params: dict[str, Any], progress: bool = True, notebooks: tuple[str, ...] = NOTEBOOKS) -> Path:
    """Execute the series with papermill; returns the run directory.

    Executed notebooks go to `run_dir/notebooks/`, figures to `run_dir/figures/`, and
    `run_dir/results.json` is rewritten after each step. Everything that can be checked
    is checked before the first kernel starts (parameters, a hub model or dataset that
    cannot be reached, the run directory). The run directory is held for the whole
    series (`RunDir.hold`; the kernels are told so through `HELD_ENV`), and with
    `progress`, the kernels' finished pruning steps are shown on stderr, one line each.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from selprune.experiment.kernels import kernel_manager_class

    p = kernel_params(params, relearn="06_retraining_anamnesia.ipynb" in notebooks)  # 06's rules too, if it runs
    check_reachable(p)
    run_dir = Path(p["run_dir"])
    from selprune.experiment.series import Series

    held = os.pathsep.join(filter(None, (os.environ.get(HELD_ENV), str(run_dir))))
    with RunDir(run_dir).hold(), write_errors(run_dir), _step_lines(progress) as lines, \
            _environ({"SELPRUNE_PROGRESS": "1" if progress else "0", HELD_ENV: held, **lines}):
        Series(progress=False, **p)  # validate parameters (and the run directory) before starting a kernel
        out_dir = run_dir / "notebooks"
        out_dir.mkdir(parents=True, exist_ok=True)
        manager = kernel_manager_class()
        for name in notebooks:
            src, tmp = NOTEBOOK_DIR / name, out_dir / f".tmp-{name}"
            if not src.is_file():
                raise SelpruneError(f"notebook {src} is missing; restore it from the repository")
            if progress:
                print(f"selprune: {name}", file=sys.stderr)
            try:
                papermill.execute_notebook(str(src), str(tmp), parameters=p, cwd=str(NOTEBOOK_DIR),
                                           progress_bar=progress, kernel_name="python3", kernel_manager_class=manager)
            except PapermillExecutionError as e:
                raise _failure(e, name, tmp, run_dir) from e
            tmp.replace(out_dir / name)
    return run_dir


def _failure(e: Any, name: str, tmp: Path, run_dir: Path) -> SelpruneError:
    """The error of a failed notebook, which is kept as notebooks/FAILED-NAME."""
    failed = tmp.with_name(f"FAILED-{name}")
    tmp.replace(failed) if tmp.exists() else None
    fix = ""
    m = re.search(r"\[Errno (\d+)\]", e.evalue or "")
    if m is not None and int(m[1]) in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = (f"it could not write in {run_dir}: free disk space (or raise the file-size limit, ulimit -f) and run "
               "the same command again, finished work is kept; ")
    return SelpruneError(f"notebook {name} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); {fix}"
                         f"the executed notebook is {failed}")


def check_reachable(p: dict[str, Any]) -> None:
    """Refuse, before any kernel starts, a hub model (not in the local Hugging Face cache)
    or a hub dataset when the hub cannot be reached: notebook 01 would fail only after its
    kernel started and imported everything."""
    from huggingface_hub import try_to_load_from_cache

    from selprune.models import hub_reachable, model_spec_kind

    if model_spec_kind(p["model"]) == "hub" and not isinstance(try_to_load_from_cache(p["model"], "config.json"), str) \
            and not hub_reachable():
        raise SelpruneError(
            f"model {p['model']!r} is a Hugging Face hub id, it is not in the local cache, and the hub cannot be "
            "reached (no network). Download it where there is a network (`huggingface-cli download "
            f"{p['model']} --local-dir DIR`) and pass the local directory DIR instead, or use the embedded default "
            "'smollm2-135m'."
        )
    for side in ("forget", "retain"):
        spec = p[side]
        on_hub = spec.startswith("hub:") or (spec in DATASETS and DATASETS[spec].kind == "hub")
        if on_hub and not hub_reachable():
            raise SelpruneError(f"{side} dataset {spec!r} is on the Hugging Face hub, which cannot be reached (no "
                                "network). Use a bundled set (prose, code) or a local .txt/.jsonl/.parquet file or "
                                "folder instead.")


@contextlib.contextmanager
def _step_lines(progress: bool) -> Iterator[dict[str, str]]:
    """With `progress`: a loopback UDP socket to which the kernels send a line per
    finished pruning step (`loop.PROGRESS_ADDR_ENV`), relayed to this process's stderr as
    they come, so a long pruning cell shows its steps without any of it entering the
    notebooks (and without a file to write)."""
    if not progress:
        yield {}
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        stop = threading.Event()
        relay = threading.Thread(target=_relay, args=(sock, stop), daemon=True)
        relay.start()
        try:
            yield {PROGRESS_ADDR_ENV: "{}:{}".format(*sock.getsockname())}
        finally:
            stop.set()
            relay.join()


def _relay(sock: socket.socket, stop: threading.Event) -> None:
    """Print each line received on `sock` to stderr (above any progress bar) until `stop`,
    then the ones still queued."""
    from tqdm import tqdm

    while True:
        last = stop.is_set()  # once stopped, take what is queued without waiting
        sock.settimeout(0 if last else 0.2)
        try:
            line = sock.recv(65536).decode(errors="replace").rstrip("\n")
        except (BlockingIOError, TimeoutError):
            if last:
                return
            continue
        with tqdm.external_write_mode(file=sys.stderr):
            print(line, file=sys.stderr, flush=True)


def kernel_params(params: dict[str, Any], relearn: bool = False) -> dict[str, Any]:
    """The parameters as the kernels get them (and params.json records them): resolved
    (`relearn`: with the retraining rules), with `run_dir` and local model/dataset paths
    made absolute, since kernels run in notebooks/ where relative paths would miss."""
    p = asdict(resolve(params, relearn=relearn))
    p["run_dir"] = str(Path(p["run_dir"]).resolve())
    for name, registry in (("model", MODELS), ("forget", DATASETS), ("retain", DATASETS)):
        local = Path(p[name]).expanduser()
        if p[name] not in registry and local.exists():
            p[name] = str(local.resolve())
    return p


class _environ:
    """Set environment variables for the kernels started inside the block."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.old = values, {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Strip what changes from run to run and is not content: execution timings,
    papermill's metadata, widget state. Keeps outputs and execution counts."""
    for key in ("papermill", "widgets"):
        nb.metadata.pop(key, None)
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        for key in ("execution", "papermill", "collapsed", "scrolled"):
            cell.metadata.pop(key, None)
    return nb


def regenerate(notebooks: tuple[str, ...] = NOTEBOOKS, timeout: int = 1800) -> None:
    """Re-execute the stored notebooks in place at their default parameters, from a fresh
    run directory, and store their cleaned outputs (what nbval compares against)."""
    from nbclient import NotebookClient

    from selprune.experiment.kernels import kernel_manager_class
    from selprune.experiment.render import write_parameter_cells, write_readme_table

    write_readme_table(REPO_ROOT / "README.md")
    write_parameter_cells(NOTEBOOK_DIR, STORED_RUN_PARAM)  # the cells the schema defines, before executing them
    shutil.rmtree(STORED_RUN_DIR, ignore_errors=True)
    with _environ({"SELPRUNE_PROGRESS": "0"}):
        for name in notebooks:
            path = NOTEBOOK_DIR / name
            print(f"selprune: regenerating {name}", file=sys.stderr)
            t0 = time.perf_counter()
            nb = nbformat.read(path, as_version=4)
            NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                           kernel_manager_class=kernel_manager_class(),  # IPC sockets, as run_series
                           resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
            print(f"selprune: {name} ran in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            tmp = path.with_suffix(".tmp")
            nbformat.write(clean(nb), tmp)
            tmp.replace(path)
    if tuple(notebooks) == NOTEBOOKS:  # the whole series ran: its figures become the stored key figures
        from selprune.experiment.key_metrics import KEY_METRICS_FILE, record

        record(STORED_RUN_DIR / "results.json")
        print(f"selprune: key figures in {KEY_METRICS_FILE}", file=sys.stderr)


if __name__ == "__main__":
    regenerate()
