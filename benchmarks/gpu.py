"""The GPU check of issue #19: everything a lent GPU machine should measure, in one call.

Here, once (it needs the package index; writes `.gpu/`, which git ignores)::

    .venv/bin/python benchmarks/gpu.py pack

There, through the device tool, carrying `.gpu` (the command is in README.md, "The GPU check")::

    python3 benchmarks/gpu.py run --out $OUT/gpu.json

Why a pack: the GPU machine is bare, offline and takes at most 64 MiB of files per call. Its
image has torch but not `datasets` or `nbformat`, and an older transformers, so the pack
holds the wheels of this machine's versions of the libraries selprune imports beyond torch
and the scientific stack (`WHEELS`). The embedded SmolLM2-135M's GGUF is 98 MB, over the
limit, so the pack holds its config and tokenizer and the check runs SmolLM2-135M's exact
architecture with random weights (seed 0): the same shapes, hence the same speed and
memory, though not the same text metrics. Selections of two processes against one are
compared on that model too; what matters there is that they are equal.

`run` measures, in this order, each part recorded even if another fails (its error in the
JSON), the parts not begun by `--deadline-s` skipped, the JSON rewritten to `--out` after each:
- `bench.float32`: `benchmarks/bench.py` at 32,768 tokens per dataset in batches of 32
  (collection and evaluation against the bare forwards, a pruning step, training steps, GPU
  memory) with `--max-batch` (the largest batch that fits, its tokens/s and peak GPU memory,
  and the ratios there), and the random-init Gemma-3-270M (262k vocabulary) evaluation memory.
- `processes`: `selprune prune --run-kind both` in one process and under
  `torch.distributed.run --nproc_per_node N`, wall seconds, and whether the step files
  (the pruned neurons) are identical. selprune's collectives reduce CPU tensors (gloo), so
  N ranks can share one GPU; NCCL itself would refuse two ranks on one device.
- `bench.bfloat16`: the same benchmark at bfloat16, without the Gemma part.

`--quick` runs the same on a tiny budget (the suite does this on CPU, `--device cpu`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpu"
# the libraries selprune, bench.py and `selprune prune` import that the GPU image lacks or holds
# older (torch, numpy, pandas, pyarrow, scipy and the small common ones it has); their needs too
WHEELS = ("transformers", "tokenizers", "huggingface_hub", "hf-xet", "httpx2", "httpcore2", "truststore",
          "safetensors", "accelerate", "datasets", "dill", "multiprocess", "fsspec", "nbformat", "fastjsonschema",
          "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "traitlets", "jupyter_core",
          "platformdirs", "click", "typer", "regex", "tqdm", "filelock")
GPU_PYTHON = "3.12"  # the GPU image's python3 (device/KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def log(msg: str) -> None:
    print(f"[gpu] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- pack
def pack(out: Path = PACK) -> None:
    """Write `out`/smollm2 (the embedded model's config and tokenizer) and `out`/whl (the
    wheels, at this environment's versions, for the GPU image's Python)."""
    from selprune.models import load_model

    model, tok = load_model("smollm2-135m", dtype="float32")
    model.config.save_pretrained(out / "smollm2")
    tok.save_pretrained(out / "smollm2")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    shutil.rmtree(out / "whl", ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           GPU_PYTHON, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d",
           str(out / "whl"), *pins]
    subprocess.run(cmd, check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out}: {len(pins)} wheels and the SmolLM2 config and tokenizer, {size / 2**20:.1f} MiB in all")


# ---------------------------------------------------------------------------- run
def random_model(source: Path, out: Path) -> Path:
    """A Hugging Face folder at `out`: the architecture in `source`/config.json with random
    weights (seed 0), float32, and `source`'s tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def attempt(name: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, or {"error": ...} when it fails: one part's failure must not cost the others."""
    from selprune.experiment.sweep import one_line  # a sweep point's failure is reported the same way
    log(name)
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (recorded, and the traceback printed)
        traceback.print_exc()
        return {"error": one_line(e)[:400],
                "seconds": time.perf_counter() - t0}


def prune_args(model: Path, args: argparse.Namespace, out: Path) -> list[str]:
    sizes = (("collect_tokens", 512, 32768), ("eval_tokens", 256, 16384), ("window", 64, 256),
             ("batch_size", 2, 16))
    params = [("model", str(model)), ("forget", args.forget), ("retain", args.retain), ("steps", "2"),
              ("ff_frac", "0.02"), ("attn_frac", "0.02"), ("dtype", "float32"),
              *((k, str(quick if args.quick else full)) for k, quick, full in sizes),
              ("retrain_window", str(64 if args.quick else 128))]
    return ["prune", "--run-kind", "both", *(a for k, v in params for a in ("-p", k, v)), "--device", args.device,
            "--quiet", "--out", str(out)]


def processes(model: Path, args: argparse.Namespace, work: Path, deadline: float) -> dict[str, Any]:
    """`selprune prune` in one process and in `args.nproc`, timed, and their step files compared.

    The wall seconds include each process's start (imports, loading, tokenising), which on a
    small budget is most of them: `ranks_over_single` is no scaling figure. Both runs get the
    same OMP_NUM_THREADS per process (the cores shared out), as torchrun gives its workers one."""
    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    if Path("/sys/class/net/lo").exists():  # the ranks are on this machine: gloo over loopback
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    runs = {"single": [sys.executable, "-m", "selprune"],
            "ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1", "--nproc_per_node",
                      str(args.nproc), "-m", "selprune"]}
    result: dict[str, Any] = {"nproc": args.nproc, "device": args.device, "omp_num_threads": env["OMP_NUM_THREADS"],
                              "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for name, launcher in runs.items():
        t0 = time.perf_counter()
        proc = subprocess.run([*launcher, *prune_args(model, args, work / name)], env=env, capture_output=True,
                              text=True, timeout=max(60.0, deadline - time.perf_counter()))
        result[f"{name}_seconds"] = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{name} run failed ({proc.returncode}): {proc.stderr[-1500:]}")
    steps = {name: {f.name: load_file(str(f)) for f in sorted((work / name).glob("step_*.safetensors"))}
             for name in runs}
    same_files = list(steps["single"]) == list(steps["ranks"]) and bool(steps["single"])
    masks_equal, max_diff = same_files, 0.0
    for file, tensors in steps["single"].items() if same_files else ():
        for key, t in tensors.items():
            other = steps["ranks"][file][key]
            if key.endswith(".mask"):
                masks_equal &= torch.equal(other, t)
            else:  # mean-ablation constants: float64 sums added in another order
                max_diff = max(max_diff, (other.double() - t.double()).abs().max().item())
    records = {name: json.loads((work / name / "records.json").read_text()) for name in runs}
    result.update(step_files=list(steps["single"]), masks_equal=masks_equal, constants_max_abs_diff=max_diff,
                  metrics_max_abs_diff=_metrics_diff(records["single"], records["ranks"]),
                  ranks_over_single=result["single_seconds"] / result["ranks_seconds"])
    return result


def _metrics_diff(a: list[dict], b: list[dict]) -> float | None:
    """The largest absolute difference between the two runs' evaluation metrics, step by step."""
    if len(a) != len(b):
        return None
    diffs = [abs(float(x[side][k]) - float(y[side][k])) for x, y in zip(a, b, strict=True)
             for side in ("forget", "retain") for k in x.get(side, {}) if isinstance(x[side][k], int | float)]
    return max(diffs, default=0.0)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers":
                            transformers.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_mb=props.total_memory / 2**20)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part in turn, most wanted first; each after `--deadline-s` is skipped, and the JSON
    so far is rewritten to `--out` after each, so that a call cut off at its limit still
    returns what was measured."""
    import bench  # benchmarks/bench.py: a script's own folder is first on sys.path
    import torch

    t0 = time.perf_counter()
    deadline = t0 + args.deadline_s
    result: dict[str, Any] = {"benchmark": "the GPU check (benchmarks/gpu.py run)", "quick": args.quick,
                              "deadline_s": args.deadline_s, "machine": machine(), "bench": {}}

    def part(name: str, fn: Callable[[], Any]) -> Any:
        if time.perf_counter() > deadline:
            log(f"{name}: skipped, past --deadline-s {args.deadline_s:g}")
            return {"skipped": f"past --deadline-s {args.deadline_s:g}"}
        value = attempt(name, fn)
        bench.release_device_cache(torch.device(args.device))
        return value

    def save() -> None:
        result["total_seconds"] = time.perf_counter() - t0
        if args.out:
            args.out.write_text(json.dumps(bench._round(result), indent=2) + "\n")

    # --tokens 32768 --batch-size 32 on a GPU: at the CPU's 4,096 and 8 every ratio would be
    # kernel launches; the largest batch is the --max-batch search's own
    budget = (["--tokens", "256", "--window", "64", "--batch-size", "2", "--repeats", "1", "--max-batch", "3"]
              if args.quick else ["--tokens", "32768", "--batch-size", "32", "--repeats", "3", "--max-batch",
                                  str(args.max_batch)])
    with tempfile.TemporaryDirectory(prefix="selprune-gpu-") as tmp:
        work = Path(tmp)
        model = random_model(args.source, work / "model")
        for i, dtype in enumerate(args.dtypes):
            extra = ["--eval-memory-config", "gemma3-tiny" if args.quick else "gemma3-270m"] if i == 0 else []
            bench_args = bench.parse_args([*budget, "--model", str(model), "--dtype", dtype, "--device", args.device,
                                           *extra])
            result["bench"][dtype] = part(f"bench {dtype}", lambda a=bench_args: bench.run(a))
            save()
            if i == 0:  # the distributed check before the second dtype: it matters more
                result["processes"] = part(f"prune: 1 process against {args.nproc}",
                                           lambda: processes(model, args, work, deadline))
                save()
    save()
    return bench._round(result)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pack", help="write .gpu/ (the SmolLM2 config and tokenizer, the wheels); needs the package index")
    r = sub.add_parser("run", help="measure on this machine's GPU and print one JSON object")
    r.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    r.add_argument("--device", default="cuda", help="cuda (default) or cpu (the suite's check)")
    r.add_argument("--source", type=Path, default=PACK / "smollm2", help="a folder with config.json and a tokenizer")
    r.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   help="model dtypes for bench.py; the first also runs the 262k evaluation memory (default float32 bfloat16)")
    r.add_argument("--max-batch", type=int, default=2048, help="bench.py --max-batch (default 2048 windows of 256)")
    r.add_argument("--nproc", type=int, default=2, help="processes in the distributed prune (default 2)")
    r.add_argument("--forget", default="code", help="forget dataset of the prune runs (default code)")
    r.add_argument("--retain", default="prose", help="retain dataset of the prune runs (default prose)")
    r.add_argument("--quick", action="store_true", help="a tiny budget: checks that it runs")
    r.add_argument("--deadline-s", type=float, default=480.0,
                   help="skip the parts not begun after this many seconds (default 480: a 10-minute call)")
    args = p.parse_args(argv)
    if args.command == "run" and not (args.source / "config.json").is_file():
        p.error(f"{args.source} has no config.json; run `benchmarks/gpu.py pack` here first and carry .gpu")
    return args


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:  # `python3 benchmarks/gpu.py` on a machine where selprune is not installed
        sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    if args.command == "pack":
        pack()
        return 0
    print(json.dumps(run(args), indent=2))  # run() wrote --out after each part
    return 0


if __name__ == "__main__":
    sys.exit(main())
