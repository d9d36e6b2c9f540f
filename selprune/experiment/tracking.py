"""Experiment tracking: parameters, per-step metrics, tables and figures in MLflow,
TensorBoard or Weights & Biases, offline by design (issue #17).

The series parameter `tracker` ("none" by default) picks an adapter from `TRACKERS`. Each
writes under the folder it is given and never reaches the network, whatever the
environment says (the tracking URI, the mode and telemetry are set here, not inherited):

    mlflow       FOLDER/mlruns: MLflow's local file store, URI file:...; read it with
                 MlflowClient(tracking_uri=...) or `mlflow ui --backend-store-uri file:FOLDER/mlruns`
                 (MLflow >= 3.7 wants MLFLOW_ALLOW_FILE_STORE=true for it, set here for this process)
    tensorboard  FOLDER/tensorboard/NAME: event files (`tensorboard --logdir FOLDER/tensorboard`)
    wandb        FOLDER/wandb: W&B offline mode (`wandb sync` uploads it later, if ever)

One tracker run per unit of work, named after it:
- a series (FOLDER = its run_dir, the run named after that folder): the parameters; every
  pruning run's per-step metrics, prefixed by the run (`ff/forget_top1`, step = pruning
  step); after each series step (`log_results`, from `Series.write_results`) the key
  metrics, the results table and the figures under run_dir/figures; in a sweep, the
  point's leaderboard rows (`log_leaderboard`). The notebooks run in separate kernels,
  so each call reopens the series' tracker run (MLflow: found by name; TensorBoard: a new
  event file in the same folder; W&B: the same run id with resume).
- a pruning run outside a series (`selprune prune --out DIR`): a tracker run of its own in DIR.
What was logged already (figures, key metrics, rows) is remembered in FOLDER/tracking.json,
so a rewrite of results.json logs only what changed. Only rank 0 of a distributed run tracks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selprune.errors import SelpruneError

if TYPE_CHECKING:
    from selprune.experiment.config import Config
    from selprune.experiment.sweepfile import Sweep

STATE_FILE = "tracking.json"  # in the tracking folder: what was logged already
EXPERIMENT = "selprune"  # MLflow experiment / W&B project


def _require(module: str, tracker: str, package: str) -> Any:
    """Import a tracker's library, or say how to install it (imports stay lazy: a user who
    never tracks never needs, nor loads, any of these libraries)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SelpruneError(f"tracker={tracker} needs {package}, which is not installed; pip install {package} "
                            "(or pip install 'selprune[tracking]'), or set tracker=none") from e


def _number(v: Any) -> float | None:
    """A loggable metric value: finite numbers only (None and NaN mean "not reached")."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _rows(table: Any) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a DataFrame, a list of row dicts or a {column: values} dict."""
    if hasattr(table, "to_dict"):  # a DataFrame: NaN as None, so the JSON is valid
        table = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                 for row in table.to_dict(orient="records")]
    if isinstance(table, dict):
        table = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
    columns = list(dict.fromkeys(k for row in table for k in row))
    return columns, [[row.get(c) for c in columns] for row in table]


class Tracker:
    """The interface every adapter implements, and tracker "none": it does nothing."""

    def start(self, run_name: str, params: dict[str, Any], folder: Path) -> None:
        """Open (or reopen) the tracker run `run_name` under `folder` and log `params`."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics (name -> finite number) at one step."""

    def log_table(self, name: str, table: Any) -> None:
        """A table (DataFrame, row dicts or {column: values}); a later one of the same name replaces it."""

    def log_figure(self, path: Path) -> None:
        """An image file (PNG) under its file name."""

    def finish(self) -> None:
        """Close the run; everything is on disk afterwards."""


class MlflowTracker(Tracker):
    """MLflow's file store at FOLDER/mlruns, through MlflowClient with an explicit URI."""

    def start(self, run_name: str, params: dict[str, Any], folder: Path) -> None:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # offline: no usage reports to MLflow's servers
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow >= 3.7 refuses the file store without it
        tracking = _require("mlflow.tracking", "mlflow", "mlflow-skinny")
        self.entities = importlib.import_module("mlflow.entities")
        self.client = tracking.MlflowClient(tracking_uri=mlflow_uri(folder))
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)
        found = self.client.search_runs([exp_id], f"tags.`mlflow.runName` = '{run_name}'", max_results=1)
        if found:  # a series reopened by a later notebook: the same run, and only new parameters
            self.run_id, have = found[0].info.run_id, found[0].data.params
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id, have = self.client.create_run(exp_id, run_name=run_name).info.run_id, {}
        new = [self.entities.Param(k, str(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self.entities.Metric(_metric_name(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_table(self, name: str, table: Any) -> None:
        # log_dict replaces the file (MlflowClient.log_table would append rows to it); the
        # {"columns", "data"} layout is the one MLflow's own tables use
        columns, rows = _rows(table)
        self.client.log_dict(self.run_id, {"columns": columns, "data": rows}, f"tables/{name}.json")

    def log_figure(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), "figures")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_uri(folder: Path) -> str:
    """The file-store URI of a tracking folder (what MlflowClient(tracking_uri=...) reads)."""
    return (Path(folder) / "mlruns").resolve().as_uri()


def _metric_name(name: str) -> str:
    """MLflow accepts letters, digits, _ - . / and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


class TensorBoardTracker(Tracker):
    """Event files at FOLDER/tensorboard/RUN (torch's SummaryWriter); flushed every call,
    so a run that dies keeps its steps."""

    def start(self, run_name: str, params: dict[str, Any], folder: Path) -> None:
        board = _require("torch.utils.tensorboard", "tensorboard", "tensorboard")
        self.writer = board.SummaryWriter(log_dir=str(Path(folder) / "tensorboard" / run_name))
        self.writer.add_text("params", _markdown(["name", "value"], [[k, v] for k, v in params.items()]), 0)
        self.writer.flush()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_table(self, name: str, table: Any) -> None:
        self.writer.add_text(f"tables/{name}", _markdown(*_rows(table)), 0)
        self.writer.flush()

    def log_figure(self, path: Path) -> None:
        from matplotlib.image import imread

        image = imread(path)[..., :3]  # [height, width, 3] in [0, 1]: alpha dropped
        self.writer.add_image(f"figures/{Path(path).stem}", image, 0, dataformats="HWC")
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


def _markdown(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's text tab renders it)."""
    def cell(v: Any) -> str:
        return (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


class WandbTracker(Tracker):
    """W&B in offline mode at FOLDER/wandb; a reopened series resumes the same run id. W&B
    wants one increasing step per run, so each prefix (pruning run) gets its own step axis."""

    def start(self, run_name: str, params: dict[str, Any], folder: Path) -> None:
        os.environ["WANDB_MODE"] = "offline"  # never the network, whatever the environment said
        self.wandb = _require("wandb", "wandb", "wandb")
        run_id = hashlib.sha1(f"{Path(folder).resolve()}|{run_name}".encode()).hexdigest()[:16]
        self.run = self.wandb.init(project=EXPERIMENT, name=run_name, id=run_id, resume="allow", dir=str(folder),
                                   mode="offline", config=params)
        self.axes: set[str] = set()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        by_prefix: dict[str, dict[str, float]] = {}
        for k, v in metrics.items():
            by_prefix.setdefault(k.rpartition("/")[0], {})[k] = v
        for prefix, values in by_prefix.items():
            axis = f"{prefix}/step" if prefix else "step"
            if axis not in self.axes:
                self.run.define_metric(axis, hidden=True)
                self.run.define_metric(f"{prefix}/*" if prefix else "*", step_metric=axis)
                self.axes.add(axis)
            self.run.log({**values, axis: step})

    def log_table(self, name: str, table: Any) -> None:
        columns, rows = _rows(table)
        self.run.log({f"tables/{name}": self.wandb.Table(columns=columns, data=rows)})

    def log_figure(self, path: Path) -> None:
        self.run.log({f"figures/{Path(path).stem}": self.wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"none": Tracker, "mlflow": MlflowTracker, "tensorboard": TensorBoardTracker,
                                      "wandb": WandbTracker}


def open_tracker(tracker: str, run_name: str, params: dict[str, Any], folder: str | Path) -> Tracker:
    """A started tracker of kind `tracker` (a name of `TRACKERS`)."""
    if tracker not in TRACKERS:
        raise SelpruneError(f"tracker={tracker!r} is unknown; use one of {', '.join(TRACKERS)}")
    t = TRACKERS[tracker]()
    if tracker != "none":
        Path(folder).mkdir(parents=True, exist_ok=True)
        t.start(run_name, params, Path(folder))
    return t


@dataclass
class RunTracking:
    """A pruning run's tracking: its tracker and the prefix of its metric names."""

    tracker: Tracker
    prefix: str

    def record(self, record: dict[str, Any]) -> None:
        """Log one finished step's record: fractions pruned and forget / retain metrics."""
        metrics = {f"{self.prefix}fraction_{k}": v for k, v in record["fraction"].items()}
        metrics.update({f"{self.prefix}{side}_{k}": v for side in ("forget", "retain")
                        for k, v in record[side].items()})
        self.tracker.log_step(record["step"], {k: x for k, v in metrics.items() if (x := _number(v)) is not None})

    def finish(self) -> None:
        self.tracker.finish()


def series_name(cfg: Config) -> str:
    """The tracker run of a series: its folder's name (a sweep point's is the point's)."""
    return Path(cfg.run_dir).resolve().name


def for_pruning(cfg: Config, run: str, run_dir: str | Path) -> RunTracking:
    """The tracking of pruning run `run` in `run_dir`: the series' tracker run when the run
    lives in the series' folder (run_dir/<run>), else a run of its own in `run_dir`."""
    from selprune import distributed

    if cfg.tracker == "none" or not distributed.is_main():
        return RunTracking(Tracker(), "")
    in_series = Path(run_dir).resolve().parent == Path(cfg.run_dir).resolve()
    folder, name = (Path(cfg.run_dir), series_name(cfg)) if in_series else (Path(run_dir), run)
    params = asdict(cfg) if in_series else {**asdict(cfg), "run": run, "run_dir": str(run_dir)}
    return RunTracking(open_tracker(cfg.tracker, name, params, folder), f"{run}/")


def _state(folder: Path, tracker: str) -> dict[str, Any]:
    f = folder / STATE_FILE
    return (json.loads(f.read_text()) if f.exists() else {}).get(tracker, {})


def _save_state(folder: Path, tracker: str, state: dict[str, Any]) -> None:
    from selprune.paths import atomic_write_json

    f = folder / STATE_FILE
    everything = json.loads(f.read_text()) if f.exists() else {}
    atomic_write_json(f, {**everything, tracker: state})


def log_results(cfg: Config, results: dict[str, Any]) -> None:
    """After a series step (results.json rewritten): the key metrics that changed, the
    results table, and the figures under run_dir/figures that are new or rewritten."""
    from selprune import distributed
    from selprune.experiment.key_metrics import key_metrics
    from selprune.experiment.runs import RUN_KINDS
    from selprune.experiment.tables import results_table

    if cfg.tracker == "none" or not distributed.is_main():
        return
    folder = Path(cfg.run_dir)
    state = _state(folder, cfg.tracker)
    metrics = {f"key/{k}": x for k, v in key_metrics(results).items() if (x := _number(v["value"])) is not None} \
        if results.get("base") else {}
    changed = {k: v for k, v in metrics.items() if state.get("metrics", {}).get(k) != v}
    figures = {f.name: f"{f.stat().st_mtime_ns}:{f.stat().st_size}" for f in sorted((folder / "figures").glob("*.png"))}
    new_figures = [n for n, stamp in figures.items() if state.get("figures", {}).get(n) != stamp]
    pruning = {r: v["records"] for r, v in results.get("runs", {}).items() if not RUN_KINDS[r].method}
    table = results_table(pruning, {"forget": cfg.forget, "retain": cfg.retain}) if pruning else None
    table_key = hashlib.sha1(table.to_json().encode()).hexdigest() if table is not None else None
    if not changed and not new_figures and table_key == state.get("table"):
        return  # nothing new: no tracker run is reopened
    t = open_tracker(cfg.tracker, series_name(cfg), asdict(cfg), folder)
    if changed:
        t.log_step(0, changed)
    if table is not None and table_key != state.get("table"):
        t.log_table("results", table)
    for name in new_figures:
        t.log_figure(folder / "figures" / name)
    t.finish()
    _save_state(folder, cfg.tracker, {**state, "metrics": {**state.get("metrics", {}), **changed},
                                      "figures": figures, "table": table_key})


def log_leaderboard(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Each finished point's leaderboard rows into its series' tracker run: the rows as a
    table and each run's headline as a metric; a point whose rows are as logged is skipped."""
    from selprune.experiment.leaderboard import HEADLINE

    for pt in sweep.points:
        mine = [r for r in rows if r.get("point") == pt.name]
        if pt.cfg.tracker == "none" or not mine or pt.status() != "done":
            continue
        state = _state(pt.run_dir, pt.cfg.tracker)
        key = hashlib.sha1(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()
        if state.get("leaderboard") == key:
            continue
        t = open_tracker(pt.cfg.tracker, series_name(pt.cfg), asdict(pt.cfg), pt.run_dir)
        t.log_table("leaderboard", mine)
        t.log_step(0, {f"leaderboard/{r['run']}/{k}": x for r in mine for k in (HEADLINE, "rank")
                       if (x := _number(r.get(k))) is not None})
        t.finish()
        _save_state(pt.run_dir, pt.cfg.tracker, {**state, "leaderboard": key})
