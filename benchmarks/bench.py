"""Throughput and memory of selprune's hot paths, measured in one run (issue #7).

Usage::

    .venv/bin/python benchmarks/bench.py [--tokens N] [--window W] [--batch-size B]
        [--dtype D] [--device DEV] [--repeats R] [--threads T] [--out FILE]
        [--eval-memory-config gemma3-270m] [--max-batch N] [--step-memory]

Runs the embedded model (`smollm2-135m`) on the bundled data (forget = `code`,
retain = `prose`), never touching the network, and prints ONE JSON object to stdout
(progress goes to stderr); `--out FILE` also writes it to FILE. It measures:

- `collection`: tokens/s of `collect_stats` (every FF and attention hook installed)
  against the plain forward of the same module it runs, the transformer body
  (`getattr(model, model.base_model_prefix)`), over the same batches. Runs alternate
  bare, hooked, bare, hooked, ... `--repeats` times each; medians are reported, and
  `ratio` = hooked / bare throughput (1.0: the statistics cost nothing); `ratio_cpu` is
  the same from process CPU time, which other processes disturb less than wall-clock.
  The full forward with logits runs over the same batches too (`full_tokens_per_s`), and
  `ratio_full` = hooked / full-forward throughput: what collecting saves by skipping the head.
- `evaluation`: tokens/s of `selprune.evaluate.evaluate` against the plain full-model
  forward with logits (`model(input_ids=...)`) over the same batches, interleaved the
  same way; `ratio` = evaluate / bare throughput. `*_extra_mb`: the peak anonymous RSS of
  one bare forward batch and of one evaluate call over it, minus that before.
- `pruning_step`: seconds of one full pruning step by phase (collect both datasets,
  score, prune, evaluate both), from one step of the pruning run `both` (FF and attention
  neurons, `ff_frac` = `attn_frac` = 0.02; `selprune.experiment.loop.run_pruning`) in a
  temporary directory; the model is restored afterwards. `peak_rss_mb` (and `peak_anon_mb`):
  the process's peak RSS sampled during the step, `peak_over_load_mb` that minus the RSS after load.
  On the CPU the same step also runs in a fresh child process (`--step-memory` with this run's
  settings): `fresh_process_peak_rss_mb` and `fresh_process_peak_anon_mb`, the peak without
  what this run's other phases left on the heap, beside `reference_peak_rss_mb`, the reference
  library's figure that issue #19 quotes (1.39 GB; a constant to compare with, not measured here).
- `scaling`: `collect_stats` time at 1x, 2x and 4x the token budget on the forget
  set, and each time's ratio to 1x (expected ~2 and ~4: linear in tokens).
- `memory`: resident set size (RSS) at start, right after the model loads, and after
  the data are loaded and warm-up passes have run, and the peak RSS sampled (every 2 ms,
  in a background thread) during the 1x and 4x collections (`*_over_load_*`: that peak
  minus the RSS after load). The weights are memory-mapped files: they become resident
  on first use (so `*_over_load_*` includes them) and the kernel may drop and fault them
  in again, so the same is given for the anonymous part of the RSS (`anon_*`, file pages
  left out): the memory the process allocated. `collect_extra_{1,2,4}x_mb` is the peak
  anonymous RSS of the collection at that budget minus that after the warm-up; it should
  not grow with the budget (`extra_ratio_4x_1x` ~1 or below): the statistics are
  O(neurons), the activations O(batch), never O(tokens). The C allocator adds noise of up
  to a few hundred MB (heap it keeps or returns late, in any one of the runs): compare
  the three, and trust a trend, not one number. Sampling can miss allocations that live
  under 2 ms; `ru_maxrss_mb` is the process's all-time peak RSS.
- `eval_memory` (only with `--eval-memory-config NAME`): on a random-init model of
  released dimensions (`gemma3-270m`: Gemma-3-270M's, 262k vocabulary; `gemma3-tiny` checks
  that it runs), one batch of `--batch-size` random windows of `--window` tokens: the peak
  anonymous RSS that a bare forward with logits adds over the loaded model, that which
  `evaluate` adds, and `evaluate_over_bare` (issue #19: at most 0.25); then interleaved
  throughput of the bare full forward, of `evaluate` (`ratio` = evaluate / bare, target
  >= 0.95) and of the body alone (`body_over_full`); `evaluate_phases`: one more evaluate
  call split into the body, the LM-head matmuls and the per-chunk reduce (seconds), with the
  anonymous RSS it adds when the body is done (`after_body_extra_mb`) and at its peak.
- `batch_search` (only with `--max-batch N`; also inside `eval_memory`): for the bare full
  forward, `collect_stats` and `evaluate`, the largest batch of random windows, up to N, that
  fits in the device's memory (doubling from `--batch-size`, then bisecting to within an
  eighth), with one timed call there (`tokens_per_s`) and the GPU memory it adds at its
  peak (`peak_extra_gpu_mb`); `at_bare_batch`: evaluate against the bare forward, interleaved,
  at the largest batch both fit. On CPU nothing signals running out of memory (the kernel
  kills the process), so there N must fit.
- On CUDA, `evaluation` and `eval_memory` also give `bare_extra_gpu_mb`, `evaluate_extra_gpu_mb`
  and `evaluate_over_bare_gpu`: the GPU memory each allocates over the batch, from torch's
  allocator peaks. `benchmarks/gpu.py` runs all of this on a lent GPU in one call.

- `--step-memory` alone: one pruning step (run `both`) in a process that has done nothing
  else, its peak RSS as a whole process's (the reference library's 1.39 GB was measured so).

`--tokens` is the 1x budget per dataset (collection and evaluation), `--window` the
tokens per window, `--batch-size` windows per forward pass, `--dtype` the model's dtype
(`auto`, `float32`, `bfloat16`, `float16`), `--threads` torch's intra-op threads
(default: torch's own choice). Timings are wall-clock and need a quiet machine; a
run with the defaults takes a few minutes on 2 CPU cores. A tiny budget (e.g.
`--tokens 256 --window 64 --batch-size 2 --repeats 1`) checks that it runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the model and data are local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from selprune.data import Data  # noqa: E402
from selprune.evaluate import evaluate  # noqa: E402
from selprune.experiment.baselines import release_free_heap, unlearn  # noqa: E402
from selprune.experiment.config import Config, validate  # noqa: E402
from selprune.experiment.loop import data_for, run_pruning  # noqa: E402
from selprune.experiment.retrain import restored, retrain  # noqa: E402
from selprune.experiment.sweep import one_line  # noqa: E402
from selprune.models import _cpu_name, load_model  # noqa: E402
from selprune.sites import find_sites  # noqa: E402
from selprune.stats import collect_stats  # noqa: E402
from selprune.texts import load_texts, token_windows, top_tokens  # noqa: E402

MB = 1024 * 1024
# The reference library's whole-process peak over one 2% step of the default on the same windows,
# as issue #19 quotes it ("1.39 GB", unit unstated; read as this script's MB, which are MiB): what
# `pruning_step` compares with. Quoted, not measured by this script.
REFERENCE_STEP_PEAK_MB = 1390.0
# Gemma 3 text configs for --eval-memory-config: released dimensions, random weights (no download)
EVAL_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma3-270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768,
                        sliding_window=512, query_pre_attn_scalar=256),
    "gemma3-tiny": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=4096, max_position_embeddings=512,
                        sliding_window=64, query_pre_attn_scalar=16),
}


# --------------------------------------------------------------------------- memory
def memory() -> tuple[int, int, str]:
    """(resident set size, its anonymous part, how they were read), in bytes.

    The anonymous part leaves out file-backed pages, chiefly the memory-mapped weights,
    which become resident on first use and which the kernel may reclaim and fault in
    again: it is the memory the process itself allocated (activations, buffers, sums)."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page, "/proc/self/statm"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0), "psutil"
    except ImportError:  # last resort: the all-time peak (monotonic)
        peak = _ru_maxrss()
        return peak, peak, "ru_maxrss"


def _ru_maxrss() -> int:
    """The process's all-time peak RSS in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """Peak RSS and peak anonymous RSS over a `with` block, sampled every `interval`
    seconds in a background thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss, anon, _ = memory()
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call, with the device drained before and after."""
    gc.collect()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                device: torch.device) -> dict[str, list[tuple[float, float]]]:
    """Time each function `repeats` times, alternating between them (a, b, a, b, ...)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def throughput(times: dict[str, list[tuple[float, float]]], tokens: int, bare: str, other: str) -> dict[str, Any]:
    wall = {name: [w for w, _ in ts] for name, ts in times.items()}
    cpu = {name: [c for _, c in ts] for name, ts in times.items()}
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    return {
        "tokens": tokens,
        f"{bare}_tokens_per_s": tokens / med[bare],
        f"{other}_tokens_per_s": tokens / med[other],
        "ratio": med[bare] / med[other],  # other / bare throughput, by wall-clock medians
        "ratio_cpu": med_cpu[bare] / med_cpu[other],  # the same by process CPU time (less hit by other load)
        f"{bare}_seconds": wall[bare],
        f"{other}_seconds": wall[other],
        f"{bare}_cpu_seconds": cpu[bare],
        f"{other}_cpu_seconds": cpu[other],
    }


def _batches(windows: torch.Tensor, batch_size: int, device: torch.device):
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size].to(device)


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="1x token budget per dataset (default 4096)")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16 (default auto)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per throughput (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--step-memory", action="store_true",
                   help="only one pruning step's peak memory, in this otherwise fresh process")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="also find the largest batch, up to N windows, that fits in the GPU's memory (bare forward, "
                        "collection, evaluation) and measure there (on CPU nothing signals out-of-memory: N must fit)")
    p.add_argument("--eval-memory-config", choices=sorted(EVAL_CONFIGS), default=None,
                   help="also measure evaluation memory and speed on a random-init model of these dimensions")
    args = p.parse_args(argv)
    if args.tokens < args.window:
        p.error(f"--tokens {args.tokens} is below one window ({args.window})")
    if min(args.window, args.batch_size, args.repeats) < 1 or any(
            v is not None and v < 1 for v in (args.threads, args.max_batch)):
        p.error("--window, --batch-size, --repeats, --threads and --max-batch must be positive")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    forget, retain = "code", "prose"
    rss_start, anon_start, rss_method = memory()

    log(f"loading {args.model} ({args.dtype})")
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    rss_load, anon_load, _ = memory()
    device = next(model.parameters()).device
    sites = find_sites(model)
    body = getattr(model, model.base_model_prefix, model)

    n1 = args.tokens // args.window  # windows at 1x
    train = token_windows(load_texts(forget, "train"), tok, args.window, 4 * n1 * args.window, seed=0)
    test = token_windows(load_texts(forget, "test"), tok, args.window, n1 * args.window, seed=0)
    skip = top_tokens(train[:n1], 50)
    budgets = {1: train[:n1], 2: train[: 2 * n1], 4: train}
    tokens = n1 * args.window

    def bare_body(w: torch.Tensor = budgets[1]) -> None:
        with torch.inference_mode():
            for ids in _batches(w, args.batch_size, device):
                body(input_ids=ids, use_cache=False)

    def bare_full(w: torch.Tensor = test) -> None:
        with torch.inference_mode():
            for ids in _batches(w, args.batch_size, device):
                _ = model(input_ids=ids, use_cache=False).logits  # the logits are part of the cost

    def collect(w: torch.Tensor = budgets[1]) -> None:
        collect_stats(model, sites, w, args.batch_size, progress=False)

    def evaluate_test() -> None:
        evaluate(model, test, skip, args.batch_size, progress=False)

    log("warm-up")
    model.eval()
    bare_body(budgets[1][: args.batch_size])
    bare_full(test[: args.batch_size])
    collect(budgets[1][: args.batch_size])
    gc.collect()
    release_free_heap()
    rss_warm, anon_warm, _ = memory()  # weights are mmapped: only a first forward makes them resident

    log("collection at 1x, 2x, 4x the budget, with memory sampling")
    scaling: dict[int, float] = {}
    peaks: dict[int, PeakMemory] = {}
    for mult in (1, 4, 2):  # 1x and 4x first, so their memory is measured before anything else grows it
        gc.collect()
        release_free_heap()
        with PeakMemory() as peak:
            scaling[mult] = timed(lambda w=budgets[mult]: collect(w), device)[0]
        peaks[mult] = peak

    log(f"collection throughput, {args.repeats} interleaved repeats")
    times = interleaved({"bare": bare_body, "hooked": collect, "full": lambda: bare_full(budgets[1])}, args.repeats,
                        device)
    full = times.pop("full")
    collection = throughput(times, tokens, "bare", "hooked")
    collection["full_tokens_per_s"] = tokens / statistics.median(w for w, _ in full)
    collection["ratio_full"] = collection["hooked_tokens_per_s"] / collection["full_tokens_per_s"]
    collection["full_seconds"] = [w for w, _ in full]
    log("evaluation memory, one batch")
    eval_extra = {name: extra_anon(fn) for name, fn in
                  (("bare", lambda: bare_full(test[: args.batch_size])),
                   ("evaluate", lambda: evaluate(model, test[: args.batch_size], skip, args.batch_size, progress=False)))}
    log(f"evaluation throughput, {args.repeats} interleaved repeats")
    evaluation = throughput(interleaved({"bare": bare_full, "evaluate": evaluate_test}, args.repeats, device),
                            tokens, "bare", "evaluate")
    evaluation.update(bare_extra_mb=eval_extra["bare"], evaluate_extra_mb=eval_extra["evaluate"])
    if device.type == "cuda":
        evaluation.update(gpu_memory(lambda: bare_full(test[: args.batch_size]),
                                     lambda: evaluate(model, test[: args.batch_size], skip, args.batch_size,
                                                      progress=False), device))
    batches = batch_search(model, skip, args, model.get_input_embeddings().num_embeddings) if args.max_batch else None

    log("one pruning step")
    cfg = Config(model=args.model, forget=forget, retain=retain, ff_frac=0.02, attn_frac=0.02, steps=1,
                 collect_tokens=tokens, eval_tokens=tokens, window=args.window, batch_size=args.batch_size,
                 dtype=args.dtype, device=args.device, retrain_window=min(Config.retrain_window, args.window))
    validate(cfg, runs=["both"])
    t0 = time.perf_counter()
    data = data_for(cfg, tok)
    prepare_s = time.perf_counter() - t0
    gc.collect()
    release_free_heap()
    with tempfile.TemporaryDirectory(prefix="selprune-bench-") as run_dir, PeakMemory() as step_peak:
        t0 = time.perf_counter()
        records, pruner = run_pruning(cfg, "both", run_dir, model, tok, data=data, progress=False)
        step_total = time.perf_counter() - t0
        pruner.restore()
    secs = records[1]["seconds"]
    pruning_step = {
        "tokens_per_dataset": tokens,
        **{phase: secs[phase] for phase in ("collect", "score", "prune", "eval")},
        "total": sum(secs.values()),
        "eval_unpruned": records[0]["seconds"]["eval"],  # step 0, outside the step
        "run_pruning_wall": step_total,
        "prepare_data": prepare_s,
        "peak_rss_mb": step_peak.peak / MB,
        "peak_anon_mb": step_peak.peak_anon / MB,
        "peak_over_load_mb": (step_peak.peak - rss_load) / MB,
        **(fresh_step_memory(args) if device.type == "cpu" else {}),
        "reference_peak_rss_mb": REFERENCE_STEP_PEAK_MB,
    }
    log(f"training steps, {args.repeats} interleaved repeats")
    training = run_training(args, cfg, model, data, device)
    eval_memory = run_eval_memory(args) if args.eval_memory_config else None

    extra = {m: (peaks[m].peak_anon - anon_warm) / MB for m in (1, 2, 4)}
    return {
        "benchmark": "selprune hot paths (benchmarks/bench.py)",
        "config": {
            "model": args.model, "forget": forget, "retain": retain,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "dtype_arg": args.dtype,
            "device": str(device), "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "tokens": tokens, "window": args.window, "batch_size": args.batch_size,
            "repeats": args.repeats, "load_seconds": load_s,
        },
        "collection": collection,
        "evaluation": evaluation,
        "pruning_step": pruning_step,
        "training": training,
        "scaling": {
            "tokens": [tokens * m for m in (1, 2, 4)],
            "seconds": [scaling[m] for m in (1, 2, 4)],
            "ratio_to_1x": [scaling[m] / scaling[1] for m in (1, 2, 4)],
        },
        "memory": {
            "method": rss_method,
            "rss_start_mb": rss_start / MB,
            "rss_after_load_mb": rss_load / MB,
            "rss_after_warmup_mb": rss_warm / MB,
            "collect_peak_rss_1x_mb": peaks[1].peak / MB,
            "collect_peak_rss_4x_mb": peaks[4].peak / MB,
            "collect_peak_over_load_1x_mb": (peaks[1].peak - rss_load) / MB,
            "collect_peak_over_load_4x_mb": (peaks[4].peak - rss_load) / MB,
            "anon_start_mb": anon_start / MB,
            "anon_after_load_mb": anon_load / MB,
            "anon_after_warmup_mb": anon_warm / MB,
            "collect_peak_anon_1x_mb": peaks[1].peak_anon / MB,
            "collect_peak_anon_4x_mb": peaks[4].peak_anon / MB,
            "collect_extra_1x_mb": extra[1],
            "collect_extra_2x_mb": extra[2],
            "collect_extra_4x_mb": extra[4],
            "extra_ratio_4x_1x": extra[4] / extra[1] if extra[1] > 0 else None,
            "ru_maxrss_mb": _ru_maxrss() / MB,
        },
        **({"batch_search": batches} if batches else {}),
        **({"eval_memory": eval_memory} if eval_memory else {}),
        "total_seconds": time.perf_counter() - t_start,
    }


TRAIN_STEPS = 4  # optimizer steps per timed training pass


def run_training(args: argparse.Namespace, cfg: Config, model: torch.nn.Module, data: Data,
                 device: torch.device) -> dict[str, Any]:
    """Optimizer-step throughput (tokens/s through forward + backward + AdamW) of the
    relearning loop (`retrain`, its evaluations left out: the records' train seconds) and
    of gradient ascent (`unlearn`, method seconds), each against a bare step of its own batch
    (2 x 128 forget tokens for relearning, 2 x `--window` for gradient ascent): forward,
    cross-entropy, backward, fused AdamW, nothing else. The model is put back
    after each pass (`restored`). Every pass starts from a heap with its free pages handed
    back (`release_free_heap`), as `unlearn`'s compute meter starts: each then faults in
    the memory its steps need, as the first pass in a fresh process does."""
    window = min(Config.retrain_window, args.window)
    rcfg = cfg.replace(retrain_steps=TRAIN_STEPS, retrain_batch=2, retrain_window=window, retrain_lr=1e-6,
                       retrain_eval_tokens=window, unlearn_steps=TRAIN_STEPS, unlearn_batch=2, unlearn_checkpoints=1,
                       unlearn_lr=1e-6)
    train = data.forget_train[:, :window]
    tiny = data.with_eval_windows(1)  # the evaluations inside retrain/unlearn are not timed, so keep them small
    ga_data = Data(data.forget_train, data.retain_train, tiny.forget_test, tiny.retain_test, data.skip)
    order = torch.arange(TRAIN_STEPS * 2) % len(train)

    def bare(train: torch.Tensor = train) -> float:  # train: [n, window] token ids
        with restored(model):
            release_free_heap()
            model.train()
            params = list(model.parameters())
            opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True)
            t0 = time.perf_counter()
            for step in range(TRAIN_STEPS):
                ids = train[order[2 * step: 2 * step + 2]].to(device)  # [2, window]
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _sync(device)
            return time.perf_counter() - t0

    def relearning() -> float:
        with restored(model):
            release_free_heap()
            curve = retrain(model, None, None, tiny, rcfg, progress=False, train=train)
        return sum(r["seconds"]["train"] for r in curve)

    def ascent() -> float:
        with restored(model):
            records = unlearn(model, ga_data, rcfg.replace(window=args.window), "ga", progress=False)
        return records[-1]["compute"]["seconds"]

    def bare_ga() -> float:  # the bare step on gradient ascent's batch: its window, not relearning's
        return bare(data.forget_train[:, : args.window])

    passes = {"bare": bare, "retrain": relearning, "bare_ga": bare_ga, "ga": ascent}
    # One untimed round first: the first round of a process was the slowest of every pass (2026-12-07,
    # two runs of 5: bare 10.3-12.2 s against 6.1-7.1, bare_ga 14.7-15.5 against 11.5-13.0, ga
    # 14.0-14.9 against 11.8-13.2), bare the most, so that the median of a few repeats flattered
    # the ratios.
    for fn in passes.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, fn in passes.items():
            times[name].append(fn())
    windows = {"bare": window, "retrain": window, "bare_ga": args.window, "ga": args.window}
    per_s = {name: TRAIN_STEPS * 2 * windows[name] / statistics.median(t) for name, t in times.items()}
    return {"steps": TRAIN_STEPS, "batch": 2, "window_retrain": window, "window_ga": args.window,
            "bare_tokens_per_s": per_s["bare"], "retrain_tokens_per_s": per_s["retrain"],
            "bare_ga_tokens_per_s": per_s["bare_ga"], "ga_tokens_per_s": per_s["ga"],
            "ratio_retrain": per_s["retrain"] / per_s["bare"], "ratio_ga": per_s["ga"] / per_s["bare_ga"],
            "seconds": times}


def released_anon() -> int:
    """The anonymous RSS in bytes after garbage collection and with the C heap's free pages
    handed back: the baseline that a measured call's added memory is read from."""
    gc.collect()
    release_free_heap()
    return memory()[1]


def extra_anon(fn: Callable[[], Any]) -> float:
    """MB of anonymous RSS that one call of `fn` adds at its sampled peak over the RSS before it."""
    before = released_anon()
    with PeakMemory() as peak:
        fn()
    return (peak.peak_anon - before) / MB


def eval_phases(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Where one call of `fn` (an `evaluate`) spends its time and memory: seconds in the body
    (the start to the first LM-head call), in the head's matmuls and in the per-chunk reduce
    (`selprune.evaluate._head_into` and `_reduce_rows`, wrapped for this call only), and the
    anonymous RSS over that before the call at the first head call (what the body left) and at
    the sampled peak."""
    from selprune import evaluate as ev

    head0, reduce0 = ev._head_into, ev._reduce_rows
    spent = {"head_s": 0.0, "reduce_s": 0.0}
    first: dict[str, float] = {}

    def wrap(fn0: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            _sync(device)
            t0 = time.perf_counter()
            if key == "head_s" and not first:
                first.update(body_s=t0 - start, after_body_extra_mb=(memory()[1] - before) / MB)
            out = fn0(*a, **k)
            _sync(device)
            spent[key] += time.perf_counter() - t0
            return out
        return wrapped

    before = released_anon()
    ev._head_into, ev._reduce_rows = wrap(head0, "head_s"), wrap(reduce0, "reduce_s")
    try:
        with PeakMemory() as peak:
            start = time.perf_counter()
            fn()
            _sync(device)
            total = time.perf_counter() - start
    finally:
        ev._head_into, ev._reduce_rows = head0, reduce0
    return {"total_s": total, **first, **spent, "peak_extra_mb": (peak.peak_anon - before) / MB}


def gpu_extra_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """MB of GPU memory that one call of `fn` allocates at its peak over what was allocated
    before it (torch's caching allocator: tensors, not the cache it keeps); None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MB


def gpu_memory(bare: Callable[[], Any], evaluate_fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """The GPU memory a bare forward and an evaluate call over the same batch add, and their ratio."""
    bare_mb, eval_mb = gpu_extra_mb(bare, device), gpu_extra_mb(evaluate_fn, device)
    return {"bare_extra_gpu_mb": bare_mb, "evaluate_extra_gpu_mb": eval_mb,
            "evaluate_over_bare_gpu": eval_mb / bare_mb if bare_mb and eval_mb is not None else None}


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` says the device ran out of memory: torch's OutOfMemoryError (the same class as
    torch.cuda.OutOfMemoryError, on any build), or a library's own words for it (cuBLAS, cuDNN)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in ("out of memory", "ALLOC_FAILED")))


def release_device_cache(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back, so that a large batch finds one contiguous
    stretch of GPU memory rather than the pieces an earlier model or batch left."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _runs_in_memory(fn: Callable[[int], Any], batch: int, device: torch.device) -> bool:
    """Whether `fn(batch)` runs without the device running out of memory (its cache emptied after)."""
    try:
        fn(batch)
        _sync(device)
        return True
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        return False
    finally:
        release_device_cache(device)


def largest_batch(fn: Callable[[int], Any], start: int, cap: int, device: torch.device) -> dict[str, Any]:
    """The largest batch, up to `cap`, at which `fn(batch)` runs out of no memory: doubling from
    `start`, then bisecting between the last batch that ran and the first that did not, to within
    an eighth of the former (a handful of probes, since each large one costs seconds).

    Only CUDA (and MPS) signal running out of memory as an exception; on CPU the kernel's OOM
    killer ends the process instead, so there the search stops at `cap` and must be given one
    that fits."""
    probes: list[tuple[int, bool]] = []

    def runs(batch: int) -> bool:
        probes.append((batch, _runs_in_memory(fn, batch, device)))
        return probes[-1][1]

    fits, fails, batch = 0, None, min(start, cap)
    while fails is None and fits < cap:
        if runs(batch):
            fits, batch = batch, min(2 * batch, cap)
        else:
            fails = batch
    while fails is not None and fails - fits > max(1, fits // 8):
        mid = (fits + fails) // 2
        if runs(mid):
            fits = mid
        else:
            fails = mid
    return {"batch": fits, "first_oom_batch": fails, "cap": cap, "probes": [b for b, _ in probes],
            "probes_ran": [ok for _, ok in probes]}


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`fn()`, or {"error": ...}: near the memory limit a timed call can still fail, and one
    entry's failure must not cost the figures already measured."""
    try:
        return fn()
    except RuntimeError as e:
        return {"error": one_line(e)[:300],
                "out_of_memory": out_of_memory(e)}


def batch_search(model: torch.nn.Module, skip: torch.Tensor | None, args: argparse.Namespace,
                 vocab_size: int) -> dict[str, Any]:
    """`--max-batch N`: for the bare full forward with logits, the body alone, `collect_stats`
    and `evaluate`, the largest batch of `--window`-token windows (random ids) that fits in the
    device's memory, up to N windows, with one timed call there: tokens/s and the GPU memory it
    adds at its peak. Then, interleaved, evaluate against the bare forward at the largest batch
    both fit, and collection against the body at the largest batch both fit: the two ratios of
    the default budget, at a batch that fills the device."""
    device = next(model.parameters()).device
    body = getattr(model, model.base_model_prefix, model)
    sites = find_sites(model)
    windows = torch.randint(0, vocab_size, (args.max_batch, args.window), generator=torch.Generator().manual_seed(0))
    release_device_cache(device)
    result: dict[str, Any] = {"window": args.window}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        result.update(gpu_free_mb=free / MB, gpu_total_mb=total / MB)

    def bare(b: int) -> None:
        with torch.inference_mode():
            _ = model(input_ids=windows[:b].to(device), use_cache=False).logits

    def body_only(b: int) -> None:
        with torch.inference_mode():
            body(input_ids=windows[:b].to(device), use_cache=False)

    fns: dict[str, Callable[[int], Any]] = {
        "bare": bare,
        "body": body_only,
        "collect": lambda b: collect_stats(model, sites, windows[:b], b, progress=False),
        "evaluate": lambda b: evaluate(model, windows[:b], skip, b, progress=False),
    }

    def search(fn: Callable[[int], Any]) -> dict[str, Any]:
        found = largest_batch(fn, args.batch_size, args.max_batch, device)
        if found["batch"]:
            b = found["batch"]
            found["peak_extra_gpu_mb"] = gpu_extra_mb(lambda: fn(b), device)
            found["tokens_per_s"] = b * args.window / timed(lambda: fn(b), device)[0]
        release_device_cache(device)
        return found

    for name, fn in fns.items():
        log(f"largest batch: {name}, up to {args.max_batch} windows")
        result[name] = _guarded(lambda fn=fn: search(fn))

    def side_by_side(bare_name: str, other: str) -> dict[str, Any]:
        b = min(result[bare_name]["batch"], result[other]["batch"])
        times = interleaved({bare_name: lambda: fns[bare_name](b), other: lambda: fns[other](b)}, args.repeats, device)
        release_device_cache(device)
        return {"batch": b, **throughput(times, b * args.window, bare_name, other)}

    for key, (bare_name, other) in (("at_bare_batch", ("bare", "evaluate")), ("collect_at_body_batch", ("body", "collect"))):
        if result[bare_name].get("batch") and result[other].get("batch"):
            result[key] = _guarded(lambda bare_name=bare_name, other=other: side_by_side(bare_name, other))
    return result


def run_eval_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluation against a bare forward with logits on a random-init Gemma 3 of released
    dimensions (issue #19): the memory each adds over the loaded model on one batch, then
    throughput, interleaved; the body alone too (what collection runs)."""
    name = args.eval_memory_config
    log(f"eval memory: random-init {name}")
    cfg = transformers.Gemma3TextConfig(**EVAL_CONFIGS[name])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).to(args.device).eval()
    device = next(model.parameters()).device
    body = getattr(model, model.base_model_prefix)
    windows = torch.randint(0, cfg.vocab_size, (args.batch_size, args.window), generator=torch.Generator().manual_seed(0))

    def bare() -> None:
        with torch.inference_mode():
            _ = model(input_ids=windows.to(device), use_cache=False).logits

    def body_only() -> None:
        with torch.inference_mode():
            body(input_ids=windows.to(device), use_cache=False)

    def evaluate_batch() -> None:
        evaluate(model, windows, None, args.batch_size, progress=False)

    evaluate(model, windows[:1, :16], None, 1, progress=False)  # warm-up: first touch of the weights, lazy init
    bare_mb, eval_mb = extra_anon(bare), extra_anon(evaluate_batch)
    log(f"eval memory: throughput, {args.repeats} interleaved repeats")
    times = interleaved({"bare": bare, "evaluate": evaluate_batch, "body": body_only}, args.repeats, device)
    body_times = times.pop("body")
    tokens = windows.numel()
    result = {"config": name, "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "layers": cfg.num_hidden_layers,
              "windows": args.batch_size, "window": args.window, "bare_extra_mb": bare_mb, "evaluate_extra_mb": eval_mb,
              # host memory: on a GPU the logits are not there (see the *_gpu_mb figures instead)
              "evaluate_over_bare": eval_mb / bare_mb if bare_mb > 0 and device.type != "cuda" else None,
              **throughput(times, tokens, "bare", "evaluate")}
    result["body_tokens_per_s"] = tokens / statistics.median(w for w, _ in body_times)
    result["body_over_full"] = result["body_tokens_per_s"] / result["bare_tokens_per_s"]
    result["body_seconds"] = [w for w, _ in body_times]
    result["evaluate_phases"] = eval_phases(evaluate_batch, device)
    if device.type == "cuda":
        result.update(gpu_memory(bare, evaluate_batch, device))
    if args.max_batch:
        result["batch_search"] = batch_search(model, None, args, cfg.vocab_size)
    return result


def run_step_memory(args: argparse.Namespace) -> dict[str, Any]:
    """`--step-memory`: one pruning step of the run `both` in a process that has done nothing
    else (load, data, the step), as a whole process's peak: what the reference library's
    1.39 GB (issue #19) measured. The full benchmark's `pruning_step` runs after its other
    phases, so its peak includes what those left on the heap."""
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    rss_load = memory()[0]
    cfg = Config(model=args.model, ff_frac=0.02, attn_frac=0.02, steps=1, collect_tokens=args.tokens,
                 eval_tokens=args.tokens, window=args.window, batch_size=args.batch_size, dtype=args.dtype,
                 device=args.device, retrain_window=min(Config.retrain_window, args.window))
    data = data_for(cfg, tok)
    with tempfile.TemporaryDirectory(prefix="selprune-bench-") as run_dir, PeakMemory() as peak:
        records, pruner = run_pruning(cfg, "both", run_dir, model, tok, data=data, progress=False)
        pruner.restore()
    return {"benchmark": "one pruning step in a fresh process (benchmarks/bench.py --step-memory)",
            "tokens_per_dataset": args.tokens, "window": args.window, "batch_size": args.batch_size,
            "rss_after_load_mb": rss_load / MB, "peak_rss_mb": peak.peak / MB, "peak_anon_mb": peak.peak_anon / MB,
            "ru_maxrss_mb": _ru_maxrss() / MB, "seconds": records[1]["seconds"]}


def fresh_step_memory(args: argparse.Namespace) -> dict[str, float]:
    """`--step-memory` with this run's model, budget, batches, dtype and threads, in a child
    process: the step's whole-process peak as the reference's was measured, beside the full
    run's (which includes the heap its other phases left). Host memory, so on the CPU only."""
    log("one pruning step in a fresh process (--step-memory)")
    cmd = [sys.executable, os.path.abspath(__file__), "--step-memory", "--model", args.model, "--tokens",
           str(args.tokens), "--window", str(args.window), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--device", args.device, *(["--threads", str(args.threads)] if args.threads else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.py --step-memory failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    step = json.loads(proc.stdout)
    return {"fresh_process_peak_rss_mb": step["peak_rss_mb"], "fresh_process_peak_anon_mb": step["peak_anon_mb"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = _round(run_step_memory(args) if args.step_memory else run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
