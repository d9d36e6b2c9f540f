"""HumanEval: the opt-in, the sandbox (timeout, memory, directory, environment, network),
the shipped problems, and pass@1 end to end with fake models whose answers are known."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import random_windows  # noqa: F401 - also sets torch to one thread (see tiny_models)
from torch import nn

from selprune import humaneval
from selprune.errors import SelpruneError
from selprune.humaneval import completion_of, load_problems, pass_at_1, program_of, run_program


def run(program: str, **kw) -> humaneval.Execution:
    return run_program(program, allow_execution=True, **kw)


def test_execution_is_refused_without_opt_in() -> None:
    with pytest.raises(SelpruneError, match="allow_execution=True"):
        run_program("print(1)")
    with pytest.raises(SelpruneError, match="humaneval_execute=true"):
        pass_at_1(None, None)  # refused before anything is generated


def test_refused_without_network_isolation_unless_accepted(monkeypatch) -> None:
    monkeypatch.setattr(humaneval, "network_isolation", lambda: None)
    with pytest.raises(SelpruneError, match="allow_network=True"):
        run("print(1)")
    assert run("print(1)", allow_network=True).status == "passed"


def test_problems_ship_complete() -> None:
    problems = load_problems()
    assert len(problems) == 164 and len({p["task_id"] for p in problems}) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and load_problems(3) == problems[:3]
    assert {"prompt", "test", "entry_point", "canonical_solution"} <= set(problems[0])


def test_correct_completion_passes_and_wrong_one_fails() -> None:
    problem = load_problems(1)[0]
    assert run(program_of(problem, problem["canonical_solution"])).status == "passed"
    assert run(program_of(problem, "    return False\n")).status == "failed"


def test_infinite_loop_is_killed_by_the_timeout() -> None:
    r = run("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and r.seconds < 10


def test_sleeping_child_process_is_killed_with_its_group() -> None:
    r = run("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])\n",
            timeout=1.0)
    assert r.status == "timeout" and r.seconds < 10


def test_memory_bomb_is_stopped_by_the_limit() -> None:
    r = run("x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n", memory_mb=256, timeout=20.0)
    assert r.status == "failed" and "MemoryError" in r.stderr and r.seconds < 20


def test_working_directory_is_a_removed_temp_dir_and_environment_minimal() -> None:
    r = run("import os\nopen('marker', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.environ))\n")
    cwd, env = r.stdout.strip().splitlines()
    assert r.status == "passed" and cwd == r.workdir
    assert Path(cwd).parent == Path(tempfile.gettempdir()).resolve() and not Path(cwd).exists()
    assert set(eval(env)) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}  # noqa: S307 - our own output


@pytest.mark.skipif(humaneval.network_isolation() is None, reason="no unshare -rn on this system")
def test_programs_cannot_reach_the_network() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # reachable from this process, not from the sandbox
        port = server.getsockname()[1]
        r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n")
    assert r.status == "failed" and "OSError" in r.stderr


def test_completion_stops_at_the_usual_sequences() -> None:
    assert completion_of("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert completion_of("    return 1\nprint(f(2))") == "    return 1"
    assert completion_of("    return 1\n") == "    return 1\n"


class Solver(nn.Module):
    """A fake model that answers each known prompt with `answer(problem)` (then EOS)."""

    def __init__(self, tokenizer, answer) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.by_prompt = {p["prompt"]: answer(p) for p in load_problems(5)}

    def generate(self, input_ids, attention_mask, generation_config, **kwargs) -> torch.Tensor:
        tok, rows = self.tokenizer, []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            text = self.by_prompt[tok.decode(ids[mask.bool()])]
            rows.append(ids.tolist() + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])


def test_pass_at_1_end_to_end(smollm_tokenizer) -> None:
    right = Solver(smollm_tokenizer, lambda p: p["canonical_solution"] + "\n\ndef unrelated():\n    1/0\n")
    r = pass_at_1(right, smollm_tokenizer, allow_execution=True, limit=5, batch_size=2)
    assert r["pass_at_1"] == 1.0 and r["n"] == 5 and r["failures"] == []
    wrong = Solver(smollm_tokenizer, lambda p: "    return None\n")
    r = pass_at_1(wrong, smollm_tokenizer, allow_execution=True, limit=5, batch_size=2)
    assert r["pass_at_1"] == 0.0 and set(r["status"].values()) == {"failed"} and len(r["failures"]) == 2
