"""A run directory: the parameter lock, JSON files, and a pruning run's step files.

One implementation of each rule that every folder selprune writes follows:
- **the parameter lock** (`lock`): the first use records the parameters; a later use with
  other ones is refused, naming what differs, since mixing them would silently give
  results of no single configuration;
- **reading JSON** (`read_json`): an unreadable file is an error naming it and the fix;
- **step files and replay** (`save_step`, `load_step`, `replay`): a pruning run records
  each finished step atomically (first `step_NNN.safetensors`, then `records.json`), and
  replaying the files rebuilds the pruned model exactly, for resuming and for retraining.
- **one writer** (`RunDir.hold`): a process writing a folder holds it, and a second
  selprune process is refused; the kernel drops the hold when the holder dies, even by
  SIGKILL, so nothing is left to clear;
- **write errors** (`write_error`, `write_errors`): a file that cannot be written (the
  output path is a file, a read-only folder, a full disk) is an error naming the file,
  why, and the fix.
Every write is atomic (`selprune.paths`), so a killed process leaves old files or new
ones, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the folder is still checked to be writable)
    fcntl = None  # type: ignore[assignment]

from selprune.errors import SelpruneError
from selprune.paths import atomic_write_bytes, atomic_write_json
from selprune.prune import Pruner
from selprune.sites import KINDS, NeuronSites

Step = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]  # (new masks, ablation values) per kind


def read_json(path: str | Path) -> Any:
    """Read a JSON file of a run directory; an unreadable one is a `SelpruneError` that
    names it and the fix (never a bare JSONDecodeError)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelpruneError(f"run file {path} is corrupt ({e}); delete the run directory and start again") from e


def param_diff(have: dict[str, Any], want: dict[str, Any], ignore: Iterable[str] = (),
               defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Name -> (recorded, now) for every parameter that differs, leaving out `ignore`.
    A name missing from `have` counts as its value in `defaults` (a parameter added after
    the folder was made had its default there)."""
    have = {**(defaults or {}), **have}
    ignore = set(ignore)
    return {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
            if k not in ignore and have.get(k) != want.get(k)}


def slug(value: Any) -> str:
    """A value as a file- or folder-name fragment: 0.005 -> '0.005', 'ff,random' -> 'ff_random'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "_"


class RunDir:
    """One folder of results (a series' run directory, or one pruning run inside it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def read_json(self, name: str) -> Any:
        return read_json(self.file(name))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.file(name), obj)

    # ---------------------------------------------------------------- the lock
    def lock(self, params: dict[str, Any], file: str = "params.json", ignore: Iterable[str] = (),
             defaults: dict[str, Any] | None = None, extendable: Iterable[str] = ()) -> None:
        """Record `params` in `file`, or refuse if the folder was made with other ones.

        `ignore`: parameters that may differ between uses (they do not change results);
        `extendable`: numbers that may grow (a rerun with more `steps` extends a run, and
        the recorded value is raised)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.has(file):
            self.write_json(file, params)
            return
        have = self.read_json(file)
        if not isinstance(have, dict):
            raise SelpruneError(f"run file {self.file(file)} is corrupt; delete the run directory and start again")
        diff = param_diff(have, params, {*ignore, *extendable}, defaults)
        if diff:
            raise SelpruneError(f"run directory {self.path} was made with other parameters {diff} (was, now); "
                                "use a new run directory, or delete this one")
        if any(params[k] > have.get(k, params[k]) for k in extendable):
            self.write_json(file, params)

    def hold(self) -> contextlib.AbstractContextManager[RunDir]:
        """Hold the folder for this process's writes, for a `with` block; a second selprune
        process that tries to hold it meanwhile is refused, naming it. Makes the folder, and
        refuses one that cannot be written (a file, read-only). Re-entrant in one process,
        and a no-op in a child whose parent holds the folder for it (`HELD_ENV`)."""
        return _hold(self)

    # ------------------------------------------------------- pruning-run files
    def records(self) -> list[dict[str, Any]]:
        """The step records (record 0: the unpruned model); [] before the first."""
        if not self.has("records.json"):
            return []
        records = self.read_json("records.json")
        if not isinstance(records, list) or [r.get("step") if isinstance(r, dict) else None
                                             for r in records] != list(range(len(records))):
            raise SelpruneError(f"run file {self.file('records.json')} is corrupt (not the records of steps 0, 1, "
                                "...); delete the run directory and start again")
        return records

    def save_records(self, records: list[dict[str, Any]]) -> None:
        self.write_json("records.json", records)

    def save_step(self, step: int, new: dict[str, torch.Tensor], values: dict[str, torch.Tensor | None]) -> None:
        tensors = {f"{k}.mask": m.to(torch.uint8).contiguous() for k, m in new.items()}
        tensors.update({f"{k}.values": v.contiguous() for k, v in values.items() if v is not None})
        atomic_write_bytes(self.file(f"step_{step:03d}.safetensors"), save(tensors))

    def load_step(self, step: int) -> Step:
        f = self.file(f"step_{step:03d}.safetensors")
        try:
            t = load_file(str(f))
            return {k: t[f"{k}.mask"].bool() for k in KINDS}, {k: t.get(f"{k}.values") for k in KINDS}
        except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
            raise SelpruneError(f"run file {f} is missing or corrupt ({e}); delete the run directory and start "
                                "again") from e

    def replay(self, model: nn.Module, step: int | None = None, sites: NeuronSites | None = None,
               pruner: Pruner | None = None) -> Pruner:
        """Prune `model` (unpruned, or as `pruner` left it) in place to the state after
        `step` (default: the last finished one), from the saved step files, exactly as
        the run made it. Returns the pruner (`restore()` undoes it)."""
        if not self.has("records.json"):
            raise SelpruneError(f"{self.path} is not a finished pruning run (no records.json); run the pruning first")
        done = len(self.records()) - 1
        step = done if step is None else step
        if not 0 <= step <= done:
            raise SelpruneError(f"run {self.path} has finished steps 0..{done}; cannot replay step {step}")
        pruner = pruner or Pruner(model, sites)
        for i in range(1, step + 1):
            new, values = self.load_step(i)
            for kind in KINDS:
                pruner.prune(kind, new[kind], values[kind])
        return pruner


# ------------------------------------------------------------------ one writer
LOCK_FILE = ".selprune.lock"
HELD_ENV = "SELPRUNE_HELD"  # folders a parent process holds for its children (kernels), os.pathsep-separated
_held: dict[Path, int] = {}  # the folders this process holds, and how many times


def held_by_parent(path: str | Path) -> bool:
    """Whether a parent process (`selprune run` for its kernels) holds `path` for this one."""
    return str(Path(path).resolve()) in os.environ.get(HELD_ENV, "").split(os.pathsep)


@contextlib.contextmanager
def _hold(rd: RunDir) -> Iterator[RunDir]:
    """`RunDir.hold`: an exclusive `flock` on LOCK_FILE inside the folder, for the block.
    A folder the hold made is removed again if the block fails before writing anything
    in it (a refused run leaves no trace)."""
    key = rd.path.resolve()
    if key in _held or held_by_parent(key):  # this process, or the parent that started it, holds it
        _held[key] = _held.get(key, 0) + 1
        try:
            yield rd
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    made = [d for d in (rd.path, *rd.path.parents) if not d.exists()]  # the folders the hold makes
    fd = _lock(rd)
    _held[key] = 1
    try:
        yield rd
    except BaseException:
        with contextlib.suppress(OSError):
            if made and [f.name for f in rd.path.iterdir()] == [LOCK_FILE]:
                rd.file(LOCK_FILE).unlink()
                for d in made:
                    d.rmdir()  # innermost first; stops at a folder that is not empty
        raise
    finally:
        del _held[key]
        os.close(fd)  # drops the lock


def _lock(rd: RunDir) -> int:
    """Make the folder, open its lock file and take the lock; the open descriptor."""
    for _ in range(10):
        try:
            rd.path.mkdir(parents=True, exist_ok=True)
            if not os.access(rd.path, os.W_OK | os.X_OK):  # before the lock file: nothing written in it
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(rd.path))
            fd = os.open(rd.file(LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise SelpruneError(write_error(e, rd.path) or f"cannot use {rd.path} ({e})") from e
        try:
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise SelpruneError(f"run directory {rd.path} is being written by another selprune process; wait "
                                    "for it to finish (or stop it), or use another run directory") from e
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(rd.file(LOCK_FILE)).st_ino:
                    return fd  # else a failed holder removed the file meanwhile: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise SelpruneError(f"cannot lock run directory {rd.path} (its {LOCK_FILE} keeps changing); try again")


# ---------------------------------------------------------------- write errors
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_TMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")  # selprune.paths' temporary name for NAME


def write_error(e: OSError, where: str | Path) -> str | None:
    """The message for `e` if it is a failure to write output under `where` (naming the
    file, why, and the fix), else None (an error of something else, e.g. reading a model)."""
    where = Path(where)
    file = _written_file(e)
    inside = file is not None and _is_within(file, where)
    if not inside and e.errno not in _FULL | {errno.EROFS}:
        return None
    file = file or where
    why = e.strerror or str(e)
    if e.errno in _FULL:
        fix = ("free disk space (or raise the file-size limit, ulimit -f) and run the same command again: "
               "finished work is kept and resumed")
    elif e.errno in _DENIED:
        fix = f"make {file if file.is_dir() else file.parent} writable, or choose another output folder (--out)"
    elif e.errno in (errno.EEXIST, errno.ENOTDIR) and (blocker := _file_in_the_way(file)) is not None:
        where_ = f"output folder {file} is a file" if blocker == file else f"cannot write {file}: {blocker} is a file"
        return f"{where_}, where a folder is needed; remove it, or choose another output folder (--out)"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = "a file stands where a folder is needed (or a folder where a file is); remove it, or choose " \
              "another output folder (--out)"
    else:
        fix = f"check {where}, or choose another output folder (--out)"
    return f"cannot write {file} ({why}); {fix}"


@contextlib.contextmanager
def write_errors(where: str | Path) -> Iterator[None]:
    """Inside the block, a failure to write output under `where` is a `SelpruneError`
    (`write_error`); any other OSError passes unchanged."""
    try:
        yield
    except OSError as e:
        msg = write_error(e, where)
        if msg is None:
            raise
        raise SelpruneError(msg) from e


def _written_file(e: OSError) -> Path | None:
    """The file `e` is about: its filename, else the `path` of the innermost atomic write
    it came from (a full disk fails in `write`, which names no file); temporary names are
    read as the file they stand for."""
    name = e.filename
    if name is None:
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "atomic_write_bytes" and "path" in tb.tb_frame.f_locals:
                name = tb.tb_frame.f_locals["path"]
            tb = tb.tb_next
    if name is None:
        return None
    path = Path(os.fsdecode(name))
    m = _TMP.match(path.name)
    return path.with_name(m["name"]) if m else path


def _file_in_the_way(path: Path) -> Path | None:
    """The first of `path` and its parents that exists and is not a folder, if any."""
    return next((p for p in (*reversed(path.parents), path) if p.exists() and not p.is_dir()), None)


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents
