"""Data parallelism over 2 processes (gloo, on the CPU): collection, evaluation, pruning
runs and the `selprune prune` command give the statistics, metrics and selected neurons of
one process over the same windows, each rank runs only its share, rank 0 alone touches the
run directory, and an error on rank 0 reaches every rank. Plus the helpers' single-process
behaviour, the command's parameter parsing, and the rendezvous: a stated timeout, and a
rank that never joins is named.

The ranks are forked from the test process (torch and transformers already imported, so
a rank starts in milliseconds) and meet at a free port; each writes what it saw to a file
that the test compares with a single-process run. One slow test launches the documented
`torchrun ... -m selprune prune` command itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import loop_data as make_data
from tiny_models import random_windows, small_datasets, tiny_model, without_measured  # noqa: E402

from selprune import distributed  # noqa: E402
from selprune.errors import SelpruneError  # noqa: E402
from selprune.evaluate import evaluate  # noqa: E402
from selprune.experiment import cli, loop  # noqa: E402
from selprune.experiment.config import Config  # noqa: E402
from selprune.experiment.loop import run_pruning  # noqa: E402
from selprune.experiment.prune_command import config_from  # noqa: E402
from selprune.sites import KINDS, decoder_blocks, find_sites  # noqa: E402
from selprune.stats import FIELDS, collect_stats  # noqa: E402

WORLD = 2
WINDOWS = random_windows(7, 12, seed=11)  # 7 windows: shards of unequal size
SKIP = torch.tensor([5, 6, 7, 8])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: Path, scenario: Callable[[Path], dict[str, Any]]) -> None:
    """One forked rank: join the group through torchrun's variables, run, save what it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert distributed.init(timeout_s=60)  # a broken collective fails in a minute instead of hanging
    try:
        torch.save(scenario(out), out / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


def run_ranks(scenario: Callable[[Path], dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Run `scenario(out)` on 2 forked ranks; return what each saw (a failure in a rank
    fails the test with that rank's traceback)."""
    mp.start_processes(_rank_main, args=(_free_port(), out, scenario), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]  # written just now, by us


class BatchCounter:
    """Counts forward passes through a model's first block: how many batches this rank ran."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        decoder_blocks(model)[0].register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.n += 1


# ------------------------------------------------------------ statistics and metrics
def _collect_and_evaluate(out: Path) -> dict[str, Any]:
    model = tiny_model("llama")
    sites = find_sites(model)
    removed = {k: torch.zeros(sites.shape(k), dtype=torch.bool) for k in KINDS}
    removed["ff"][1, :5] = True
    count = BatchCounter(model)
    seen: dict[str, Any] = {}
    seen["stats"] = collect_stats(model, sites, WINDOWS, batch_size=2, removed=removed, hist_bins=16, progress=False)
    seen["stats_batches"], count.n = count.n, 0
    seen["metrics"] = evaluate(model, WINDOWS, SKIP, batch_size=3, progress=False)
    seen["eval_batches"], count.n = count.n, 0
    # 2 windows in 1 batch: one rank's shard is empty, and it must still take part
    seen["stats_small"] = collect_stats(model, sites, WINDOWS[:2], batch_size=4, progress=False)
    seen["metrics_small"] = evaluate(model, WINDOWS[:2], SKIP, batch_size=4, progress=False)
    seen["small_batches"] = count.n
    return seen


def _assert_stats_match(got, want) -> None:
    assert got.n_tokens == want.n_tokens and got.meta == want.meta
    for kind in KINDS:
        assert torch.equal(got.sums[kind]["count_pos"], want.sums[kind]["count_pos"])  # counts: exact
        for f in FIELDS:  # float64 sums: equal up to the order of adding batches
            torch.testing.assert_close(got.sums[kind][f], want.sums[kind][f], rtol=1e-12, atol=1e-12, msg=f"{kind}.{f}")
        assert set(got.hist) == set(want.hist)
        if kind in want.hist:
            assert torch.equal(got.hist[kind], want.hist[kind])


def _assert_metrics_match(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if name in ("loss", "perplexity"):
            assert got[name] == pytest.approx(value, rel=1e-12)
        else:  # accuracies and token counts come from integer counts: exact
            assert got[name] == value, name


def test_collection_and_evaluation_over_two_ranks_equal_one_process(tmp_path: Path) -> None:
    ranks = run_ranks(_collect_and_evaluate, tmp_path)
    single = _collect_and_evaluate(tmp_path)  # no process group here: one process over all windows
    assert single["stats_batches"] == 4 and single["eval_batches"] == 3
    for seen in ranks:
        _assert_stats_match(seen["stats"], single["stats"])
        _assert_stats_match(seen["stats_small"], single["stats_small"])
        _assert_metrics_match(seen["metrics"], single["metrics"])
        _assert_metrics_match(seen["metrics_small"], single["metrics_small"])
    # every rank ended with the same numbers, bit for bit (so they select the same neurons)
    for kind in KINDS:
        for f in FIELDS:
            assert torch.equal(ranks[0]["stats"].sums[kind][f], ranks[1]["stats"].sums[kind][f])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    # the work was split: whole batches, contiguous, at most one batch apart
    assert [r["stats_batches"] for r in ranks] == [2, 2]
    assert [r["eval_batches"] for r in ranks] == [1, 2]
    assert sorted(r["small_batches"] for r in ranks) == [0, 2]  # one rank ran the lone batch twice, one nothing


# ------------------------------------------------------------------------ pruning runs
class _Forbidden:
    """Stands in for RunDir on ranks other than 0, which must never open the run directory."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a rank other than 0 opened the run directory")


# FF and attention neurons in one run (`both`), mean ablation: every collective the loop has.
# 4 windows: batches of 3 and 1 (unequal shards)
DIST_CFG = Config(ff_frac=0.1, attn_frac=0.05, steps=3, window=16, retrain_window=16, collect_tokens=64,
                  eval_tokens=64, batch_size=3, skip_k=5, ablation="mean")
RUN = "both"


def _prune_runs(out: Path) -> dict[str, Any]:
    if distributed.rank() != 0:
        loop.RunDir = _Forbidden  # the forked rank's own copy of the module
    seen: dict[str, Any] = {}
    data = make_data()
    records, pruner = run_pruning(DIST_CFG, RUN, out / "run", tiny_model("llama"), None, data, progress=False)
    seen["records"], seen["masks"] = records, pruner.masks
    # resume with more steps: rank 0 reads the finished steps, and every rank replays them
    records, pruner = run_pruning(DIST_CFG.replace(steps=4), RUN, out / "run", tiny_model("llama"), None, data,
                                  progress=False)
    seen["resumed_records"], seen["resumed_masks"] = records, pruner.masks
    try:  # rank 0 refuses a run directory made with other parameters: so must every rank
        run_pruning(DIST_CFG.replace(ff_frac=0.2), RUN, out / "run", tiny_model("llama"), None, data, progress=False)
        seen["error"] = None
    except SelpruneError as e:
        seen["error"] = str(e)
    return seen


def _assert_records_match(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(without_measured(got), without_measured(want), strict=True):
        assert {k: v for k, v in g.items() if k not in ("forget", "retain")} == \
            {k: v for k, v in w.items() if k not in ("forget", "retain")}
        for side in ("forget", "retain"):
            _assert_metrics_match(g[side], w[side])


def _step_files(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(run_dir.glob("step_*.safetensors"))}


def test_pruning_run_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    ranks = run_ranks(_prune_runs, tmp_path / "dist")
    single_dir = tmp_path / "single"
    records, pruner = run_pruning(DIST_CFG.replace(steps=4), RUN, single_dir, tiny_model("llama"), None, make_data(),
                                  progress=False)
    # the same neurons, step by step: the step files are identical (masks and ablation constants)
    dist_steps, single_steps = _step_files(tmp_path / "dist" / "run"), _step_files(single_dir)
    assert list(dist_steps) == [f"step_{i:03d}.safetensors" for i in (1, 2, 3, 4)] == list(single_steps)
    for name, tensors in single_steps.items():
        for key, t in tensors.items():
            if key.endswith(".mask"):
                assert torch.equal(dist_steps[name][key], t), (name, key)
            else:  # mean ablation constants: float64 means, equal up to the order of adding batches
                torch.testing.assert_close(dist_steps[name][key], t, rtol=1e-12, atol=1e-12)
    # rank 0 alone wrote: nothing in the folder but the run's own files
    assert sorted(p.name for p in (tmp_path / "dist" / "run").iterdir()) == sorted(p.name for p in single_dir.iterdir())
    _assert_records_match(json.loads((tmp_path / "dist" / "run" / "records.json").read_text()), records)
    for seen in ranks:
        _assert_records_match(seen["resumed_records"], records)
        _assert_records_match(seen["records"], records[: DIST_CFG.steps + 1])
        for kind in KINDS:
            assert torch.equal(seen["resumed_masks"][kind], pruner.masks[kind])
        assert seen["error"] is not None and "other parameters" in seen["error"]
    assert ranks[0]["error"] == ranks[1]["error"]


# ------------------------------------------------------------------- the command
def _prune_args(model_dir: Path, data: Path, run: str | None = "both") -> list[str]:
    """`selprune prune --run-kind RUN` (None: the default run, ff) on the tiny Llama, with two
    small local datasets (the bundled corpora's long documents take seconds to tokenise,
    in every process)."""
    return [*(["--run-kind", run] if run else []), "-p", "model", str(model_dir), "-p", "forget", str(data / "code"), "-p", "retain", str(data / "prose"),
            "-p", "steps", "2", "-p", "ff_frac", "0.1", "-p", "attn_frac", "0.05", "-p", "collect_tokens", "160",
            "-p", "eval_tokens", "96", "-p", "window", "32", "-p", "retrain_window", "32", "-p", "batch_size", "2", "-p", "dtype", "float32",
            "--device", "cpu", "--quiet"]


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    """Folders `code` and `prose`, each with train.jsonl and test.jsonl of 12 short documents."""
    return small_datasets(tmp_path / "data")


def _command(args: list[str]) -> Callable[[Path], dict[str, Any]]:
    def scenario(out: Path) -> dict[str, Any]:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            status = cli.main(["prune", *args, "--out", str(out / "run"), "--save-model"])
        return {"status": status, "stdout": stdout.getvalue()}

    return scenario


def _table(printed: str) -> str:
    return printed.split("\nrecords:")[0]  # less the line naming the (different) run directory


def test_prune_command_over_two_ranks_equals_one_process(tmp_path: Path, tiny_llama_dir: Path, small_data: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """`selprune prune` joins the group from torchrun's variables itself; rank 0 prints."""
    args = _prune_args(tiny_llama_dir, small_data)
    ranks = run_ranks(_command(args), tmp_path / "dist")
    assert not dist.is_initialized()  # the single-process run below is really one process
    assert cli.main(["prune", *args, "--out", str(tmp_path / "single")]) == 0
    printed = capsys.readouterr().out
    assert [r["status"] for r in ranks] == [0, 0]
    assert _table(ranks[0]["stdout"]) == _table(printed) and "forget top1" in printed
    assert ranks[1]["stdout"] == ""
    dist_steps, single_steps = _step_files(tmp_path / "dist" / "run"), _step_files(tmp_path / "single")
    assert len(single_steps) == 2
    for name, tensors in single_steps.items():
        assert all(torch.equal(dist_steps[name][k], t) for k, t in tensors.items())
    _assert_records_match(json.loads((tmp_path / "dist" / "run" / "records.json").read_text()),
                          json.loads((tmp_path / "single" / "records.json").read_text()))
    # --save-model: rank 0 exported the model pruned by both steps
    saved = load_file(str(tmp_path / "dist" / "run" / "pruned-model" / "selprune_masks.safetensors"))
    for kind in KINDS:
        union = single_steps["step_001.safetensors"][f"{kind}.mask"] | single_steps["step_002.safetensors"][f"{kind}.mask"]
        assert torch.equal(saved[kind].bool(), union.bool()) and union.any()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_launch_of_the_prune_command(tmp_path: Path, tiny_llama_dir: Path, small_data: Path) -> None:
    """The invocation the README documents, as a user types it (about 30 s on 2 cores:
    each process imports torch and transformers afresh)."""
    args = _prune_args(tiny_llama_dir, small_data, run=None)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "selprune", "prune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "dist")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("forget top1") == 1  # rank 0 alone prints the table
    assert cli.main(["prune", *args, "--out", str(tmp_path / "single")]) == 0
    dist_steps, single_steps = _step_files(tmp_path / "dist"), _step_files(tmp_path / "single")
    assert list(dist_steps) == list(single_steps) and len(single_steps) == 2
    for name, tensors in single_steps.items():
        assert all(torch.equal(dist_steps[name][k], t) for k, t in tensors.items())


PRUNE_OPTIONS = ["--run-kind", "attn", "-f", "run.yaml", "-p", "steps", "2", "--preset", "paper", "--out", "x",
                 "--device", "cpu", "--device-map", "auto", "--save-model", "--quiet"]


@pytest.mark.parametrize("options", [
    pytest.param(PRUNE_OPTIONS[2:], id="without --run-kind"),
    pytest.param(PRUNE_OPTIONS, id="with --run-kind"),  # not --run: torchrun took it for its --run-path
])
def test_torchrun_hands_every_prune_option_to_the_command(options: list[str]) -> None:
    """torchrun parses its own options before the script's: none of `selprune prune`'s may
    look like (an abbreviation of) one of torchrun's. Checked on torchrun's parser itself."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", "2", "-m", "selprune", "prune", *options])
    assert (args.module, args.training_script, args.training_script_args) == (True, "selprune", ["prune", *options])


# ------------------------------------------------------------- single-process helpers
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_shard_deals_whole_batches_in_order(world: int, batch_size: int) -> None:
    for n in range(0, 10):
        windows = torch.arange(n).reshape(n, 1).expand(n, 3)
        shards = [distributed.shard(windows, batch_size, rank=r, world=world) for r in range(world)]
        assert torch.equal(torch.cat(shards), windows)  # disjoint, complete, in order
        starts = [sum(len(s) for s in shards[:r]) for r in range(world)]
        assert all(s % batch_size == 0 for s in starts)  # every batch is a batch of the single run
        batches = [-(-len(s) // batch_size) for s in shards]
        assert max(batches) - min(batches) <= 1


def test_shard_rejects_bad_arguments() -> None:
    with pytest.raises(SelpruneError, match="batch_size"):
        distributed.shard(WINDOWS, 0, rank=0, world=2)
    with pytest.raises(SelpruneError, match="outside"):
        distributed.shard(WINDOWS, 2, rank=2, world=2)


def test_single_process_helpers_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init() is False and not dist.is_initialized()
    assert (distributed.is_active(), distributed.rank(), distributed.world_size(), distributed.is_main()) == \
        (False, 0, 1, True)
    t = torch.arange(5, dtype=torch.float64)
    distributed.all_reduce_sum_([t])
    assert torch.equal(t, torch.arange(5, dtype=torch.float64))
    assert distributed.broadcast_(t) is t
    assert distributed.shard(WINDOWS, 2) is WINDOWS
    calls = []
    assert distributed.on_main(lambda: calls.append(1) or "done") == "done" and calls == [1]
    distributed.barrier()


def test_init_without_torchrun_variables_names_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SelpruneError, match="launch with torchrun"):
        distributed.init()
    assert not dist.is_initialized()


# ---------------------------------------------------------------- parameter parsing
def test_prune_parameters_are_typed() -> None:
    cfg = config_from({"forget": "code", "retain": "prose", "eps_ff": "1e-3", "ff_frac": 0, "attn_frac": 0.05,
                       "steps": 3, "heads": "median", "selection": "per_layer"}, "attn_heads")
    assert cfg.eps_ff == 0.001 and isinstance(cfg.ff_frac, float) and cfg.steps == 3
    assert (cfg.heads, cfg.selection) == ("median", "per_layer")
    with pytest.raises(SelpruneError, match="steps must be an integer"):
        config_from({"steps": 2.5}, "ff")
    with pytest.raises(SelpruneError, match="selection='yes please' is not one of global, per_layer"):
        config_from({"selection": "yes please"}, "ff")
    with pytest.raises(SelpruneError, match=r"unknown parameters \['stepz'\] \(stepz: did you mean steps\?\)"):
        config_from({"stepz": 3}, "ff")
    with pytest.raises(SelpruneError, match="ff_frac"):  # and the config is validated
        config_from({"ff_frac": 1.5}, "ff")


def test_prune_parameters_have_the_series_names_and_defaults() -> None:
    """`selprune prune` speaks the schema: the old names are renamed (with a note), the
    defaults are `selprune run`'s, and the series' own parameters are accepted and named
    in a note (one parameter file serves every command)."""
    notes: list[str] = []
    cfg = config_from({"per_layer": True, "mode": "one-shot", "retrain_steps": 3, "runs": "ff"}, "ff",
                      note=notes.append)
    assert (cfg.selection, cfg.prune_mode) == ("per_layer", "one-shot")
    assert cfg.replace(selection="global", prune_mode="iterative", retrain_steps=Config().retrain_steps,
                       runs=Config().runs) == Config()
    assert len(notes) == 1 and "does not use retrain_steps, runs" in notes[0]


def test_a_run_without_its_fraction_names_the_fix() -> None:
    with pytest.raises(SelpruneError, match=r"--run-kind attn prunes attn neurons, but attn_frac=0.0; set attn_frac above 0 "
                                            r"\(e.g. -p attn_frac 0.02\)"):
        config_from({"attn_frac": 0}, "attn")
    assert config_from({"attn_frac": 0}, "ff").attn_frac == 0.0, "a fraction the run does not use may be 0"


def test_prune_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["prune", "-p", "steps", "two", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selprune: error: parameter steps must be an integer") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_rank_device_gives_each_process_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under several processes a bare `cuda` becomes cuda:LOCAL_RANK (no GPU needed to check:
    the GPU count is faked, and nothing is put on the device)."""
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    cuda = torch.device("cuda")

    def device_for(local_rank: int, n_gpus: int, device: torch.device = cuda) -> torch.device:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
        return distributed.rank_device(device)

    assert device_for(2, 4) == torch.device("cuda", 2)
    assert device_for(3, 1) == torch.device("cuda", 0)  # one visible GPU per process
    assert device_for(1, 4, torch.device("cuda", 3)) == torch.device("cuda", 3)  # an explicit index stays
    assert device_for(1, 4, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(SelpruneError, match="--nproc_per_node 4"):
        device_for(5, 4)


def test_prune_command_refuses_device_map_with_several_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(distributed, "init", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert cli.main(["prune", "--device-map", "auto", "--out", str(tmp_path / "run")]) == 2
    assert "--device-map auto with 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ rendezvous
def _launch_env(monkeypatch: pytest.MonkeyPatch, rank: int, port: int, wait: str | None = "2") -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    if wait is None:
        monkeypatch.delenv("SELPRUNE_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("SELPRUNE_DIST_TIMEOUT", wait)


def test_the_rendezvous_timeout_is_stated_and_settable(monkeypatch: pytest.MonkeyPatch) -> None:
    _launch_env(monkeypatch, 0, _free_port(), wait=None)
    assert distributed.rendezvous_timeout() == distributed.RENDEZVOUS_TIMEOUT_S == 60.0
    monkeypatch.setenv("SELPRUNE_DIST_TIMEOUT", "2.5")
    assert distributed.rendezvous_timeout() == 2.5
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("SELPRUNE_DIST_TIMEOUT", bad)
        with pytest.raises(SelpruneError, match=rf"SELPRUNE_DIST_TIMEOUT='{bad}'; give the seconds to wait"):
            distributed.init()
    assert not dist.is_initialized()


def test_a_rank_outside_the_world_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _launch_env(monkeypatch, 2, _free_port())
    with pytest.raises(SelpruneError, match=r"RANK=2 is outside WORLD_SIZE=2; give each process a rank 0\.\.1"):
        distributed.init()
    assert not dist.is_initialized()


def test_rank_0_on_a_port_in_use_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _launch_env(monkeypatch, 0, taken.getsockname()[1])
        with pytest.raises(SelpruneError, match=r"rank 0 cannot serve the rendezvous at 127\.0\.0\.1:\d+ .*set "
                                                r"MASTER_PORT to a free port"):
            distributed.init()
    assert not dist.is_initialized()


def test_a_lonely_rank_0_names_the_missing_rank_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, on loopback: rank 0 of 2, nobody else comes (the command-level
    case, in a subprocess, is in tests/test_hostile_outputs.py)."""
    _launch_env(monkeypatch, 0, _free_port(), wait="1")
    t0 = time.monotonic()
    with pytest.raises(SelpruneError, match=r"rank 0 waited 1 s for WORLD_SIZE=2 processes; rank 1 never joined; "
                                            r"start one process per rank.*torchrun --nproc_per_node 2"):
        distributed.init()
    assert time.monotonic() - t0 < 20 and not dist.is_initialized()
