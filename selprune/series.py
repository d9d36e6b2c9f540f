"""The notebook series' steps over one run directory: one method per notebook.

Each notebook is thin: it builds a `Series` from its parameters cell and calls a few
methods. The methods save what later notebooks need into `run_dir`, so each notebook runs
alone once its predecessors have:

    params.json                  the parameters (a rerun with other ones is refused)
    base.json                    metrics of the unpruned model (shared by every run)
    stats/{forget,retain}.safetensors   01: statistics of the unpruned model
    ff/ random/ attn/ attn_heads/ both/ 03, 04: resumable pruning runs
    pruned-model/                03: the FF-pruned model, loadable by plain transformers
    anamnesia.json               06: retraining curves and the anamnesia index
    figures/*.png                every figure
    results.json                 everything above, summarised (rewritten by each step);
                                 identical for identical parameters and seed on CPU fp32
    timings.json                 the wall-clock seconds of every phase, kept apart

Parameters have one name each across the series; `PARAMS` holds them, their defaults
(sized so that the series runs in minutes on a 2-core CPU) and their help.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from selprune.errors import SelpruneError
from selprune.loop import (
    Data,
    PruneConfig,
    evaluate_both,
    forget_drop_at_retain_drop,
    prepare_data,
    relative_curves,
    run_pruning,
    selectivity_area,
)
from selprune.models import load_model, model_spec_kind, resolve_device, resolve_dtype
from selprune.param_args import coerce_value
from selprune.paths import atomic_write_json, read_json
from selprune.prune import export_pruned
from selprune.retrain import RetrainConfig, anamnesia_from_runs, replay_run
from selprune.scoring import IMPORTANCE, score
from selprune.select import select
from selprune.sites import find_sites
from selprune.stats import ActivationStats, collect_stats
from selprune.texts import check_dataset_spec

# name -> (default, help). One name per parameter across the CLI and every notebook.
PARAMS: dict[str, tuple[Any, str]] = {
    "model": ("smollm2-135m", "model shortcut, local HF directory, .gguf file, or hub id"),
    "forget": ("code", "dataset whose capability to remove (bundled name, local path, or hub:ORG/NAME)"),
    "retain": ("prose", "dataset whose capability to keep"),
    "ff_frac": (0.02, "fraction of all FF neurons pruned per step"),
    "attn_frac": (0.02, "fraction of all attention neurons pruned per step"),
    "steps": (5, "pruning steps"),
    "max_retain_drop": (None, "stop a run once retain top-1 has fallen by more than this fraction of its unpruned "
                              "value (e.g. 0.25); None runs every step"),
    "scoring": ("abs", "importance function: " + ", ".join(sorted(IMPORTANCE))),
    "ablation": ("zero", "zero, mean or peak"),
    "heads": ("mean", "how a whole attention head is scored from its neurons: mean or median"),
    "prune_mode": ("iterative", "iterative (re-collect and re-score after every step) or one-shot (score once, "
                                "prune the cumulative top)"),
    "selection": ("global", "global (top fraction across all layers) or per_layer (the same fraction in every layer)"),
    "collect_tokens": (1024, "tokens per dataset for each statistics collection"),
    "eval_tokens": (1024, "tokens per dataset for each evaluation"),
    "window": (256, "tokens per window"),
    "batch_size": (8, "windows per forward pass"),
    "dtype": ("auto", "auto, float32, bfloat16 or float16"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "seed": (0, "seed for the collection text's order and random choices (evaluation text is fixed)"),
    "retrain_steps": (16, "fine-tuning steps on forget text for the anamnesia index"),
    "retrain_lr": (1e-4, "fine-tuning learning rate (AdamW)"),
    "retrain_batch": (2, "windows per fine-tuning step"),
    "retrain_window": (128, "tokens per fine-tuning window"),
    "retrain_eval_tokens": (512, "tokens per dataset for each evaluation while retraining"),
    "runs": ("ff,random,attn,attn_heads", "pruning runs to do: ff, random, attn, attn_heads, both"),
    "run_dir": ("runs/default", "output folder"),
}

# pruning run name -> (PruneConfig overrides, kind of neuron it prunes). "both" prunes FF
# and attention neurons together in one run (ff_frac and attn_frac each step); its
# fraction axis is the FF one, and it runs only when both fractions are above 0.
RUNS: dict[str, tuple[dict[str, Any], str]] = {
    "ff": ({"attn_frac": 0.0}, "ff"),
    "random": ({"attn_frac": 0.0, "mode": "random"}, "ff"),
    "attn": ({"ff_frac": 0.0, "heads": None}, "attn"),
    "attn_heads": ({"ff_frac": 0.0}, "attn"),
    "both": ({"heads": None}, "ff"),
}
# the values of the parameters that map onto PruneConfig fields of other names
PRUNE_MODES = ("iterative", "one-shot")  # PruneConfig.mode ("random" is the random run's, not a choice here)
SELECTIONS = ("global", "per_layer")  # PruneConfig.per_layer
NOTEBOOKS = (
    "01_collect_activations.ipynb",
    "02_score_neurons.ipynb",
    "03_prune_ffn.ipynb",
    "04_prune_attention.ipynb",
    "05_evaluate.ipynb",
    "06_retraining_anamnesia.ipynb",
)
RERUN_SAFE = {"run_dir", "runs", "batch_size", "device"}  # may differ between calls on one run_dir


def coerce(name: str, value: Any) -> Any:
    """Turn a CLI/YAML/papermill value into the type of the parameter's default (a default
    of None means an optional number), by the same rule as `selprune prune`'s parameters."""
    if name not in PARAMS:
        raise SelpruneError(f"unknown parameter {name!r}; valid ones: {', '.join(PARAMS)}")
    default = PARAMS[name][0]
    return coerce_value(name, value, float | None if default is None else type(default))


def resolve_params(given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, types checked, unknown names refused."""
    unknown = sorted(set(given) - set(PARAMS))
    if unknown:
        raise SelpruneError(f"unknown parameters {unknown}; valid ones: {', '.join(PARAMS)}")
    p = {k: coerce(k, given.get(k, d)) for k, (d, _) in PARAMS.items()}
    bad = [r for r in p["runs"].split(",") if r and r not in RUNS]
    if bad:
        raise SelpruneError(f"unknown runs {bad}; choose among {', '.join(RUNS)}")
    for name, allowed in (("prune_mode", PRUNE_MODES), ("selection", SELECTIONS)):
        if p[name] not in allowed:
            raise SelpruneError(f"{name}={p[name]!r} is not one of {', '.join(allowed)}; pick one of those")
    if p["max_retain_drop"] is not None and not 0 < p["max_retain_drop"] <= 1:
        raise SelpruneError(f"max_retain_drop={p['max_retain_drop']} is outside (0, 1]; use e.g. 0.25 to stop once "
                            "retain top-1 fell by a quarter, or None to run every step")
    return p


def active_runs(p: dict[str, Any]) -> list[str]:
    """The runs asked for in `p["runs"]` whose neuron kinds all have a fraction above 0
    ("both" needs ff_frac and attn_frac; the others the fraction of their kind)."""
    frac = {"ff": p["ff_frac"], "attn": p["attn_frac"]}
    needs = {run: ("ff", "attn") if run == "both" else (kind,) for run, (_, kind) in RUNS.items()}
    return [r for r in p["runs"].split(",") if r and all(frac[k] > 0 for k in needs[r])]


def prune_config(p: dict[str, Any], run: str = "ff") -> PruneConfig:
    """The PruneConfig of one pruning run from resolved series parameters: the parameters
    named like PruneConfig fields, `prune_mode` -> mode, `selection` -> per_layer, then
    the run's own overrides (e.g. the random run's mode). A module function, so that a
    sweep checks every point's runs without building a Series (which makes folders)."""
    names = {f.name for f in fields(PruneConfig)}
    cfg = {k: v for k, v in p.items() if k in names}
    cfg["mode"] = p["prune_mode"]
    cfg["per_layer"] = p["selection"] == "per_layer"
    overrides, _ = RUNS[run]
    return PruneConfig(**{**cfg, **overrides})


RETAIN_DROPS = (0.05, 0.10, 0.20)  # where the forget drop at matched retain damage is read


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Selectivity summaries of one pruning run, for results.json and the leaderboard.

    The headline is `forget_drop_at_retain_drop["0.10"]`: the relative drop of forget
    top-1 where retain top-1 has dropped by 10% (interpolated along the run's curve).
    It is None when the run never got that far; `retain_drop_max` and `final_drop` then
    say how far it did get, so a missing number is never read as 0.
    """
    c = relative_curves(records)
    return {
        "selectivity_area": selectivity_area(records),
        "forget_drop_at_retain_drop": {f"{d:.2f}": forget_drop_at_retain_drop(records, d) for d in RETAIN_DROPS},
        "retain_drop_max": float(1 - c["retain"].min()),
        "final_drop": {side: float(1 - c[side][-1]) for side in ("forget", "retain")},
    }


def split_timings(obj: Any, path: str = "") -> tuple[Any, dict[str, Any]]:
    """Move every "seconds" entry out of a nested result, keyed by its path, so that
    results.json is identical between runs with the same parameters and seed (wall-clock
    times never are) while timings.json keeps them."""
    timings: dict[str, Any] = {}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "seconds":
                timings[path or "."] = v
                continue
            out[k], sub = split_timings(v, f"{path}/{k}")
            timings.update(sub)
        return out, timings
    if isinstance(obj, list):
        out_list = []
        for i, v in enumerate(obj):
            item, sub = split_timings(v, f"{path}/{i}")
            out_list.append(item)
            timings.update(sub)
        return out_list, timings
    return obj, timings


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Versions, device, dtype and git commit, for results.json."""
    import transformers

    import selprune

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "selprune": selprune.__version__, "git_commit": commit, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


class Series:
    """One run directory of the notebook series, and the steps that fill it."""

    def __init__(self, progress: bool | None = None, **params: Any) -> None:
        self.p = resolve_params(params)
        # SELPRUNE_PROGRESS=0 silences progress bars (stored notebook outputs stay clean)
        self.progress = os.environ.get("SELPRUNE_PROGRESS", "1") != "0" if progress is None else progress
        if not self.progress:  # libraries' own bars too (model loading, dataset reading)
            import datasets
            import transformers

            transformers.utils.logging.disable_progress_bar()
            datasets.disable_progress_bars()
        # fail on bad parameters before any heavy work, and before the run directory records them
        for name in ("ff_frac", "attn_frac"):  # checked here too: a negative one would switch its runs off
            if not 0 <= self.p[name] < 1:
                raise SelpruneError(f"{name}={self.p[name]} is outside [0, 1); use e.g. 0.02 for 2% per step")
        if not self.active_runs():
            raise SelpruneError(f"no pruning run has a fraction above 0 among runs={self.p['runs']!r}: "
                                "set ff_frac or attn_frac above 0")
        for run in self.active_runs():
            self.prune_config(run).validate()
        model_spec_kind(self.p["model"])
        for side in ("forget", "retain"):
            check_dataset_spec(self.p[side])
        if self.p["dtype"] != "auto":  # "auto" is resolved with the model (it may benchmark the CPU)
            resolve_dtype(self.p["dtype"])
        resolve_device(self.p["device"])
        self.run_dir = Path(self.p["run_dir"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_params()

    @classmethod
    def from_globals(cls, namespace: dict[str, Any]) -> Series:
        """Build from a notebook's namespace: the parameters cell defines every name in PARAMS."""
        missing = [k for k in PARAMS if k not in namespace]
        if missing:
            raise SelpruneError(f"the parameters cell lacks {missing}; restore it from the stored notebook")
        return cls(**{k: namespace[k] for k in PARAMS})

    def active_runs(self) -> list[str]:
        """The runs asked for in `runs` whose neuron kinds have a fraction above 0."""
        return active_runs(self.p)

    def _check_params(self) -> None:
        f = self.run_dir / "params.json"
        mine = {k: v for k, v in self.p.items() if k not in RERUN_SAFE}
        if f.exists():
            try:
                theirs = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise SelpruneError(f"{f} is corrupt ({e}); delete the run directory and start again") from e
            # a parameter added after the folder was made counts as its default there
            theirs = {k: v for k, v in {**{k: d for k, (d, _) in PARAMS.items()}, **theirs}.items()
                      if k not in RERUN_SAFE}
            if theirs != mine:
                diff = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine))
                        if theirs.get(k) != mine.get(k)}
                raise SelpruneError(f"run directory {self.run_dir} was made with other parameters {diff} (was, now); "
                                    "use a new run_dir, or delete this one")
        else:
            atomic_write_json(f, self.p)

    # ----------------------------------------------------------------- shared pieces
    @cached_property
    def model_and_tokenizer(self):
        return load_model(self.p["model"], self.p["dtype"], self.p["device"])

    @property
    def model(self) -> torch.nn.Module:
        return self.model_and_tokenizer[0]

    @property
    def tokenizer(self):
        return self.model_and_tokenizer[1]

    @cached_property
    def sites(self):
        return find_sites(self.model)

    def prune_config(self, run: str = "ff") -> PruneConfig:
        return prune_config(self.p, run)

    @cached_property
    def data(self) -> Data:
        return prepare_data(self.prune_config(), self.tokenizer)

    @cached_property
    def base(self) -> dict[str, Any]:
        """Metrics of the unpruned model, computed once per run directory."""
        f = self.run_dir / "base.json"
        if f.exists():
            return read_json(f)
        base = evaluate_both(self.model, self.data, self.p["batch_size"], self.progress)
        atomic_write_json(f, base)
        return base

    # ------------------------------------------------------------------- 01 collect
    def collect(self) -> tuple[ActivationStats, ActivationStats]:
        """Statistics of the unpruned model on forget and retain (with a histogram for the
        mode); reused if already in the run directory."""
        out = []
        for side in ("forget", "retain"):
            f = self.run_dir / "stats" / f"{side}.safetensors"
            if f.exists():
                st = ActivationStats.load(f)
                st.check_matches(self.sites, self.p["model"])
            else:
                windows = self.data.forget_train if side == "forget" else self.data.retain_train
                meta = {"model": self.p["model"], "dataset": self.p[side], "split": "train", "seed": self.p["seed"],
                        "dtype": str(self.model.dtype), "window": self.p["window"]}
                st = collect_stats(self.model, self.sites, windows, self.p["batch_size"], hist_bins=64, meta=meta,
                                   progress=self.progress, desc=f"collect {side}")
                st.save(f)
            out.append(st)
        self.write_results()
        return out[0], out[1]

    # --------------------------------------------------------------------- 02 score
    def scores_by_importance(self) -> dict[str, dict[str, torch.Tensor]]:
        """Scores under every importance function (rand included, as the floor)."""
        forget, retain = self.collect()
        eps = {"ff": self.prune_config().eps_ff, "attn": self.prune_config().eps_attn}
        return {name: score(forget, retain, name, eps=eps, seed=self.p["seed"]) for name in sorted(IMPORTANCE)}

    def top_sets(self, scores: dict[str, dict[str, torch.Tensor]], kind: str, frac: float) -> dict[str, torch.Tensor]:
        return {name: select(s[kind], frac) for name, s in scores.items()}

    @staticmethod
    def agreement(top: dict[str, torch.Tensor]) -> pd.DataFrame:
        """Jaccard overlap of the top sets chosen by each importance function."""
        names = list(top)
        rows = [[float((top[a] & top[b]).sum() / max(int((top[a] | top[b]).sum()), 1)) for b in names] for a in names]
        return pd.DataFrame(rows, index=names, columns=names)

    # --------------------------------------------------------------- 03, 04 prune
    def prune(self, run: str) -> list[dict[str, Any]]:
        """Run (or resume) one pruning run; the model is restored afterwards. The FF run
        also exports the pruned model."""
        if run not in RUNS:
            raise SelpruneError(f"unknown run {run!r}; choose among {', '.join(RUNS)}")
        cfg = self.prune_config(run)
        records, pruner = run_pruning(cfg, self.run_dir / run, self.model, self.tokenizer, self.data, self.progress,
                                      base=self.base)
        try:
            if run == "ff":
                export_pruned(self.model, pruner, self.run_dir / "pruned-model")
        finally:
            pruner.restore()
        self.write_results()
        return records

    def records(self, run: str) -> list[dict[str, Any]] | None:
        f = self.run_dir / run / "records.json"
        return read_json(f) if f.exists() else None

    def finished_runs(self) -> dict[str, list[dict[str, Any]]]:
        return {r: rec for r in RUNS if (rec := self.records(r))}

    # ------------------------------------------------------------------ 05 evaluate
    def summary(self, run: str) -> dict[str, Any]:
        """The run's selectivity summaries (see `summarize`)."""
        records = self.records(run)
        if not records:
            raise SelpruneError(f"run {run!r} has not been done in {self.run_dir}; run notebook 03/04 first")
        return summarize(records)

    def results_table(self) -> pd.DataFrame:
        """The paper-style table: base and final pruned metrics per run, with relative drops."""
        rows = []
        for run, records in self.finished_runs().items():
            base, last = records[0], records[-1]
            kind = RUNS[run][1]
            for side in ("forget", "retain"):
                row = {"run": run, "dataset": f"{side} ({self.p[side]})", "pruned": last["fraction"][kind]}
                for m in ("top1", "top10", "top1_skip", "top10_skip", "loss"):
                    row[f"base {m}"] = base[side][m]
                    row[m] = last[side][m]
                row["top1 drop %"] = 100 * (1 - last[side]["top1"] / max(base[side]["top1"], 1e-12))
                row["top1_skip drop %"] = 100 * (1 - last[side]["top1_skip"] / max(base[side]["top1_skip"], 1e-12))
                rows.append(row)
        return pd.DataFrame(rows)

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        tok = self.tokenizer
        ids = tok(prompt, return_tensors="pt").input_ids.to(self.model.device)
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def generations(self, prompts: dict[str, str], run: str = "ff", max_new_tokens: int = 32) -> pd.DataFrame:
        """Greedy continuations of each prompt before and after the run's pruning."""
        rows = [{"prompt": name, "model": "unpruned", "text": self.generate(p, max_new_tokens)} for name, p in prompts.items()]
        pruner = replay_run(self.model, self.run_dir / run, len(self.records(run) or [None]) - 1, self.sites)
        try:
            rows += [{"prompt": name, "model": f"pruned ({run})", "text": self.generate(p, max_new_tokens)}
                     for name, p in prompts.items()]
        finally:
            pruner.restore()
        return pd.DataFrame(rows)

    def neuron_report(self, kind: str, layer: int, index: int, top: int = 5, context: int = 8) -> dict[str, Any]:
        """One neuron: its statistics on forget and retain, its score rank, and the text
        snippets (from a few collection windows of each set) where it fires most."""
        forget, retain = self.collect()
        shape = self.sites.shape(kind)
        flat_per_layer = int(torch.Size(shape[1:]).numel())
        if not (0 <= layer < shape[0] and 0 <= index < flat_per_layer):
            raise SelpruneError(f"{kind} neuron ({layer}, {index}) is out of range: layers 0..{shape[0] - 1}, "
                                f"neurons 0..{flat_per_layer - 1}")
        s = score(forget, retain, self.p["scoring"])[kind]
        flat = s.reshape(-1)
        rank = int((flat > flat[layer * flat_per_layer + index]).sum()) + 1
        stats = {}
        for side, st in (("forget", forget), ("retain", retain)):
            stats[side] = {f: float(st.moment(kind, f).reshape(shape[0], -1)[layer, index])
                           for f in ("sum", "sum_abs", "sum_sq", "count_pos", "sum_sqrt")}
        snippets = []
        module = self.sites.modules(kind)[layer]
        for side, windows in (("forget", self.data.forget_train[:4]), ("retain", self.data.retain_train[:4])):
            acts = []
            handle = module.register_forward_pre_hook(lambda m, a, acts=acts: acts.append(a[0][..., index].float().cpu()))
            try:
                with torch.inference_mode():
                    self.model(input_ids=windows.to(self.model.device), use_cache=False)
            finally:
                handle.remove()
            a = acts[0]  # [batch, pos]
            for flat_i in a.reshape(-1).abs().argsort(descending=True, stable=True)[:top].tolist():
                w, pos = divmod(flat_i, a.shape[1])
                ids = windows[w, max(0, pos - context): pos + 1].tolist()
                snippets.append({"dataset": side, "activation": float(a[w, pos]),
                                 "text": self.tokenizer.decode(ids[:-1]) + "[[" + self.tokenizer.decode(ids[-1:]) + "]]"})
        return {"kind": kind, "layer": layer, "index": index, "score": float(flat[layer * flat_per_layer + index]),
                "rank": rank, "of": flat.numel(), "mean": {k: v["sum"] for k, v in stats.items()},
                "mean_abs": {k: v["sum_abs"] for k, v in stats.items()},
                "frac_positive": {k: v["count_pos"] for k, v in stats.items()},
                "snippets": pd.DataFrame(snippets)}

    # ---------------------------------------------------------------- 06 anamnesia
    def retrain_config(self) -> RetrainConfig:
        return RetrainConfig(lr=self.p["retrain_lr"], batch_size=self.p["retrain_batch"], steps=self.p["retrain_steps"],
                             window=self.p["retrain_window"], seed=self.p["seed"])

    def anamnesia(self) -> dict[str, Any]:
        """Retrain the FF-pruned model, a randomly pruned one with matched retain damage,
        and the unpruned one; reused if already in the run directory."""
        f = self.run_dir / "anamnesia.json"
        if f.exists():
            return read_json(f)
        selective = next((r for r in ("ff", "attn", "attn_heads") if self.records(r)), None)
        if selective is None:
            raise SelpruneError("anamnesia needs a selective pruning run (ff, attn or attn_heads); run notebooks "
                                "03 and 04 first with one of them in `runs`")
        if not self.records("random"):  # the control is needed even when `runs` left it out
            if self.p["ff_frac"] <= 0:
                raise SelpruneError("anamnesia's control is the random FF baseline, which needs ff_frac > 0")
            self.prune("random")
        d = self.data
        n_eval = max(1, self.p["retrain_eval_tokens"] // self.p["window"])
        small = Data(d.forget_train, d.retain_train, d.forget_test[:n_eval], d.retain_test[:n_eval], d.skip)
        t0 = time.perf_counter()
        result = anamnesia_from_runs(self.model, small, self.retrain_config(), self.run_dir / selective,
                                     self.run_dir / "random", progress=self.progress)
        result["selective_run"] = selective
        # run names, not paths: results.json must not depend on where the run directory is
        result["matching"].update(selective_run=selective, random_run="random")
        result["seconds"] = time.perf_counter() - t0
        atomic_write_json(f, result)
        self.write_results()
        return result

    @staticmethod
    def anamnesia_table(result: dict[str, Any]) -> pd.DataFrame:
        rows = []
        for arm, a in result["arms"].items():
            row = {"arm": arm, "pruned step": a["pruned_step"], "forget top1 at start": a["curve"][0]["forget"]["top1"],
                   "retain drop %": 100 * a["retain_drop"], "forget drop %": 100 * a["forget_drop"]}
            for q, v in a["index"].items():  # whole steps (interpolated between evaluations), or not reached
                row[f"steps to {float(q):.0%}"] = "not reached" if v["step"] is None else round(v["step"])
            row["recovery AUC"] = a["recovery_auc"]
            rows.append(row)
        return pd.DataFrame(rows)

    # -------------------------------------------------------------------- results
    def write_results(self) -> dict[str, Any]:
        """Assemble results.json from whatever the run directory holds so far."""
        runs = {}
        for run, records in self.finished_runs().items():
            runs[run] = {"config": asdict(self.prune_config(run)), "records": records, **self.summary(run)}
        an, base = self.run_dir / "anamnesia.json", self.run_dir / "base.json"
        results = {
            # not run_dir: where the run lives is no result (identical runs in two folders agree)
            "params": {k: v for k, v in self.p.items() if k != "run_dir"},
            "environment": environment(self.model),
            "base": read_json(base) if base.exists() else None,
            "runs": runs,
            "anamnesia": read_json(an) if an.exists() else None,
        }
        results, timings = split_timings(results)
        atomic_write_json(self.run_dir / "timings.json", timings)
        atomic_write_json(self.run_dir / "results.json", results)
        return results
