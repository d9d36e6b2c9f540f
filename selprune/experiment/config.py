"""The one parameter schema: every user-facing parameter, declared once.

Each field of `Config` carries its default, its type (the annotation), the values it
allows, a one-line help and the *stage* that uses it. Everything else is derived from
here: the options and `--help` of `selprune run`, `prune` and `sweep`, validation
(`validate`, one message style: "NAME=VALUE is ...; fix"), the objects the loop and the
retraining receive, each notebook's parameters cell and the README's parameter table
(`selprune.experiment.render`). Adding a parameter is one field below plus its use.

Defaults are sized for a 2-core laptop CPU (the whole series in minutes). Bigger budgets
are named presets (`PRESETS`, e.g. `--preset paper`), never other defaults per command.
Old names are accepted for one release with a note (`ALIASES`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selprune.errors import SelpruneError
from selprune.experiment.runs import RUN_KINDS, parse_runs, probe_models_problem
from selprune.experiment.tracking import TRACKERS
from selprune.prune import ABLATIONS
from selprune.scoring import DEFAULT_EPS, IMPORTANCE, SCORES
from selprune.select import HEAD_REDUCERS
from selprune.vision import check_image_pair

# stage -> what it is; each parameter belongs to one, and each command uses some stages
STAGES = {
    "setup": "model, numbers and hardware",
    "data": "forget and retain token windows",
    "score": "importance and score of every neuron",
    "prune": "which neurons go, and when a run stops",
    "relearn": "retraining on forget text (anamnesia index, notebook 06)",
    "unlearn": "the gradient unlearning baselines (GA, GradDiff, NPO, NPO+RT, RMU)",
    "probe": "the probes beyond next-token accuracy (notebook 05): code probe, membership, lm-eval tasks",
    "series": "which pruning runs, and where they go",
}
Check = Callable[[Any], str | None]  # value -> what is wrong with it (None: fine)


def param(default: Any, help: str, stage: str, *, choices: Callable[[], list[str]] | tuple[str, ...] | None = None,
          check: Check | None = None) -> Any:
    """A `Config` field with its schema metadata (see the module docstring)."""
    assert stage in STAGES, stage
    return field(default=default, metadata={"help": help, "stage": stage, "choices": choices, "check": check})


def at_least(lo: float, hint: str = "") -> Check:
    return lambda v: None if v is not None and v >= lo else f"is below {lo}{hint}; use {lo} or more"


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, hint: str = "") -> Check:
    """A finite number in the interval (`lo_open`: excludes lo; `hi_open`: excludes hi)."""
    def check(v: Any) -> str | None:
        if v is None:
            return None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        return None if ok else f"is outside {interval}{hint}"
    return check


def positive(hint: str = "") -> Check:
    return lambda v: None if v is not None and math.isfinite(v) and v > 0 else f"must be a positive number{hint}"


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes [0, 2^63)


@dataclass
class Config:
    """Every parameter of a series, a pruning run or a sweep point (see the module docstring)."""

    model: str = param("smollm2-135m", "model shortcut, local HF directory, .gguf file, or hub id", "setup")
    forget: str = param("code", "dataset whose capability to remove (bundled name, local path, or hub:ORG/NAME)",
                        "data")
    retain: str = param("prose", "dataset whose capability to keep", "data")
    ff_frac: float = param(0.02, "fraction of all FF neurons pruned per step", "prune",
                           check=within(0, 1, hi_open=True, hint="; use e.g. 0.02 for 2% per step"))
    attn_frac: float = param(0.02, "fraction of all attention neurons pruned per step", "prune",
                             check=within(0, 1, hi_open=True, hint="; use e.g. 0.02 for 2% per step"))
    steps: int = param(5, "pruning steps", "prune", check=at_least(1))
    max_retain_drop: float | None = param(
        None, "stop a run once retain top-1 has fallen by more than this fraction of its unpruned value (e.g. 0.25); "
        "None runs every step", "prune",
        check=within(0, 1, lo_open=True, hint="; use e.g. 0.25, or None to run every step"))
    stop_forget_top1: float | None = param(
        None, "stop a run once forget top-1 has fallen below this accuracy; None: no such stop", "prune",
        check=within(0, 1, lo_open=True, hint="; it is an accuracy, e.g. 0.05, or None"))
    importance: str = param("abs", "importance function I(D, n) of a neuron on a dataset", "score",
                            choices=lambda: sorted(IMPORTANCE))
    score: str = param("ratio", "score function: ratio, I(forget) / (I(retain) + eps); or mean_diff, "
                       "|mean(forget) - mean(retain)|", "score", choices=lambda: sorted(SCORES))
    eps_ff: float = param(DEFAULT_EPS["ff"], "eps of the ratio score for FF neurons", "score",
                          check=positive("; the reference value is 1e-3"))
    eps_attn: float = param(DEFAULT_EPS["attn"], "eps of the ratio score for attention neurons", "score",
                            check=positive("; the reference value is 1e-4"))
    ablation: str = param("zero", "what a pruned neuron outputs: zero, its mean, or its peak (mode) on retain",
                          "prune", choices=lambda: sorted(ABLATIONS))
    heads: str = param("mean", "how the attn_heads run scores a whole attention head from its neurons", "prune",
                       choices=lambda: sorted(HEAD_REDUCERS))
    prune_mode: str = param("iterative", "iterative (re-collect and re-score after every step) or one-shot (score "
                            "once, prune the cumulative top)", "prune", choices=("iterative", "one-shot"))
    selection: str = param("global", "global (top fraction across all layers) or per_layer (the same fraction in "
                           "every layer)", "prune", choices=("global", "per_layer"))
    collect_tokens: int = param(1024, "tokens per dataset for each statistics collection", "data", check=at_least(1))
    eval_tokens: int = param(1024, "tokens per dataset for each evaluation", "data", check=at_least(1))
    skip_k: int = param(50, "the skip accuracies leave out targets among each dataset's skip_k most frequent tokens",
                        "data", check=at_least(0))
    window: int = param(256, "tokens per window", "data", check=at_least(2, " (one input and one target token)"))
    batch_size: int = param(8, "windows per forward pass (raise it on a GPU until memory runs short)", "setup",
                            check=at_least(1))
    dtype: str = param("auto", "weights' dtype: auto (bf16 on CUDA, else float32), float32, bfloat16 or float16",
                       "setup", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = param("auto", "auto, cpu, cuda, cuda:N or mps", "setup")
    seed: int = param(0, "seed for the collection text's order and random choices (evaluation text is fixed)", "setup",
                      check=lambda v: None if 0 <= v < SEED_LIMIT else "is outside [0, 2^63); use e.g. 0, 1, 2")
    retrain_steps: int = param(8, "fine-tuning steps on forget text for the anamnesia index", "relearn",
                               check=at_least(1))
    retrain_lr: float = param(6e-5, "fine-tuning learning rate (AdamW)", "relearn", check=positive("; e.g. 1e-5"))
    retrain_batch: int = param(1, "windows per fine-tuning step", "relearn", check=at_least(1))
    retrain_window: int = param(128, "tokens per fine-tuning window (at most window)", "relearn",
                                check=at_least(2, " (one input and one target token)"))
    retrain_tokens: int = param(8192, "tokens of relearning text (windows of retrain_window); steps x batch x "
                                "window beyond it repeat the text", "relearn", check=at_least(2))
    retrain_eval_tokens: int = param(512, "tokens per dataset for each evaluation while retraining", "relearn",
                                     check=at_least(1))
    retrain_data: str = param("forget", "what the model relearns from: forget (forget-train text, starting with what "
                              "pruning saw), forget-unseen (forget-train documents the collection never touched), or "
                              "retain (ordinary fine-tuning on retain-train text)", "relearn",
                              choices=lambda: list(_relearn_data()))
    retrain_mode: str = param("full", "full fine-tuning, or lora (low-rank adapters on every linear layer, merged "
                              "after training)", "relearn", choices=("full", "lora"))
    retrain_hold_pruned: bool = param(True, "keep pruned neurons at zero while retraining (false: free to regrow)",
                                      "relearn")
    lora_r: int = param(8, "LoRA rank (retrain_mode lora)", "relearn", check=at_least(1))
    lora_alpha: float = param(16.0, "LoRA scaling alpha (retrain_mode lora)", "relearn", check=positive())
    unlearn_steps: int = param(8, "optimizer steps of a gradient unlearning baseline", "unlearn", check=at_least(1))
    unlearn_lr: float | None = param(
        None, "a baseline's learning rate (AdamW); None: the method's default (selprune.unlearning.METHODS)",
        "unlearn", check=lambda v: None if v is None else positive("; e.g. 1e-5, or None for the method's default")(v))
    unlearn_batch: int = param(1, "forget windows (and as many retain windows) per baseline step", "unlearn",
                               check=at_least(1))
    unlearn_checkpoints: int = param(4, "evaluations of forget and retain during a baseline's training, evenly "
                                     "spaced, the last at unlearn_steps", "unlearn", check=at_least(1))
    retain_weight: float = param(1.0, "weight of the retain loss of graddiff and npo_rt", "unlearn",
                                 check=within(0, math.inf, hi_open=True, hint="; use e.g. 1.0"))
    npo_beta: float = param(0.1, "NPO's inverse temperature beta", "unlearn", check=positive("; the paper uses 0.1"))
    rmu_layer: int | None = param(None, "RMU's layer (0-based block index); None: round(7/32 of the layers), the "
                                  "paper's depth", "unlearn",
                                  check=lambda v: None if v is None or v >= 0 else "is negative; use 0 or more, or None")
    rmu_coeff: float | None = param(
        None, "RMU's steering coefficient c; None: 2 x the mean forget-token norm at rmu_layer (measured)", "unlearn",
        check=lambda v: None if v is None else positive("; or None for the measured default")(v))
    rmu_alpha: float = param(100.0, "weight of RMU's retain activation loss", "unlearn",
                             check=within(0, math.inf, hi_open=True, hint="; use e.g. 100"))
    rmu_layers: int = param(3, "how many layers up to rmu_layer have their MLP output projection updated by RMU",
                            "unlearn", check=at_least(1))
    # probes beyond next-token accuracy (#17): selprune.experiment.probes
    probes: str = param("unpruned,ff,random", "models notebook 05 probes (the code probe, membership inference "
                        "and lm_eval_tasks): unpruned and pruning runs' last steps, comma-separated; empty: none",
                        "probe", check=probe_models_problem)
    lm_eval_tasks: str = param("", "lm-eval tasks of the probes, comma-separated: the shipped offline "
                               "selprune_code_next_line and selprune_prose_next_sentence, or lm-eval's own "
                               "(hellaswag, arc_easy, piqa, mmlu, wmdp_cyber: need a network); needs `pip install "
                               "lm-eval`; empty: none", "probe")
    lm_eval_limit: int | None = param(50, "documents per lm-eval task (None: all of them)", "probe",
                                      check=lambda v: None if v is None or v >= 1 else
                                      "is below 1; use a positive number of documents, or None for all")
    runs: str = param("ff,random,attn,attn_heads,both,ga,graddiff,npo,rmu", "runs to do: pruning runs and gradient "
                      "unlearning baselines, among " + ", ".join(RUN_KINDS), "series")
    run_dir: str = param("runs/default", "output folder", "series")
    # experiment tracking (#17): offline, under run_dir (selprune.experiment.tracking)
    tracker: str = param("none", "experiment tracker of parameters, per-step metrics, tables and figures, written "
                         "offline under run_dir: none, mlflow (file store run_dir/mlruns), tensorboard "
                         "(run_dir/tensorboard) or wandb (offline mode, run_dir/wandb)", "series",
                         choices=lambda: list(TRACKERS))

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def active_runs(self) -> list[str]:
        """The runs in `runs` whose neuron kinds all have a fraction above 0."""
        frac = {"ff": self.ff_frac, "attn": self.attn_frac}
        return [r for r in parse_runs(self.runs) if all(frac[k] > 0 for k in RUN_KINDS[r].kinds)]


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
DEFAULTS: dict[str, Any] = {name: f.default for name, f in FIELDS.items()}
HINTS: dict[str, Any] = typing.get_type_hints(Config)
# Presets: named budgets on top of the defaults (then the file, then -p, override them).
PRESETS: dict[str, dict[str, Any]] = {
    # the paper's budgets: 1e5 tokens per collection and evaluation, ten 2% steps
    "paper": {"collect_tokens": 100_000, "eval_tokens": 100_000, "steps": 10},
}
# old name -> (new name, value map); accepted until 0.3, with a note
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "scoring": ("importance", lambda v: v),
    "mode": ("prune_mode", lambda v: v),
    "per_layer": ("selection", lambda v: "per_layer" if v is True else "global" if v is False else v),
}


def _relearn_data() -> dict[str, Any]:
    from selprune.experiment.relearning import RELEARN_DATA  # imported late: relearning imports this module

    return RELEARN_DATA


def choices_of(name: str) -> list[str] | None:
    c = FIELDS[name].metadata["choices"]
    return list(c()) if callable(c) else list(c) if c else None


def stage_of(name: str) -> str:
    return FIELDS[name].metadata["stage"]


def help_of(name: str) -> str:
    """The one-line help, with the allowed values where the field has a fixed set."""
    h, c = FIELDS[name].metadata["help"], choices_of(name)
    return f"{h}: {', '.join(c)}" if c and not all(x in h for x in c) else h


def rename_aliases(given: dict[str, Any], warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`given` with old parameter names replaced by the new ones (a note for each)."""
    warn = warn or (lambda msg: print(f"selprune: note: {msg}", file=sys.stderr))
    out = {}
    for name, value in given.items():
        if name in ALIASES:
            new, convert = ALIASES[name]
            if new in given:
                raise SelpruneError(f"both {name} and {new} are given; {name} is the old name of {new}: keep {new}")
            warn(f"parameter {name!r} is now {new!r}; the old name is accepted until selprune 0.3")
            name, value = new, convert(value)
        out[name] = value
    return out


# ------------------------------------------------------------------------- validation
def resolve(given: dict[str, Any] | None = None, preset: str | None = None, *, allow: set[str] | None = None,
            require_runs: bool = True, relearn: bool = False, check_device: bool = True) -> Config:
    """A validated `Config` from user input: old names renamed, unknown names refused,
    defaults < `preset` < `given`, every value coerced to its field's type and checked.

    `allow` limits the names accepted (a command that has no use for some); the error
    then names the command that does. `relearn`: also check the rules that only
    retraining needs (see `validate`). `check_device=False` checks the device's name but not
    that this machine has it (a sweep file read where its points do not run)."""
    given = rename_aliases(dict(given or {}))
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        import difflib

        near = {u: difflib.get_close_matches(u, FIELDS, n=1) for u in unknown}
        hint = "; ".join(f"{u}: did you mean {m[0]}?" for u, m in near.items() if m)
        raise SelpruneError(f"unknown parameters {unknown}{' (' + hint + ')' if hint else ''}; "
                            f"valid ones: {', '.join(FIELDS)}")
    if allow is not None and (extra := sorted(set(given) - allow)):
        raise SelpruneError(f"parameters {extra} are not used by this command (stages "
                            f"{sorted({stage_of(n) for n in extra})}); remove them")
    if preset is not None and preset not in PRESETS:
        raise SelpruneError(f"unknown preset {preset!r}; choose among {', '.join(PRESETS)}")
    merged = {**DEFAULTS, **(PRESETS[preset] if preset else {}), **given}
    from selprune.experiment.param_args import coerce_value

    cfg = Config(**{name: coerce_value(name, value, HINTS[name]) for name, value in merged.items()})
    validate(cfg, require_runs=require_runs, relearn=relearn, check_device=check_device)
    return cfg


def _bad(name: str, value: Any, problem: str) -> SelpruneError:
    return SelpruneError(f"{name}={value!r} {problem}")


def validate(cfg: Config, runs: list[str] | None = None, require_runs: bool = True, relearn: bool = False,
             check_device: bool = True) -> None:
    """Check every field, then the rules between fields; the first problem is raised.

    `runs`: the pruning runs that will be done (default: `cfg.active_runs()`); the
    fraction checks apply to the neuron kinds they prune. `relearn`: the work includes
    retraining (notebook 06), so the rules between retraining and pruning parameters
    apply too (a pruning-only command with a short `window` need not shorten
    `retrain_window`). Nothing heavy is loaded: the model and datasets are checked to
    exist, not read."""
    for name in FIELDS:
        value = getattr(cfg, name)
        _check_type(name, value)
        allowed = choices_of(name)
        if allowed is not None and value not in allowed:
            raise _bad(name, value, f"is not one of {', '.join(allowed)}; pick one of those")
        check = FIELDS[name].metadata["check"]
        if check is not None and (problem := check(value)) is not None:
            raise _bad(name, value, problem)
    runs = cfg.active_runs() if runs is None else runs
    if require_runs and not runs:
        raise SelpruneError(f"no pruning run has a fraction above 0 among runs={cfg.runs!r}: set ff_frac or "
                            "attn_frac above 0 (both, for the run 'both')")
    _check_relations(cfg, runs)
    if relearn and cfg.retrain_window > cfg.window:
        raise _bad("retrain_window", cfg.retrain_window, f"is longer than window ({cfg.window}); lower it")
    _check_resources(cfg, check_device)


def _check_type(name: str, value: Any) -> None:
    """A `Config` built by hand holds what `resolve` would have coerced to: anything else
    (None where not optional, text for a number) is refused here, not a TypeError later."""
    from selprune.experiment.param_args import coerce_value

    coerced = coerce_value(name, value, HINTS[name])
    if isinstance(value, str) is not isinstance(coerced, str):
        raise _bad(name, value, f"must be {'text' if isinstance(coerced, str) else 'a number'}; pass {coerced!r}")


def _check_relations(cfg: Config, runs: list[str]) -> None:
    if cfg.forget == cfg.retain:
        raise SelpruneError(f"forget and retain are both {cfg.forget!r}; pick two different datasets")
    check_image_pair(cfg.forget, cfg.retain)
    for kind in sorted({k for r in runs for k in RUN_KINDS[r].kinds}):
        frac = getattr(cfg, f"{kind}_frac")
        if frac <= 0:
            run = next(r for r in runs if kind in RUN_KINDS[r].kinds)
            raise SelpruneError(f"run {run} prunes {kind} neurons, but {kind}_frac={frac}: nothing to prune; "
                                f"set {kind}_frac above 0 (e.g. 0.02)")
        if frac * cfg.steps > 1 + 1e-9:
            raise SelpruneError(f"{kind}_frac={frac} x steps={cfg.steps} prunes more than all neurons; lower either")
    for name in ("collect_tokens", "eval_tokens"):
        if getattr(cfg, name) < cfg.window:
            raise _bad(name, getattr(cfg, name), f"is below one window ({cfg.window} tokens); raise it or lower window")


def _check_resources(cfg: Config, check_device: bool = True) -> None:
    """The model and datasets exist (without loading them), dtype and device are usable."""
    from selprune.models import model_spec_kind, resolve_device, resolve_dtype
    from selprune.texts import check_dataset_spec

    model_spec_kind(cfg.model)
    for side in ("forget", "retain"):
        check_dataset_spec(getattr(cfg, side))
    if cfg.dtype != "auto":  # "auto" is resolved with the model's device
        resolve_dtype(cfg.dtype)
    if check_device or not cfg.device.startswith(("cuda", "mps")):  # a misspelt name is refused anyway
        resolve_device(cfg.device)
