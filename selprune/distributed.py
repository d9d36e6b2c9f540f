"""Data parallelism over processes: each rank takes a shard of the token windows, and the
per-rank sums are added.

Why this is all it takes: activation statistics (float64 sums, counts, histograms) and
evaluation metrics (integer counts, a float64 loss sum) are sums over tokens, and sums
merge by addition (docs/method.md, "Data-parallel runs"). So a run over W processes is the single-process run
with its batches dealt out: every process holds the whole model, runs its contiguous share
of the batches, and one all-reduce per collection or evaluation adds the partial sums on
every rank. Scoring, selection and pruning then happen on every rank from the same numbers
(rank 0's selection is broadcast, so that the models cannot drift apart even if a
reduction were to round differently on some rank), and rank 0 alone writes files.

Without an initialised process group (a plain `python`, a notebook, or a world of one)
every helper here is a no-op costing one function call, and the results are exactly those
of single-process code.

Launch with `torchrun` (or `accelerate launch`, which sets the same environment
variables) and call `init()` first: it reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. `selprune prune` does this itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from selprune.errors import SelpruneError

T = TypeVar("T")
_CPU = torch.device("cpu")


# ------------------------------------------------------------------------ who am I
def is_active() -> bool:
    """Whether this process is one of several in an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when single-process)."""
    return dist.get_rank() if is_active() else 0


_current_rank = rank  # for `shard`, whose parameter of that name shadows the function


def world_size() -> int:
    """The number of processes (1 when single-process)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints results: rank 0, or the only process."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its own machine (torchrun's LOCAL_RANK; 0 when single-process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_active() else 0


# ------------------------------------------------------------------------ set-up
RENDEZVOUS_TIMEOUT_S = 60.0  # how long init() waits for every rank to join; SELPRUNE_DIST_TIMEOUT overrides it


def init(timeout_s: float = 1800.0, rendezvous_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment variables, if any.

    Returns whether this process is now one of several. With WORLD_SIZE unset or 1 (a plain
    `python`) nothing is initialised. The backend is gloo, plus NCCL for CUDA tensors where
    CUDA is available ("cpu:gloo,cuda:nccl"): selprune itself reduces CPU tensors only (a few
    MB once per collection), which gloo carries on any machine, while a user's own CUDA
    collectives get NCCL. `timeout_s` bounds how long a rank waits for the others at a
    collective before failing instead of hanging. `rendezvous_s` (default
    $SELPRUNE_DIST_TIMEOUT, else 60 s) bounds the wait for every rank to join: ranks
    started by hand, one of which never comes, fail naming the missing ones instead of
    waiting for torch's 30 minutes. (Under torchrun its agent starts every rank together
    and keeps the rendezvous.)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return is_active()
    if not dist.is_available():
        raise SelpruneError("launched with several processes (WORLD_SIZE > 1), but this torch build has no "
                            "torch.distributed; install a torch with distributed support or run one process")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise SelpruneError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch with torchrun "
                            "(or accelerate launch), which sets them all")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent holds the store
        dist.init_process_group(backend, timeout=timeout)
    else:
        me = int(os.environ["RANK"])
        store = _rendezvous(me, world, rendezvous_timeout() if rendezvous_s is None else rendezvous_s)
        dist.init_process_group(backend, store=store, rank=me, world_size=world, timeout=timeout)
    return is_active()


def rendezvous_timeout() -> float:
    """Seconds init() waits for every rank: $SELPRUNE_DIST_TIMEOUT, else `RENDEZVOUS_TIMEOUT_S`."""
    raw = os.environ.get("SELPRUNE_DIST_TIMEOUT", "").strip()
    if not raw:
        return RENDEZVOUS_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise SelpruneError(f"SELPRUNE_DIST_TIMEOUT={raw!r}; give the seconds to wait for every rank, e.g. 60")
    return value


def _rendezvous(me: int, world: int, wait_s: float) -> dist.Store:
    """Rank 0 serves a TCPStore at MASTER_ADDR:MASTER_PORT; every rank checks in and waits
    at most `wait_s` for all of them, so a rank that never comes is named, not waited for."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if not 0 <= me < world:
        raise SelpruneError(f"RANK={me} is outside WORLD_SIZE={world}; give each process a rank 0..{world - 1}")
    launch = (f"start one process per rank, RANK=0..{world - 1}, each with WORLD_SIZE={world} MASTER_ADDR={addr} "
              f"MASTER_PORT={port}, or launch with torchrun --nproc_per_node {world}; "
              f"SELPRUNE_DIST_TIMEOUT sets the wait ({wait_s:g} s)")
    try:
        store = dist.TCPStore(addr, port, world, is_master=me == 0, timeout=timedelta(seconds=wait_s),
                              wait_for_workers=False, multi_tenant=True)
    except RuntimeError as e:
        if me == 0:
            raise SelpruneError(f"rank 0 cannot serve the rendezvous at {addr}:{port} ({' '.join(str(e).split())[:160]}); "
                                "set MASTER_PORT to a free port (every rank the same)") from e
        raise SelpruneError(f"rank {me} could not reach rank 0 at {addr}:{port} within {wait_s:g} s: "
                            f"rank 0 never joined; {launch}") from e
    store.set(f"selprune/joined/{me}", str(os.getpid()))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            absent = [r for r in range(world) if not store.check([f"selprune/joined/{r}"])]
        except RuntimeError as e:  # rank 0 left: it gave up, or failed
            raise SelpruneError(f"rank {me} lost rank 0 at {addr}:{port} during the rendezvous; {launch}") from e
        if not absent:
            return store
        if time.monotonic() > deadline:
            ranks = ", ".join(map(str, absent))
            raise SelpruneError(f"rank {me} waited {wait_s:g} s for WORLD_SIZE={world} processes; "
                                f"rank{'s' if len(absent) > 1 else ''} {ranks} never joined; {launch}")
        time.sleep(0.05)


def rank_device(device: torch.device) -> torch.device:
    """The device this rank should use: under several processes, a bare `cuda` becomes
    `cuda:LOCAL_RANK` (one GPU per process, as torchrun's --nproc_per_node intends), or
    `cuda:0` where a process sees a single GPU (a scheduler that binds one GPU to each
    process through CUDA_VISIBLE_DEVICES); any other device is returned as it is."""
    if not is_active() or device.type != "cuda" or device.index is not None:
        return device
    n_gpus = torch.cuda.device_count()
    if local_rank() >= n_gpus > 1:
        raise SelpruneError(f"process {local_rank()} on this machine has no GPU of its own (the machine has {n_gpus}); "
                            f"launch at most --nproc_per_node {n_gpus}, or pass --device cpu")
    device = torch.device("cuda", local_rank() if n_gpus > 1 else 0)
    torch.cuda.set_device(device)  # NCCL and the default CUDA device follow it
    return device


def cleanup() -> None:
    """Leave the process group (if any), so that the process exits without warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------ data
def shard(windows: torch.Tensor, batch_size: int, rank: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's share of `windows` (`[n, window]`): a contiguous block of whole batches.

    Whole batches, because then every batch a rank runs is a batch of the single-process
    run, with the same tokens: the float32 per-batch sums are bit-identical and only the
    float64 order of adding batches differs (~1e-16 relative). Contiguous, so that the
    concatenation of the shards in rank order is `windows`. Ranks differ by at most one
    batch; with fewer batches than ranks some shards are empty (their sums are zero).
    Single-process: `windows` itself.
    """
    rank = _current_rank() if rank is None else rank
    world = world_size() if world is None else world
    if batch_size < 1:
        raise SelpruneError(f"batch_size={batch_size}; need at least 1 window per forward pass")
    if not 0 <= rank < world:
        raise SelpruneError(f"rank {rank} is outside a world of {world} processes")
    if world == 1:
        return windows
    n_batches = -(-len(windows) // batch_size)
    lo, hi = rank * n_batches // world, (rank + 1) * n_batches // world  # batch indices
    return windows[lo * batch_size : hi * batch_size]


# ------------------------------------------------------------------------ collectives
def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over all ranks, in place (a no-op single-process).

    Tensors of one dtype and device are packed into one flat buffer, so a collection's
    dozen sums cost one collective, not a dozen. Every rank must pass the same shapes in
    the same order.
    """
    if not is_active():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.dtype == torch.bool:
            raise SelpruneError("cannot sum bool tensors over ranks; convert them to an integer dtype")
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])  # [sum of numels]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` with rank `src`'s, in place, and return it (a no-op single-process).
    Bool tensors travel as uint8 (gloo has no bool)."""
    if not is_active():
        return tensor
    buf = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    dist.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf.bool())
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (a no-op single-process). An all-reduce of one CPU
    number: it goes over gloo, so no GPU has to be chosen for it."""
    if is_active():
        dist.all_reduce(torch.zeros(1, device=_CPU))


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank (single-process: `fn()`).

    For everything that touches the run directory: rank 0 reads and writes it (a second
    machine need not even see it), and the others receive what rank 0 read. The hand-over
    is also a barrier: when it returns, rank 0's writes are done. If `fn` fails on rank 0,
    every rank raises (a `SelpruneError` with rank 0's message), instead of the other ranks
    waiting for rank 0 at the next collective until the timeout.
    """
    if not is_active():
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except SelpruneError as e:
            error, payload[0] = e, ("error", str(e))
        except Exception as e:  # noqa: BLE001 - re-raised below on rank 0; the others need to know
            error, payload[0] = e, ("crash", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(payload, src=0, device=_CPU)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "ok":
        return value
    if status == "error":
        raise SelpruneError(value)
    raise SelpruneError(f"rank 0 failed ({value}); its traceback says why")
