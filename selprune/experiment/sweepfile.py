"""A sweep file: its schema, and the points it expands to (`selprune sweep`).

Which recipe unlearns most selectively is an empirical question: importance function,
step size, schedule, ablation, neuron kind and selection all matter, and one run says
little. A sweep runs the pruning notebooks once per *point* (a set of series
parameters) into its own run directory and ranks every pruning run by one number.

The sweep file (YAML)::

    out: runs/sweeps/default     # optional; `--out` overrides it
    base:                        # series parameters shared by every point
      ff_frac: 0.02
      max_retain_drop: 0.25
    variants:                    # optional; one point each, overriding some of base
      - name: paper              # optional; else made from the overrides
        runs: ff,random
      - {name: scoring-rms, scoring: rms}
      - {name: tune, lr: 1e-4, seeds: [0]}   # a variant's own seeds replace the file's
      - {name: best, relearn: true}          # and its own relearn: the file's
    grid:                        # optional; every combination, applied to each variant
      ff_frac: [0.01, 0.02]
    seeds: [0, 1, 2]             # optional; every point repeated with each seed
    keep_models: false           # optional; keep each point's pruned-model/ (~0.5 GB each)
    relearn: false               # optional; also run the relearning protocol (notebook 06's arms) on every point
    preset: paper                # optional; a named budget under base (selprune.experiment.config.PRESETS)

Variants suit one-factor-at-a-time designs (the paper's recipe, changed in one respect at a
time); `grid` gives full products. A variant's `seeds:` suits a staged design (tune a grid on
one seed, repeat the winners on every seed); its `relearn:` relearns only the points worth it.
Points are variants x grid combinations x seeds, named from their variant name, grid values
and seed (`scoring-rms`, `paper__ff_frac-0.01__seed-2`): stable across reruns, readable as folders.

Resuming and the leaderboard: `selprune.experiment.sweep`, `selprune.experiment.leaderboard`.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selprune.errors import SelpruneError
from selprune.experiment.compare import baseline_finished
from selprune.experiment.config import ALIASES, DEFAULTS, FIELDS, Config, rename_aliases, resolve
from selprune.experiment.relearning import ANAMNESIA_SELECTIVE
from selprune.experiment.rundir import param_diff, read_json, slug
from selprune.experiment.runs import RUN_KINDS
from selprune.experiment.series import RERUN_SAFE
from selprune.selectivity import should_stop

TOP_KEYS = ("out", "base", "variants", "grid", "seeds", "keep_models", "preset", "relearn")
LEADERBOARD_FILE, FIGURES_DIR = "leaderboard.csv", "figures"  # what the sweep writes beside its points
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Point:
    """One set of series parameters of a sweep, run into `cfg.run_dir`."""

    name: str
    cfg: Config  # resolved, run_dir included
    settings: dict[str, Any]  # what the point sets beyond base (variant, grid values, seed)
    relearn: bool = False  # the relearning protocol (notebook 06) runs after the pruning runs

    @property
    def params(self) -> dict[str, Any]:
        return asdict(self.cfg)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def runs(self) -> list[str]:
        return self.cfg.active_runs()

    @property
    def notebooks(self) -> tuple[str, ...]:
        """The pruning notebooks this point's runs need, in series order (with `relearn`,
        the relearning protocol runs after them in the sweep's process: notebook 06's
        default arms, without its plots and variant)."""
        return tuple(sorted({RUN_KINDS[r].notebook for r in self.runs}))

    def results(self) -> dict[str, Any] | None:
        """The point's results.json if it was made with the point's parameters, else None."""
        from selprune.experiment.notebooks import kernel_params

        f = self.run_dir / "results.json"
        if not f.exists():
            return None
        results = read_json(f)
        have = rename_aliases(results.get("params") or {}, warn=lambda msg: None)
        return None if param_diff(have, kernel_params(self.params), RERUN_SAFE, DEFAULTS) else results

    def status(self) -> str:
        """"done" (every run finished, same parameters, and relearned if `relearn`),
        "partial" (its folder exists) or "new"."""
        results = self.results()
        if results is not None and all(run_finished((results["runs"].get(r) or {}).get("records", []), self.cfg)
                                       for r in self.runs) and (not self.relearn or results.get("anamnesia")):
            return "done"
        return "partial" if self.run_dir.exists() else "new"


@dataclass
class Sweep:
    """A loaded, validated sweep file: its points and where they go."""

    source: str
    out: Path
    points: list[Point]
    varied: list[str]  # parameters whose value differs between points: the leaderboard's columns
    keep_models: bool = False
    relearn: bool = False  # every point also runs the relearning protocol
    failed: dict[str, str] = field(default_factory=dict)  # point name -> error, filled by run_sweep


def check_devices(sweep: Sweep, here: bool = True) -> None:
    """Refuse a sweep whose points ask for a device this machine lacks, before any point
    runs `here` (loading a sweep file leaves it to where the points run: `_check_point`;
    points submitted to a cluster check theirs there)."""
    from selprune.devices import resolve_device

    for pt in sweep.points if here else []:
        try:
            resolve_device(pt.cfg.device)
        except SelpruneError as e:
            raise SelpruneError(f"{sweep.source}: point {pt.name}: {e}") from e


def run_finished(records: list[dict[str, Any]], cfg: Config) -> bool:
    """Whether a run is over: a pruning run with all `steps` done or stopped by the loop's
    stop rule; a baseline (its records have `train_step`) at `unlearn_steps`."""
    if not records:
        return False
    if "train_step" in records[-1]:
        return baseline_finished(records, cfg)
    return len(records) - 1 >= cfg.steps or should_stop(records, cfg.max_retain_drop, cfg.stop_forget_top1)


def load_sweep(path: str | Path, out: str | Path | None = None, preset: str | None = None) -> Sweep:
    """Read and validate a sweep file, and expand its points.

    Every point is checked as far as it can be without loading a model (parameter names,
    types and values, every run's PruneConfig, that the model and datasets exist), so a
    typo fails here, not an hour into the sweep.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SelpruneError(f"cannot read sweep file {path} ({e.strerror or e}); check the path") from e
    except yaml.YAMLError as e:
        raise SelpruneError(f"sweep file {path} is not valid YAML ({' '.join(str(e).split())}); fix the syntax") from e
    return expand(spec, str(path), out, preset)


def expand(spec: Any, source: str = "sweep file", out: str | Path | None = None, preset: str | None = None) -> Sweep:
    """Validate a parsed sweep file (see the module docstring) and expand its points."""
    if not isinstance(spec, dict):
        raise SelpruneError(f"{source} must hold a mapping with keys {', '.join(TOP_KEYS)}; "
                            "start from sweeps/default.yaml")
    unknown = sorted(set(spec) - set(TOP_KEYS))
    if unknown:
        raise SelpruneError(f"{source}: unknown keys {unknown}; a sweep file has {', '.join(TOP_KEYS)} "
                            "(series parameters go under base:, variants: or grid:)")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SelpruneError(f"{source}: base must be a mapping of parameter names to values, e.g. base: {{steps: 10}}")
    _check_names(base, f"{source}: base")
    base = rename_aliases(base)
    preset = preset if preset is not None else spec.get("preset")
    variants = _variants(spec.get("variants"), source)
    grid = _grid(spec.get("grid"), source)
    seeds = _seeds(spec.get("seeds"), source)
    keep, relearn = spec.get("keep_models", False), spec.get("relearn", False)
    for key, value in (("keep_models", keep), ("relearn", relearn)):
        if not isinstance(value, bool):
            raise SelpruneError(f"{source}: {key}={value!r}; write true or false")
    out_spec = out if out is not None else spec.get("out")
    if out_spec is None:
        out_spec = Path("runs") / "sweeps" / (Path(source).stem if source.endswith((".yaml", ".yml")) else "sweep")
    if not isinstance(out_spec, (str, Path)) or not str(out_spec).strip():
        raise SelpruneError(f"{source}: out={out_spec!r}; give a folder path, e.g. out: runs/sweeps/mine")
    out_dir = Path(out_spec).expanduser()

    _check_overlaps(variants, grid, seeds, source)
    points: list[Point] = []
    axes = list(grid)
    cells = [(v, combo, seed) for v, combo in itertools.product(variants, itertools.product(*grid.values()))
             for seed in next(s for s in (v.seeds, seeds, [None]) if s is not None)]  # a variant's seeds first
    for v, combo, seed in cells:
        vname, overrides, point_relearn = v.name, v.overrides, relearn if v.relearn is None else v.relearn
        parts = [vname] if vname else []
        parts += [f"{a}-{slug(v)}" for a, v in zip(axes, combo, strict=True)]
        parts += [f"seed-{seed}"] if seed is not None else []
        name = "__".join(parts) or "base"
        settings = {**overrides, **dict(zip(axes, combo, strict=True)), **({"seed": seed} if seed is not None else {})}
        given = {**base, **settings, "run_dir": str(out_dir / name)}
        cfg = _check_point(given, preset, point_relearn, f"{source}: point {name!r}")
        if point_relearn and not set(cfg.active_runs()) & set(ANAMNESIA_SELECTIVE):
            raise SelpruneError(f"{source}: point {name!r} relearns, but its runs ({cfg.runs}) have no selective pruning "
                                f"run for the protocol ({', '.join(ANAMNESIA_SELECTIVE)}); add one or set relearn: false")
        points.append(Point(name, cfg, settings, point_relearn))

    _check_out(out_dir, [pt.name for pt in points], source)
    varied = [k for k in FIELDS if k != "run_dir" and len({repr(p.params[k]) for p in points}) > 1]
    return Sweep(source, out_dir, points, varied, keep, relearn)


def _check_overlaps(variants: list[Variant], grid: dict[str, list[Any]], seeds: list[int] | None, source: str) -> None:
    """No parameter is set by a variant and varied by grid or seeds at once."""
    for v in variants:
        for axis in grid:
            if axis in v.overrides:
                raise SelpruneError(f"{source}: variant {v.name!r} sets {axis}, which grid also varies; "
                                    "remove it from one of them")
        if (seeds is not None or v.seeds is not None) and "seed" in v.overrides:
            raise SelpruneError(f"{source}: variant {v.name!r} sets seed, which seeds also varies; "
                                "remove it from one of them")
    if seeds is not None and "seed" in grid:
        raise SelpruneError(f"{source}: seeds and grid both vary seed; keep one")


def _check_out(out: Path, names: list[str], source: str) -> None:
    """What the sweep writes under `out` can be written: one folder per point name, `out`
    is no file, leaderboard.csv and figures/ are not taken by something else, and every
    point's folder name is one the file system allows (checked now, not when the point's
    turn comes)."""
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise SelpruneError(f"{source}: two points are both named {twice!r} (and would share a run directory); "
                            "give the variants distinct names")
    fix = "remove or rename it, or choose another out (--out)"
    if out.exists() and not out.is_dir():
        raise SelpruneError(f"{source}: out {out} is a file, not a folder; {fix}")
    for name, want_dir in ((LEADERBOARD_FILE, False), (FIGURES_DIR, True)):
        f, what = out / name, "figures folder" if want_dir else "leaderboard file"
        if f.exists() and f.is_dir() != want_dir:
            raise SelpruneError(f"{source}: {f} is a {'file' if want_dir else 'folder'}, where the sweep writes its "
                                f"{what}; {fix}")
        if name in names:
            raise SelpruneError(f"{source}: point {name!r} would have the folder {f}, the sweep's own {what}; "
                                "give the variant another name")
    limit = _name_max(out)
    for name in names:
        size = len(os.fsencode(name))
        if size > limit:
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise SelpruneError(f"{source}: point {shown!r} has a folder name of {size} bytes, longer than the "
                                f"file system allows ({limit}); give its variant a short name (name: ...), or vary "
                                "fewer parameters in the grid")


def _name_max(out: Path) -> int:
    """The longest file name the file system under `out` (or its nearest existing parent) allows."""
    folder = next((d for d in (out, *out.absolute().parents) if d.is_dir()), Path("."))
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the common limit
        return 255


def _check_names(params: dict[str, Any], where: str) -> None:
    if "run_dir" in params:
        raise SelpruneError(f"{where} sets run_dir, but the sweep puts every point in its own folder under out; "
                            "remove run_dir (set out: or --out instead)")
    unknown = sorted(k for k in params if k not in FIELDS and k not in ALIASES)
    if unknown:
        raise SelpruneError(f"{where}: unknown parameters {unknown}; valid ones: {', '.join(FIELDS)}")


@dataclass(frozen=True)
class Variant:
    """One entry of `variants:`: name, overrides, and its own seeds and relearn (None: the file's)."""

    name: str
    overrides: dict[str, Any]
    seeds: list[int] | None = None
    relearn: bool | None = None


VARIANT_KEYS = ("name", "seeds", "relearn")  # a variant's keys that are no series parameters


def _variants(raw: Any, source: str) -> list[Variant]:
    """The variants; one unnamed, empty variant when there are none."""
    if raw is None:
        return [Variant("", {})]
    if not isinstance(raw, list) or not raw:
        raise SelpruneError(f"{source}: variants must be a non-empty list of mappings, e.g. "
                            "variants: [{name: scoring-rms, scoring: rms}]")
    out = []
    for i, v in enumerate(raw, 1):
        if not isinstance(v, dict):
            raise SelpruneError(f"{source}: variant {i} is {v!r}, not a mapping; write e.g. {{name: rms, scoring: rms}}")
        overrides = {k: val for k, val in v.items() if k not in VARIANT_KEYS}
        name = v.get("name")
        if name is None:
            name = "__".join(f"{k}-{slug(val)}" for k, val in overrides.items()) or "base"
        if not isinstance(name, str) or not _NAME.match(name):
            raise SelpruneError(f"{source}: variant {i} has name {name!r}; use letters, digits, '.', '_' and '-' "
                                "(it names the point's folder)")
        where = f"{source}: variant {name!r}"
        _check_names(overrides, where)
        relearn = v.get("relearn")
        if relearn is not None and not isinstance(relearn, bool):
            raise SelpruneError(f"{where}: relearn={relearn!r}; write true or false")
        out.append(Variant(name, rename_aliases(overrides), _seeds(v.get("seeds"), where), relearn))
    return out


def _grid(raw: Any, source: str) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SelpruneError(f"{source}: grid must map parameter names to lists of values, e.g. grid: {{scoring: [abs, rms]}}")
    _check_names(raw, f"{source}: grid")
    raw = rename_aliases(raw)
    for axis, values in raw.items():
        if not isinstance(values, list) or not values:
            raise SelpruneError(f"{source}: grid axis {axis} is {values!r}; give a non-empty list, e.g. {axis}: [a, b]")
        if len({repr(v) for v in values}) != len(values):
            raise SelpruneError(f"{source}: grid axis {axis} repeats a value in {values}; list each value once")
    return raw


def _seeds(raw: Any, source: str) -> list[int] | None:
    if raw is None:
        return None
    if (not isinstance(raw, list) or not raw or any(not isinstance(s, int) or isinstance(s, bool) for s in raw)
            or len(set(raw)) != len(raw)):
        raise SelpruneError(f"{source}: seeds is {raw!r}; give a list of distinct integers, e.g. seeds: [0, 1, 2]")
    return raw


def _check_point(given: dict[str, Any], preset: str | None, relearn: bool, where: str) -> Config:
    """Resolve and check one point's parameters without loading anything heavy (with
    `relearn`, the retraining rules too). Whether this machine has the point's device is
    left to where the point runs: a GPU sweep is planned (`--dry-run`) or submitted to a
    cluster from a machine without one; each point checks its device when it starts."""
    try:
        return resolve(given, preset, relearn=relearn, check_device=False)
    except SelpruneError as e:
        raise SelpruneError(f"{where}: {e}") from e
