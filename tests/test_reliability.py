"""Reliability (issue #8): clear errors at every boundary, nothing lost, reproducible.

1. Every problem a user can fix is a `SelpruneError` whose message names the problem and
   the fix, raised where the input enters (API, `selprune run`, notebook parameters via
   `Series`), and the CLI prints it as one line with exit status 2, before any kernel.
2. Every output write is atomic; a `selprune run` killed at a random moment (SIGKILL of
   everything: the CLI and its kernels) resumes from its last finished step and ends with
   the same results.json as an uninterrupted run; a failing notebook leaves what earlier
   notebooks wrote intact.
3. The same parameters and seed give a byte-identical results.json on the CPU in fp32,
   and results.json records the environment.

The papermill runs (the costly part: a kernel start-up per notebook) are one
uninterrupted run, shared by the resume, reproducibility and failing-notebook tests, one
killed run and its resumption, and a single notebook that fails.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selprune import cli, load_model, load_texts, token_windows
from selprune.errors import SelpruneError
from selprune.loop import Data, PruneConfig, run_pruning
from selprune.notebooks import run_series
from selprune.paths import REPO_ROOT, atomic_write_json
from selprune.series import PARAMS, Series
from selprune.sites import find_sites
from selprune.stats import collect_stats

TINY = {"collect_tokens": 256, "eval_tokens": 256, "window": 64, "steps": 2, "ff_frac": 0.05, "attn_frac": 0.05,
        "retrain_steps": 2, "retrain_batch": 2, "retrain_window": 32, "retrain_eval_tokens": 64, "dtype": "float32",
        "device": "cpu"}
SELPRUNE = Path(sys.executable).parent / "selprune"  # the console script of the environment running the tests


@pytest.fixture(scope="module")
def tiny_dir(shared_tiny_llama_dir) -> Path:
    """A tiny random Llama (d_mlp 64) as a local model directory."""
    return shared_tiny_llama_dir


def series(tmp_path: Path, tiny_dir: Path, **params) -> Series:
    return Series(progress=False, **{**TINY, "model": str(tiny_dir), "run_dir": str(tmp_path / "run"), **params})


def random_data(vocab: int, n: int = 2, window: int = 16) -> Data:
    g = torch.Generator().manual_seed(0)
    win = [torch.randint(3, vocab, (n, window), generator=g) for _ in range(4)]
    return Data(*win, skip={"forget": torch.tensor([3]), "retain": torch.tensor([4])})


LOOP_CFG = dict(model="tiny", forget="f", retain="r", ff_frac=0.1, attn_frac=0.1, steps=1, window=16,
                collect_tokens=32, eval_tokens=32, batch_size=2, skip_k=1)


# ======================================================== 1. errors at the boundary
def test_unknown_model_spec(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"unknown model 'no-such-model': not a shortcut \(.*smollm2-135m.*\).*pass one"):
        load_model("no-such-model", dtype="float32", device="cpu")
    # notebook parameters and `selprune run` fail on it before loading anything
    with pytest.raises(SelpruneError, match=r"unknown model '\./nowhere/model'.*check the spelling, or that the path exists"):
        series(tmp_path, tiny_dir, model="./nowhere/model")
    assert not (tmp_path / "run").exists(), "a refused run must not create its run directory"


def test_architecture_without_neuron_sites(tmp_path, smollm_tokenizer):
    import transformers as T

    mamba = tmp_path / "tiny-mamba"  # no attention, no MLP: nothing selprune can prune
    T.MambaForCausalLM(T.MambaConfig(vocab_size=len(smollm_tokenizer), hidden_size=16, state_size=4,
                                     num_hidden_layers=2, intermediate_size=32)).save_pretrained(mamba)
    smollm_tokenizer.save_pretrained(mamba)
    s = Series(progress=False, **{**TINY, "model": str(mamba), "run_dir": str(tmp_path / "run")})
    with pytest.raises(SelpruneError, match=r"architecture 'mamba' .* no registered neuron sites.*register_architecture"):
        s.sites  # noqa: B018 - the first step of every notebook


def test_dataset_missing(tmp_path, tiny_dir):
    missing = str(tmp_path / "no-such-corpus.jsonl")
    with pytest.raises(SelpruneError, match=r"unknown dataset .*no-such-corpus.jsonl.*no file or folder .*check the path"):
        load_texts(missing, "train")
    with pytest.raises(SelpruneError, match=r"no-such-corpus.jsonl.*check the path"):
        series(tmp_path, tiny_dir, forget=missing)


def test_dataset_empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("")
    with pytest.raises(SelpruneError, match=r"dataset .*empty is empty \(no text in docs.jsonl\); add documents"):
        load_texts(str(folder), "train")


def test_dataset_without_the_text_field(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"body": f"note {i}"}) + "\n" for i in range(20)))
    with pytest.raises(SelpruneError, match=r"has no field 'text' \(it has \['body'\]\); pass text_field="):
        load_texts(str(path), "train")


def test_dataset_too_small_for_the_token_budget(tmp_path, smollm_tokenizer):
    with pytest.raises(SelpruneError, match=r"hold only \d+ tokens .*short of the budget of 4096; lower the token budget"):
        token_windows(["def f(x):\n    return x\n"] * 3, smollm_tokenizer, window=64, max_tokens=4096)


def test_malformed_dataset_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(SelpruneError, match=r"cannot read dataset .*broken.jsonl as json.*fix or remove the malformed file"):
        load_texts(str(path), "train")


def test_forget_equal_to_retain(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"forget and retain are both 'code'; pick two different datasets"):
        series(tmp_path, tiny_dir, forget="code", retain="code")


@pytest.mark.parametrize("frac", [1.5, 1.0, -0.1])
def test_fraction_outside_the_unit_interval(tmp_path, tiny_dir, frac):
    with pytest.raises(SelpruneError, match=rf"ff_frac={frac} is outside \[0, 1\); use e.g. 0.02"):
        series(tmp_path, tiny_dir, ff_frac=frac)


def test_nothing_to_prune(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"no pruning run has a fraction above 0.*set ff_frac or attn_frac above 0"):
        series(tmp_path, tiny_dir, ff_frac=0.0, attn_frac=0.0)


def test_fraction_times_steps_past_all_neurons(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"attn_frac=0.4 x steps=3 prunes more than all neurons; lower either"):
        series(tmp_path, tiny_dir, attn_frac=0.4, steps=3)


def test_steps_below_one(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"steps=0; need at least 1"):
        series(tmp_path, tiny_dir, steps=0)
    # a notebook's parameters cell goes through the same check
    namespace = {k: d for k, (d, _) in PARAMS.items()} | {"steps": -2, "run_dir": str(tmp_path / "nb")}
    with pytest.raises(SelpruneError, match=r"steps=-2; need at least 1"):
        Series.from_globals(namespace)
    assert not (tmp_path / "nb").exists()


def test_unknown_scoring_function_lists_the_valid_ones(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"unknown scoring function 'l3'; valid ones: abs, freq, rand, rms, sqrt, std"):
        series(tmp_path, tiny_dir, scoring="l3")


def test_statistics_from_another_model(tmp_path, tiny_dir, tiny_llama, smollm_tokenizer):
    """Statistics left in a run directory by another model (here d_mlp 48, not 64) are refused."""
    other = tiny_llama(intermediate_size=48)
    windows = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    st = collect_stats(other, find_sites(other), windows, meta={"model": "other-tiny-llama"}, progress=False)
    for side in ("forget", "retain"):
        st.save(tmp_path / "run" / "stats" / f"{side}.safetensors")
    with pytest.raises(SelpruneError, match=r"statistics have ff shape \(2, 48\) but the model has \(2, 64\): they come "
                                            r"from another model \(other-tiny-llama\); collect them again"):
        series(tmp_path, tiny_dir).collect()


def test_corrupt_statistics_file(tmp_path, tiny_dir):
    f = tmp_path / "run" / "stats" / "forget.safetensors"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(SelpruneError, match=r"statistics file .*forget.safetensors is corrupt .*delete it and collect again"):
        series(tmp_path, tiny_dir).collect()


def _finished_run(tmp_path: Path, tiny_llama) -> tuple[PruneConfig, Path]:
    cfg = PruneConfig(**LOOP_CFG)
    model = tiny_llama()
    run_pruning(cfg, tmp_path / "ff", model, None, random_data(model.config.vocab_size), progress=False)
    return cfg, tmp_path / "ff"


@pytest.mark.parametrize("garbage", ["{not json", "null", '[{"step": 0}, {"step": 5}]'])
def test_corrupt_records_file(tmp_path, tiny_llama, tiny_dir, garbage):
    cfg, rd = _finished_run(tmp_path, tiny_llama)
    (rd / "records.json").write_text(garbage)
    model = tiny_llama()
    with pytest.raises(SelpruneError, match=r"run file .*records.json is corrupt .*delete the run directory and start again"):
        run_pruning(cfg, rd, model, None, random_data(model.config.vocab_size), progress=False)
    # what the CLI and notebook 05 read: no bare JSONDecodeError there either
    s = series(tmp_path, tiny_dir)
    (s.run_dir / "ff").mkdir()
    (s.run_dir / "ff" / "records.json").write_text("{not json")
    with pytest.raises(SelpruneError, match=r"run file .*ff/records.json is corrupt"):
        s.results_table()


def test_corrupt_step_file(tmp_path, tiny_llama):
    cfg, rd = _finished_run(tmp_path, tiny_llama)
    (rd / "step_001.safetensors").write_bytes(b"\x00" * 40)
    model = tiny_llama()
    with pytest.raises(SelpruneError, match=r"run file .*step_001.safetensors is missing or corrupt .*delete the run directory"):
        run_pruning(PruneConfig(**{**LOOP_CFG, "steps": 2}), rd, model, None, random_data(model.config.vocab_size),
                    progress=False)


def test_run_directory_made_with_other_parameters(tmp_path, tiny_llama, tiny_dir):
    cfg, rd = _finished_run(tmp_path, tiny_llama)
    model = tiny_llama()
    with pytest.raises(SelpruneError, match=r"was made with other parameters \{'scoring': \('abs', 'rms'\)\} \(was, now\); "
                                            r"use a new run directory"):
        run_pruning(PruneConfig(**{**LOOP_CFG, "scoring": "rms"}), rd, model, None,
                    random_data(model.config.vocab_size), progress=False)
    series(tmp_path, tiny_dir)
    with pytest.raises(SelpruneError, match=r"other parameters \{'seed': \(0, 1\)\}.*use a new run_dir"):
        series(tmp_path, tiny_dir, seed=1)


def test_nan_in_activations_names_the_layer(tiny_llama):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    windows = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SelpruneError, match=r"NaN or inf in the ff activations of layer 1: .*try dtype='float32'"):
        collect_stats(model, find_sites(model), windows, progress=False)


def test_unknown_dtype(tmp_path, tiny_dir):
    with pytest.raises(SelpruneError, match=r"unknown dtype 'float8'; use auto or one of \[.*'float32'.*\]"):
        load_model(str(tiny_dir), dtype="float8", device="cpu")
    with pytest.raises(SelpruneError, match=r"unknown dtype 'fp64'"):
        series(tmp_path, tiny_dir, dtype="fp64")


@pytest.mark.parametrize("device", ["tpu", "cuda:99"])
def test_unknown_device(tmp_path, tiny_dir, device):
    match = {"tpu": r"unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps",
             "cuda:99": r"device 'cuda:99' asked for, but torch sees (no CUDA GPU|only \d+ CUDA GPU).*cpu"}[device]
    with pytest.raises(SelpruneError, match=match):
        load_model(str(tiny_dir), dtype="float32", device=device)
    with pytest.raises(SelpruneError, match=match):
        series(tmp_path, tiny_dir, device=device)


# ------------------------------------------------------------------------------ CLI
@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if papermill is asked to run a notebook."""
    import papermill

    def started(*a, **k):
        raise AssertionError("a kernel was started for parameters that should have been refused")

    monkeypatch.setattr(papermill, "execute_notebook", started)


@pytest.mark.parametrize("param, match", [
    (("steps", "0"), r"steps=0; need at least 1"),
    (("stepz", "3"), r"unknown parameters \['stepz'\]; valid ones: model, "),
    (("model", "./no/such/model"), r"unknown model './no/such/model'"),
    (("forget", "missing.jsonl"), r"unknown dataset 'missing.jsonl'.*check the path"),
    (("scoring", "l3"), r"valid ones: abs, freq, rand, rms, sqrt, std"),
    (("dtype", "int4"), r"unknown dtype 'int4'"),
    (("device", "tpu"), r"unknown device 'tpu'"),
    (("ff_frac", "[0.1"), r"cannot read the value of -p ff_frac"),
])
def test_cli_prints_one_line_and_exits_2_before_any_kernel(tmp_path, tiny_dir, capsys, monkeypatch, no_kernel,
                                                           param, match):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--quiet", "--out", str(tmp_path / "run"), "-p", "model", str(tiny_dir), "-p", *param]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selprune: error: "), err
    assert "Traceback" not in err and out == ""
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "run" / "params.json").exists(), "a refused run must not record its parameters"


def test_local_paths_reach_the_kernels_absolute(tmp_path, tiny_dir, monkeypatch):
    """Kernels run in notebooks/: a dataset or model path relative to where `selprune run`
    was started must still name the same file there."""
    import papermill

    seen = []

    def fake(src, out, parameters, **kw):
        seen.append(parameters)
        Path(out).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    shutil.copytree(tiny_dir, tmp_path / "model")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"text": "print(1)"}) + "\n")
    monkeypatch.chdir(tmp_path)
    run_series({**TINY, "model": "model", "forget": "mine.jsonl", "run_dir": "run"}, progress=False,
               notebooks=("01_collect_activations.ipynb",))
    p = seen[0]
    assert p["model"] == str(tmp_path / "model") and p["forget"] == str(tmp_path / "mine.jsonl")
    assert p["retain"] == "prose" and p["run_dir"] == str(tmp_path / "run")


# ================================================================ 2. nothing lost
# Calls that write files, and the functions allowed to make them because they write a
# temporary file or folder that they then rename into place (or write into memory).
WRITERS = {"write", "write_text", "write_bytes", "save_pretrained", "savefig", "save_file", "to_csv", "to_json",
           "to_parquet", "dump", "execute_notebook"}
ALLOWED = {
    ("paths.py", "atomic_write_bytes", "write"),  # the temporary file itself, then os.replace
    ("models.py", "convert_gguf", "save_pretrained"),  # a temporary folder, then os.replace
    ("prune.py", "export_pruned", "save_pretrained"),  # .NAME.tmp, then rename
    ("notebooks.py", "run_series", "execute_notebook"),  # .tmp-NAME, then replace
    ("notebooks.py", "regenerate", "write"),  # nbformat.write into NAME.tmp, then replace
    ("plots.py", "save_figure", "savefig"),  # a BytesIO, then atomic_write_bytes
}


class _Writes(ast.NodeVisitor):
    """(file, innermost function, call) for every call that may write a file."""

    def __init__(self, file: str) -> None:
        self.file, self.stack, self.found = file, ["<module>"], set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        torch_save = name == "save" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch"
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        writes_open = name == "open" and isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+")
        if name in WRITERS or torch_save or writes_open:
            self.found.add((self.file, self.stack[-1], "open" if writes_open else name))
        self.generic_visit(node)


def test_every_output_write_is_atomic():
    found, sources = set(), {}
    for path in sorted((REPO_ROOT / "selprune").glob("*.py")):
        tree = ast.parse(path.read_text())
        visitor = _Writes(path.name)
        visitor.visit(tree)
        found |= visitor.found
        sources.update({(path.name, f.name): ast.get_source_segment(path.read_text(), f)
                        for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)})
    assert not found - ALLOWED, (f"non-atomic writes {sorted(found - ALLOWED)}: write with "
                                 "selprune.paths.atomic_write_* or into a temporary path renamed into place")
    for file, fn, _ in ALLOWED:
        assert any(k in sources[file, fn] for k in ("os.replace(", ".replace(", ".rename(", "atomic_write_bytes(")), \
            f"{file}:{fn} no longer renames its output into place"


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "results.json"
    atomic_write_json(f, {"v": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, "outputs get the usual permissions, not mkstemp's 0600"

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(f, {"v": 2, "long": "x" * 100_000})
    assert json.loads(f.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file is left behind"


# ---------------------------------------------------------- papermill: kill, resume
RUN = {**TINY, "steps": 3}


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> dict[str, Path]:
    """Small pre-split forget and retain folders cut from the bundled corpora: every
    notebook tokenises a few short documents instead of whole source files and chapters."""
    root = tmp_path_factory.mktemp("sets")
    out = {}
    for name, corpus in (("forget", "code"), ("retain", "prose")):
        (root / name).mkdir()
        for split in ("train", "test"):
            docs = load_texts(corpus, split)["text"][:6]
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps({"text": d[:1500]}) + "\n" for d in docs))
        out[name] = root / name
    return out


def _command(run_dir: Path, model: Path, sets: dict[str, Path]) -> list[str]:
    params = {**RUN, "model": model, "forget": sets["forget"], "retain": sets["retain"]}
    return [str(SELPRUNE), "run", "--quiet", "--out", str(run_dir)] + [x for k, v in params.items() for x in ("-p", k, str(v))]


def _run(cmd: list[str], log: Path) -> None:
    with log.open("w") as err:
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, timeout=900).returncode
    assert rc == 0, f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}"


def _kill_everything(proc: subprocess.Popen) -> None:
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


def _snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dir, small_sets) -> tuple[Path, float]:
    """One uninterrupted `selprune run` (steps 3 on the tiny model): its run directory and
    its wall-clock duration."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    t0 = time.perf_counter()
    _run(_command(run_dir, tiny_dir, small_sets), run_dir.parent / "stderr.txt")
    return run_dir, time.perf_counter() - t0


def test_killed_run_resumes_to_the_same_results(tmp_path, tiny_dir, small_sets, uninterrupted):
    """Kill a run at a random moment (a fixed seed draws 20-80% of an uninterrupted run's
    duration), rerun the same command: it keeps every step finished before the kill, and
    its results.json is byte-identical to the uninterrupted run's, made in another folder
    (so this also checks reproducibility: same parameters and seed, CPU, fp32)."""
    ref_dir, duration = uninterrupted
    run_dir = tmp_path / "run"
    cmd = _command(run_dir, tiny_dir, small_sets)
    delay = random.Random(9).uniform(0.2, 0.8) * duration
    with (tmp_path / "killed.txt").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=delay)
            pytest.fail(f"the run ended within {delay:.0f} s, before the kill (uninterrupted: {duration:.0f} s)")
        except subprocess.TimeoutExpired:
            _kill_everything(proc)
    at_kill = _snapshot(run_dir)
    records_at_kill = {r: json.loads(at_kill[f"{r}/records.json"][1])
                       for r in ("ff", "random", "attn", "attn_heads") if f"{r}/records.json" in at_kill}

    _run(cmd, tmp_path / "resumed.txt")
    after = _snapshot(run_dir)
    where = f"killed after {delay:.0f} s of {duration:.0f} s with {sorted(at_kill)}"
    # resumed, not redone: finished steps, their records and the statistics stay as they were
    for run, records in records_at_kill.items():
        assert json.loads(after[f"{run}/records.json"][1])[: len(records)] == records, where
        for step in range(1, len(records)):
            f = f"{run}/step_{step:03d}.safetensors"
            assert after[f] == at_kill[f], f"{f} was redone; {where}"
    for f in ("stats/forget.safetensors", "stats/retain.safetensors", "base.json", "anamnesia.json"):
        if f in at_kill:
            assert after[f] == at_kill[f], f"{f} was redone; {where}"
    assert after["results.json"][1] == (ref_dir / "results.json").read_bytes(), where

    results = json.loads(after["results.json"][1])
    assert set(results["runs"]) == {"ff", "random", "attn", "attn_heads"} and results["anamnesia"]
    assert all(len(r["records"]) == RUN["steps"] + 1 for r in results["runs"].values())
    assert "seconds" not in after["results.json"][1].decode(), "wall-clock times belong in timings.json"
    assert json.loads(after["timings.json"][1]), "timings.json keeps them"


def test_results_record_the_environment(uninterrupted):
    import transformers

    import selprune

    env = json.loads((uninterrupted[0] / "results.json").read_text())["environment"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["selprune"] == selprune.__version__ and env["python"] == platform.python_version()
    assert env["git_commit"] == commit
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["threads"] >= 1


def test_failing_notebook_leaves_earlier_outputs_intact(tmp_path, tiny_dir, small_sets, uninterrupted):
    """Notebook 03 fails (its run folder cannot be created) in a copy of a finished run:
    everything already written, results.json and the earlier notebooks included, stays
    byte for byte, and the failed notebook is kept apart for inspection."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    shutil.rmtree(run_dir / "ff")
    (run_dir / "ff").write_text("in the way")
    before = _snapshot(run_dir)
    params = {**RUN, "model": str(tiny_dir), "forget": str(small_sets["forget"]), "retain": str(small_sets["retain"]),
              "run_dir": str(run_dir)}
    with pytest.raises(SelpruneError, match=r"notebook 03_prune_ffn.ipynb failed in cell \d+ \(FileExistsError"):
        run_series(params, progress=False, notebooks=("03_prune_ffn.ipynb",))
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "notebooks/FAILED-03_prune_ffn.ipynb"} == before
    assert (run_dir / "notebooks" / "FAILED-03_prune_ffn.ipynb").is_file()
    assert after["results.json"][1] == (uninterrupted[0] / "results.json").read_bytes()
    import nbformat

    for name in ("01_collect_activations.ipynb", "02_score_neurons.ipynb"):
        nbformat.validate(nbformat.read(run_dir / "notebooks" / name, as_version=4))
