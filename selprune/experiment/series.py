"""The notebook series over one run directory: one method per notebook step.

Each notebook builds a `Series` from its parameters cell and calls a few methods; each
method is a few lines over functions that live elsewhere (the loop, the relearning
experiment, tables, the explorer, results assembly). What later notebooks need is saved
in `run_dir`, so each notebook runs alone once its predecessors have:

    params.json                  the parameters (a rerun with other ones is refused)
    base.json                    metrics of the unpruned model (shared by every run)
    stats/{forget,retain}.safetensors   01: statistics of the unpruned model
    ff/ random/ attn/ attn_heads/ both/ 03, 04: resumable pruning runs
    pruned-model/                03: the FF-pruned model, loadable by plain transformers
    anamnesia.json               06: retraining curves and the anamnesia index
    ga/ graddiff/ npo/ npo_rt/ rmu/  07: gradient unlearning baselines (records, relearn.json)
    <run>/relearn.json           07: the relearning record of that run's output
    figures/*.png                every figure
    results.json                 everything above, summarised (rewritten by each step)
    timings.json                 the wall-clock seconds of every phase, kept apart
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from functools import cached_property
from typing import Any

import pandas as pd
import torch

from selprune.data import Data
from selprune.errors import SelpruneError
from selprune.evaluate import evaluate_both
from selprune.experiment import compare, explorer, tables, tracking
from selprune.experiment.compare import RELEARN_FILE, After, relearn_after, relearn_pruned, run_baseline
from selprune.experiment.config import DEFAULTS, FIELDS, Config, rename_aliases, resolve, stage_of, validate
from selprune.experiment.loop import data_for, run_pruning
from selprune.experiment.probes import extra_metrics
from selprune.experiment.progress import quiet_libraries
from selprune.experiment.relearning import ANAMNESIA_SELECTIVE, ARMS, anamnesia_from_runs, relearn_windows
from selprune.experiment.results import PROBES_FILE, finished_runs, write_results
from selprune.experiment.retrain import restored
from selprune.experiment.rundir import RunDir, slug
from selprune.experiment.runs import BASELINES, FLOOR, RUN_KINDS, probe_models, run_kind, runs_of_notebook
from selprune.masked import is_masked_lm
from selprune.models import check_window, load_model
from selprune.prune import export_pruned
from selprune.scoring import IMPORTANCE, score
from selprune.select import select
from selprune.selectivity import summarize
from selprune.sites import find_sites
from selprune.stats import ActivationStats, collect_stats

RERUN_SAFE = ("run_dir", "runs", "batch_size", "device", "tracker")  # may differ between calls on one run_dir
SIDES = ("forget", "retain")
COMPARED = ("ff", "both", FLOOR)  # the pruning runs notebook 07 puts beside the baselines


def lock_series(cfg: Config) -> RunDir:
    """The series' run directory, locked to `cfg` (params.json); old names are read as new."""
    rd = RunDir(cfg.run_dir)
    if rd.has("params.json"):  # a folder written before a rename records the old names
        have = rename_aliases(rd.read_json("params.json"), warn=lambda msg: None)
        rd.write_json("params.json", have) if have != rd.read_json("params.json") else None
    rd.lock(asdict(cfg), ignore=RERUN_SAFE, defaults=DEFAULTS)
    return rd


class Series:
    """One run directory of the notebook series, and the steps that fill it."""

    def __init__(self, progress: bool | None = None, preset: str | None = None, **params: Any) -> None:
        self.cfg = resolve(params, preset)  # every check before the run directory records anything
        self.p = asdict(self.cfg)
        # SELPRUNE_PROGRESS=0 silences progress bars (stored notebook outputs stay clean)
        self.progress = os.environ.get("SELPRUNE_PROGRESS", "1") != "0" if progress is None else progress
        self.rd = lock_series(self.cfg)
        self.run_dir = self.rd.path

    @classmethod
    def from_globals(cls, namespace: dict[str, Any]) -> Series:
        """Build from a notebook's namespace: the parameters cell defines every parameter."""
        missing = [k for k in FIELDS if k not in namespace]
        if missing:
            raise SelpruneError(f"the parameters cell lacks {missing}; restore it from the stored notebook "
                                "(make notebooks writes it)")
        return cls(**{k: namespace[k] for k in FIELDS})

    # ----------------------------------------------------------------- shared pieces
    @cached_property
    def model_and_tokenizer(self):
        with quiet_libraries(not self.progress):
            return load_model(self.cfg.model, self.cfg.dtype, self.cfg.device)

    @property
    def model(self) -> torch.nn.Module:
        return self.model_and_tokenizer[0]

    @property
    def tokenizer(self):
        return self.model_and_tokenizer[1]

    @cached_property
    def sites(self):
        return find_sites(self.model)

    @cached_property
    def data(self) -> Data:
        check_window(self.model, self.cfg.window)  # before any work: a window past the model's context
        with quiet_libraries(not self.progress):
            return data_for(self.cfg, self.tokenizer)

    @cached_property
    def base(self) -> dict[str, Any]:
        """Metrics of the unpruned model, computed once per run directory."""
        if not self.rd.has("base.json"):
            self.rd.write_json("base.json", evaluate_both(self.model, self.data, self.cfg.batch_size, self.progress))
        return self.rd.read_json("base.json")

    def active_runs(self) -> list[str]:
        return self.cfg.active_runs()

    def notebook_runs(self, notebook: str) -> list[str]:
        """The active runs that `notebook` (e.g. "03_prune_ffn.ipynb") does."""
        return runs_of_notebook(notebook, self.active_runs())

    def write_results(self) -> dict[str, Any]:
        results = write_results(self.cfg, self.rd, self.model)
        tracking.log_results(self.cfg, results)  # experiment tracking (#17): key metrics, tables, figures
        return results

    # ------------------------------------------------------------------- 01 collect
    def collect(self) -> tuple[ActivationStats, ActivationStats]:
        """01: statistics of the unpruned model on forget and retain (with a histogram for
        the mode), then results.json."""
        stats = self.statistics()
        self.write_results()
        return stats

    def statistics(self) -> tuple[ActivationStats, ActivationStats]:
        """The unpruned model's statistics: read from the run directory, or collected and saved."""
        out = []
        for side, windows in zip(SIDES, (self.data.forget_train, self.data.retain_train), strict=True):
            f = self.run_dir / "stats" / f"{side}.safetensors"
            if f.exists():
                st = ActivationStats.load(f)
                st.check_matches(self.sites, self.cfg.model)
            else:
                meta = {"model": self.cfg.model, "dataset": getattr(self.cfg, side), "split": "train",
                        "seed": self.cfg.seed, "dtype": str(self.model.dtype), "window": self.cfg.window}
                st = collect_stats(self.model, self.sites, windows, self.cfg.batch_size, hist_bins=64, meta=meta,
                                   progress=self.progress, desc=f"collect {side}")
                st.save(f)
            out.append(st)
        return out[0], out[1]

    # --------------------------------------------------------------------- 02 score
    def scores_by_importance(self) -> dict[str, dict[str, torch.Tensor]]:
        """02: scores under every importance function (rand included, as the floor)."""
        forget, retain = self.statistics()
        eps = {"ff": self.cfg.eps_ff, "attn": self.cfg.eps_attn}
        return {name: score(forget, retain, name, self.cfg.score, eps=eps, seed=self.cfg.seed)
                for name in sorted(IMPORTANCE)}

    def top_sets(self, scores: dict[str, dict[str, torch.Tensor]], kind: str, frac: float) -> dict[str, torch.Tensor]:
        return {name: select(s[kind], frac) for name, s in scores.items()}

    agreement = staticmethod(tables.agreement)

    # --------------------------------------------------------------- 03, 04 prune
    def prune(self, run: str) -> list[dict[str, Any]]:
        """03/04: run (or resume) one pruning run; the model is restored afterwards. A run
        kind that exports (ff) also writes the pruned model."""
        kind = run_kind(run)
        records, pruner = run_pruning(self.cfg, run, self.run_dir / run, self.model, self.tokenizer, self.data,
                                      self.progress, base=self.base, unpruned=self.statistics())
        try:
            if kind.exports:
                with quiet_libraries(not self.progress):  # transformers' "Writing model shards" bar
                    export_pruned(self.model, pruner, self.run_dir / "pruned-model", self.tokenizer)
        finally:
            pruner.restore()
        self.write_results()
        return records

    def records(self, run: str) -> list[dict[str, Any]] | None:
        return RunDir(self.run_dir / run).records() or None

    def finished_runs(self) -> dict[str, list[dict[str, Any]]]:
        return finished_runs(self.rd)

    # ------------------------------------------------------------------ 05 evaluate
    def summary(self, run: str) -> dict[str, Any]:
        """The run's selectivity summaries (`selectivity.summarize`)."""
        records = self.records(run)
        if not records:
            raise SelpruneError(f"run {run!r} has not been done in {self.run_dir}; run notebook "
                                f"{RUN_KINDS[run].notebook} first")
        return summarize(records)

    def results_table(self) -> pd.DataFrame:
        return tables.results_table(self.finished_runs(), {"forget": self.cfg.forget, "retain": self.cfg.retain})

    def generations(self, prompts: dict[str, str], run: str = "ff", max_new_tokens: int = 32) -> pd.DataFrame:
        return explorer.generations(self.model, self.tokenizer, prompts, RunDir(self.run_dir / run), run,
                                    max_new_tokens)

    def neuron_report(self, kind: str, layer: int, index: int, top: int = 5, context: int = 8) -> dict[str, Any]:
        """One neuron's statistics, rank and top snippets (read-only: writes nothing)."""
        forget, retain = self.statistics()
        windows = {"forget": self.data.forget_train[:4], "retain": self.data.retain_train[:4]}
        return explorer.neuron_report(self.model, self.tokenizer, self.sites, {"forget": forget, "retain": retain},
                                      windows, self.cfg.importance, kind, layer, index, top, context)

    # ---------------------------------------------------------------- 06 anamnesia
    def anamnesia(self, arms: tuple[str, ...] = ARMS, **variant: Any) -> dict[str, Any]:
        """06: relearn the selectively pruned model, a randomly pruned one with matched
        retain damage, and the unpruned control (or the `arms` named); reused if already
        in the run directory. `variant`: relearning parameters other than the series'
        (e.g. retrain_data="retain"), run the same way and stored apart
        (`anamnesia__NAME.json`)."""
        cfg, file = self._relearn_variant(variant, arms)
        if self.rd.has(file):
            return self.rd.read_json(file)
        validate(cfg, relearn=True)  # the retraining rules (selprune run checked them before 01)
        selective = next((r for r in ANAMNESIA_SELECTIVE if self.records(r)), None)
        if selective is None:
            raise SelpruneError(f"anamnesia needs a selective pruning run ({', '.join(ANAMNESIA_SELECTIVE)}); run "
                                "notebooks 03 and 04 first with one of them in `runs`")
        if not self.records(FLOOR):  # the control is needed even when `runs` left it out
            if cfg.ff_frac <= 0:
                raise SelpruneError("anamnesia's control is the random FF baseline, which needs ff_frac > 0")
            self.prune(FLOOR)
        small = self.data.with_eval_windows(max(1, cfg.retrain_eval_tokens // cfg.window))
        with quiet_libraries(not self.progress):
            train = relearn_windows(cfg, self.tokenizer, self.data)
        t0 = time.perf_counter()
        result = anamnesia_from_runs(self.model, small, cfg, self.run_dir / selective, self.run_dir / FLOOR, train,
                                     progress=self.progress, arms=arms)
        result.update(selective_run=selective, variant=variant, seconds=time.perf_counter() - t0)
        result["matching"].update(selective_run=selective, random_run=FLOOR)  # names, not paths
        self.rd.write_json(file, result)
        self.write_results()
        return result

    def _relearn_variant(self, variant: dict[str, Any], arms: tuple[str, ...]) -> tuple[Config, str]:
        """The configuration of a relearning variant and the file it is stored in."""
        other = sorted(k for k in variant if k not in FIELDS or stage_of(k) != "relearn")
        if other:
            raise SelpruneError(f"a relearning variant sets only relearning parameters; {other} are not (relearn "
                                f"parameters: {', '.join(k for k in FIELDS if stage_of(k) == 'relearn')})")
        parts = [f"{k}-{slug(v)}" for k, v in sorted(variant.items())]
        parts += [] if tuple(arms) == ARMS else ["arms-" + "_".join(arms)]
        if not parts:
            return self.cfg, "anamnesia.json"
        return resolve({**asdict(self.cfg), **variant}), "anamnesia__" + "__".join(parts) + ".json"

    anamnesia_table = staticmethod(tables.anamnesia_table)
    control_line = staticmethod(tables.control_line)

    # ------------------------------------------------------------ 07 compare methods
    def unlearn(self, run: str) -> list[dict[str, Any]]:
        """07: run (or reuse) the gradient unlearning baseline `run` (e.g. "npo") into its
        folder, and relearn its output under the protocol of 06; the model is put back."""
        records = run_baseline(self.cfg, run, self.run_dir / run, self.model, self.data, self.progress,
                               after=self._relearn_after, base=self.base)
        self.write_results()
        return records

    def compared(self) -> dict[str, list[dict[str, Any]]]:
        """07: the step records of the runs notebook 07 compares, done so far: the pruning
        runs of `COMPARED` (the floor among them) and every baseline (`BASELINES`)."""
        return {run: records for run in (*COMPARED, *BASELINES) if (records := self.records(run))}

    def relearned(self, run: str) -> dict[str, Any]:
        """07: the relearning record of any run's output (`relearning.relearn`): a
        baseline's from `unlearn`; a pruning run's last step relearned once (06's
        selective arm when it is that run's last step: the same protocol on the same model)."""
        rd = RunDir(self.run_dir / run)
        arm = self._anamnesia_arm(run)
        if arm is not None:
            return arm
        if not rd.has(RELEARN_FILE):
            if run_kind(run).method:
                self.unlearn(run)
            elif not self.records(run):
                raise SelpruneError(f"run {run!r} has not been done in {self.run_dir}; run notebook "
                                    f"{RUN_KINDS[run].notebook} first")
            else:
                relearn_pruned(rd.path, self.model, self._relearn_after)
                self.write_results()
        return rd.read_json(RELEARN_FILE)

    def _anamnesia_arm(self, run: str) -> dict[str, Any] | None:
        """06's selective arm if it relearned `run` at its last step, else None."""
        if not self.rd.has("anamnesia.json"):
            return None
        result = self.rd.read_json("anamnesia.json")
        arm = result["arms"].get("selective")
        last = len(self.records(run) or []) - 1
        return arm if arm and result.get("selective_run") == run and arm["pruned_step"] == last else None

    @cached_property
    def _relearn_after(self) -> After:
        """The relearning protocol of this series' parameters, on any model in place."""
        validate(self.cfg, relearn=True)
        small = self.data.with_eval_windows(max(1, self.cfg.retrain_eval_tokens // self.cfg.window))
        with quiet_libraries(not self.progress):
            train = relearn_windows(self.cfg, self.tokenizer, self.data)
        reference = evaluate_both(self.model, small, self.cfg.batch_size, self.progress)
        return relearn_after(self.cfg, small, train, reference, self.progress)

    methods_table = staticmethod(tables.methods_table)

    # ------------------------------------------------------ probes beyond accuracy
    def probe_all(self) -> dict[str, dict[str, Any]]:
        """05: the probes of each model `probes` names that this series has, by name; see `probes`."""
        if is_masked_lm(self.model):  # the probes generate and score next tokens: causal LMs only
            return {}
        names = [n for n in probe_models(self.cfg.probes) if n == "unpruned" or n in self.finished_runs()]
        return {n: self.probes(None if n == "unpruned" else n) for n in names}

    def probes_table(self) -> pd.DataFrame:
        """One row per probed model: code probe, membership AUCs, lm-eval accuracies."""
        return tables.probes_table(self.probe_all())

    def probes(self, run: str | None = None, **options: Any) -> dict[str, Any]:
        """The code probe and membership inference (and, with `humaneval_execute=True`,
        HumanEval) of the unpruned model (`run` None), a pruning run's last step (replayed)
        or a baseline's output (trained again, checked against its records), the model put
        back afterwards; stored once as `probes.json` in the
        run's folder (the series' for the unpruned model) and gathered into results.json.
        `options`: `experiment.probes.extra_metrics`'s."""
        rd = self.rd if run is None else RunDir(self.run_dir / run)
        kwargs = {"code_dataset": self.cfg.forget, "batch_size": self.cfg.batch_size,
                  "lm_eval_tasks": self.cfg.lm_eval_tasks, "lm_eval_limit": self.cfg.lm_eval_limit, **options}
        if rd.has(PROBES_FILE) and (stored := rd.read_json(PROBES_FILE)).get("options") == kwargs:
            return stored  # made with the same options
        with restored(self.model):
            if run is not None and not (records := self.records(run)):
                raise SelpruneError(f"probes need a finished run; {run!r} is not one in {self.run_dir}")
            if run is not None and run_kind(run).method:
                compare.reproduce_baseline(self.cfg, run, self.model, self.data, records)
            elif run is not None:
                rd.replay(self.model)
            out = {**extra_metrics(self.model, self.tokenizer, self.data, **kwargs), "options": kwargs}
        rd.write_json(PROBES_FILE, out)
        self.write_results()
        return out
