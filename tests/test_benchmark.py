"""benchmarks/bench.py runs end to end on a tiny budget and prints one well-formed JSON object.

Not a timed test: it checks the keys and that the measurements are positive numbers, never
the throughput ratios (those need a quiet machine and a real budget).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import small_datasets

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu.py"
TINY = ["--tokens", "256", "--window", "64", "--batch-size", "2", "--repeats", "1", "--threads", "1",
        "--dtype", "float32"]


def _run(args: list[str], real_cache: Path, timeout: float = 900, script: Path = BENCH) -> subprocess.CompletedProcess:
    """`script` (bench.py, or gpu.py) with `args`, offline, on the real selprune cache."""
    env = {**os.environ, "SELPRUNE_CACHE": str(real_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_tiny_benchmark_prints_well_formed_json(tmp_path, real_cache, shared_tiny_llama_dir) -> None:
    """On a tiny Llama with the embedded tokenizer (the embedded model itself loads in the
    --step-memory test below): every section's keys, on the bundled data."""
    out = tmp_path / "bench.json"
    proc = _run([*TINY, "--model", str(shared_tiny_llama_dir), "--out", str(out), "--eval-memory-config", "gemma3-tiny"],
                real_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)  # stdout holds exactly one JSON object (progress goes to stderr)
    assert json.loads(out.read_text()) == result

    assert {"config", "collection", "evaluation", "pruning_step", "scaling", "memory", "total_seconds"} <= set(result)
    cfg = result["config"]
    assert cfg["dtype"] == "float32" and cfg["threads"] == 1 and cfg["tokens"] == 256
    assert (cfg["window"], cfg["batch_size"], cfg["repeats"]) == (64, 2, 1)
    assert (cfg["forget"], cfg["retain"]) == ("code", "prose")
    assert isinstance(cfg["torch"], str) and cfg["torch"]

    for section, other in (("collection", "hooked"), ("evaluation", "evaluate")):
        r = result[section]
        assert r["tokens"] == 256
        for key in ("bare_tokens_per_s", f"{other}_tokens_per_s", "ratio", "ratio_cpu"):
            assert _positive(r[key]), (section, key, r[key])
        for key in ("bare_seconds", f"{other}_seconds", "bare_cpu_seconds", f"{other}_cpu_seconds"):
            assert len(r[key]) == 1 and all(_positive(t) for t in r[key]), (section, key)
    assert _positive(result["collection"]["full_tokens_per_s"]) and _positive(result["collection"]["ratio_full"])
    assert len(result["collection"]["full_seconds"]) == 1
    for key in ("bare_extra_mb", "evaluate_extra_mb"):  # differences: may be <= 0
        assert isinstance(result["evaluation"][key], int | float) and math.isfinite(result["evaluation"][key])

    em = result["eval_memory"]  # --eval-memory-config: a random-init Gemma 3, one batch
    assert (em["config"], em["vocab_size"], em["windows"], em["window"], em["tokens"]) == ("gemma3-tiny", 4096, 2, 64, 128)
    for key in ("bare_tokens_per_s", "evaluate_tokens_per_s", "body_tokens_per_s", "ratio", "body_over_full"):
        assert _positive(em[key]), (key, em[key])
    for key in ("bare_extra_mb", "evaluate_extra_mb"):
        assert isinstance(em[key], int | float) and math.isfinite(em[key])
    phases = em["evaluate_phases"]  # one evaluate call, by phase: the body, the LM-head calls, the reduce
    for key in ("total_s", "body_s", "head_s", "reduce_s"):
        assert _positive(phases[key]), (key, phases[key])
    assert phases["body_s"] + phases["head_s"] + phases["reduce_s"] <= 1.001 * phases["total_s"]
    assert math.isfinite(phases["after_body_extra_mb"]) and math.isfinite(phases["peak_extra_mb"])

    assert "batch_search" not in result and "batch_search" not in em  # only with --max-batch (the GPU check's test)
    step = result["pruning_step"]
    for phase in ("collect", "score", "prune", "eval", "total", "eval_unpruned"):
        assert _positive(step[phase]), (phase, step[phase])
    assert step["total"] >= 0.999 * (step["collect"] + step["eval"])  # the sum of the phases (rounded)
    assert _positive(step["peak_rss_mb"]) and _positive(step["peak_anon_mb"]) and step["peak_rss_mb"] >= step["peak_anon_mb"]
    # the same step in a fresh child process (--step-memory at this run's settings), beside the reference's figure
    assert step["fresh_process_peak_rss_mb"] >= step["fresh_process_peak_anon_mb"] > 0
    assert _positive(step["reference_peak_rss_mb"])

    train = result["training"]  # optimizer steps: the relearning loop and gradient ascent against a bare step
    assert (train["steps"], train["batch"], train["window_retrain"], train["window_ga"]) == (4, 2, 64, 64)
    for key in ("bare_tokens_per_s", "retrain_tokens_per_s", "bare_ga_tokens_per_s", "ga_tokens_per_s",
                "ratio_retrain", "ratio_ga"):
        assert _positive(train[key]), (key, train[key])
    assert all(len(train["seconds"][k]) == 1 for k in ("bare", "retrain", "bare_ga", "ga"))

    scaling = result["scaling"]
    assert scaling["tokens"] == [256, 512, 1024]
    assert len(scaling["seconds"]) == 3 and all(_positive(t) for t in scaling["seconds"])
    assert scaling["ratio_to_1x"][0] == 1.0 and all(_positive(r) for r in scaling["ratio_to_1x"])

    mem = result["memory"]
    for key in ("rss_start_mb", "rss_after_load_mb", "rss_after_warmup_mb", "collect_peak_rss_1x_mb",
                "collect_peak_rss_4x_mb", "anon_after_load_mb", "anon_after_warmup_mb", "collect_peak_anon_1x_mb",
                "collect_peak_anon_4x_mb", "ru_maxrss_mb"):
        assert _positive(mem[key]), (key, mem[key])
    for key in ("collect_extra_1x_mb", "collect_extra_2x_mb", "collect_extra_4x_mb"):  # differences: may be <= 0
        assert isinstance(mem[key], int | float) and math.isfinite(mem[key])
    assert _positive(result["total_seconds"])


def _bench_module():
    spec = importlib.util.spec_from_file_location("selprune_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("limit, start, cap", [(37, 8, 1000), (1000, 8, 100), (5, 8, 64), (0, 8, 64), (300, 1, 4096)])
def test_largest_batch_finds_the_limit_within_an_eighth(limit: int, start: int, cap: int) -> None:
    """A stand-in that runs out of memory above `limit` windows, as CUDA does (torch.OutOfMemoryError)."""
    bench = _bench_module()
    seen: list[int] = []

    def fn(batch: int) -> None:
        seen.append(batch)
        if batch > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {batch}")

    found = bench.largest_batch(fn, start, cap, torch.device("cpu"))
    best = min(limit, cap)
    assert found["probes"] == seen and found["probes_ran"] == [b <= limit for b in seen]
    assert best - best // 8 <= found["batch"] <= best and (found["batch"] == 0 or found["batch"] in seen)
    if limit >= cap:
        assert found["batch"] == cap and found["first_oom_batch"] is None
    else:
        assert found["first_oom_batch"] > limit
    assert len(seen) <= 2 * cap.bit_length()  # a handful of probes, not a scan


@pytest.mark.parametrize("error", [ValueError("a bug, not a full GPU"), RuntimeError("a bug: shapes do not match")])
def test_other_errors_are_not_taken_for_a_full_memory(error: Exception) -> None:
    def fn(batch: int) -> None:
        raise error

    with pytest.raises(type(error), match="a bug"):
        _bench_module().largest_batch(fn, 8, 64, torch.device("cpu"))


def test_a_library_out_of_memory_error_counts_as_full() -> None:
    """cuBLAS and cuDNN report a full GPU as a RuntimeError in their own words."""
    def fn(batch: int) -> None:
        if batch > 20:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    found = _bench_module().largest_batch(fn, 8, 64, torch.device("cpu"))
    assert 18 <= found["batch"] <= 20 and found["first_oom_batch"] > 20


@pytest.mark.parametrize("flag", ["--max-batch", "--batch-size", "--repeats", "--threads", "--window"])
def test_a_size_below_one_is_refused(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _bench_module().parse_args([flag, "0"])
    assert exit_.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_budget_below_one_window_is_refused(real_cache) -> None:
    proc = _run(["--tokens", "32", "--window", "64"], real_cache, timeout=300)
    assert proc.returncode == 2 and "below one window" in proc.stderr
    assert proc.stdout == ""


def test_step_memory_mode_prints_one_steps_peak(real_cache) -> None:
    proc = _run([*TINY, "--step-memory"], real_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["tokens_per_dataset"] == 256 and result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0
    assert _positive(result["peak_anon_mb"]) and _positive(result["ru_maxrss_mb"])
    assert set(result["seconds"]) == {"collect", "score", "prune", "eval"}


@pytest.fixture
def pack_source(tmp_path, tiny_llama, smollm_tokenizer) -> Path:
    """What `gpu.py pack` writes for the model, a config and a tokenizer: here a tiny Llama's."""
    source = tmp_path / "source"
    tiny_llama().config.save_pretrained(source)
    smollm_tokenizer.save_pretrained(source)
    return source


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path, pack_source, real_cache) -> None:
    """benchmarks/gpu.py run --quick on CPU: every part of the script a lent GPU machine runs
    (bench.py at both dtypes with the batch search, one prune process against two), on a tiny
    Llama's architecture, with none of its parts failing."""
    data = small_datasets(tmp_path / "data")
    out = tmp_path / "gpu.json"
    proc = _run(["run", "--quick", "--device", "cpu", "--source", str(pack_source), "--forget", str(data / "code"),
                 "--retain", str(data / "prose"), "--out", str(out)], real_cache, script=GPU_CHECK)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result and result["quick"] is True
    assert result["machine"]["torch"] and "gpu" not in result["machine"]  # no GPU here
    for dtype in ("float32", "bfloat16"):
        bench = result["bench"][dtype]
        assert "error" not in bench, bench
        assert bench["config"]["dtype"] == dtype and bench["config"]["device"] == "cpu"
        assert _positive(bench["collection"]["ratio"])
        assert "bare_extra_gpu_mb" not in bench["evaluation"]  # CUDA only
        searches = [bench["batch_search"]] + ([bench["eval_memory"]["batch_search"]] if dtype == "float32" else [])
        for search in searches:  # --max-batch 3: on CPU the cap always fits
            for name in ("bare", "body", "collect", "evaluate"):
                found = search[name]
                assert (found["batch"], found["first_oom_batch"], found["probes"]) == (3, None, [2, 3]), (name, found)
                assert _positive(found["tokens_per_s"]) and found["peak_extra_gpu_mb"] is None  # no GPU here
            for pair, other in (("at_bare_batch", "evaluate"), ("collect_at_body_batch", "collect")):
                assert search[pair]["batch"] == 3 and _positive(search[pair]["ratio"]), pair
                assert _positive(search[pair][f"{other}_tokens_per_s"]), pair
    assert result["bench"]["float32"]["eval_memory"]["config"] == "gemma3-tiny"
    ranks = result["processes"]
    assert "error" not in ranks, ranks
    assert ranks["nproc"] == 2 and ranks["step_files"] == ["step_001.safetensors", "step_002.safetensors"]
    assert ranks["masks_equal"] is True and ranks["metrics_max_abs_diff"] <= 1e-9
    assert _positive(ranks["single_seconds"]) and _positive(ranks["ranks_seconds"])


def test_gpu_check_past_its_deadline_skips_the_rest_and_still_writes(tmp_path, pack_source, real_cache) -> None:
    out = tmp_path / "gpu.json"
    proc = _run(["run", "--quick", "--device", "cpu", "--source", str(pack_source), "--deadline-s", "0",
                 "--out", str(out)], real_cache, timeout=300, script=GPU_CHECK)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout) and result["deadline_s"] == 0
    assert set(result["bench"]) == {"float32", "bfloat16"}
    assert all("skipped" in part for part in (*result["bench"].values(), result["processes"]))


def test_gpu_check_without_a_pack_names_the_fix(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "run", "--source", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "gpu.py pack" in proc.stderr and proc.stdout == ""
