"""A run directory: the parameter lock, JSON files, and a pruning run's step files.

One implementation of each rule that every folder selprune writes follows:
- **the parameter lock** (`lock`): the first use records the parameters; a later use with
  other ones is refused, naming what differs, since mixing them would silently give
  results of no single configuration;
- **reading JSON** (`read_json`): an unreadable file is an error naming it and the fix;
- **step files and replay** (`save_step`, `load_step`, `replay`): a pruning run records
  each finished step atomically (first `step_NNN.safetensors`, then `records.json`), and
  replaying the files rebuilds the pruned model exactly, for resuming and for retraining.
Every write is atomic (`selprune.paths`), so a killed process leaves old files or new
ones, never half of one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

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
