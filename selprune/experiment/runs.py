"""The run kinds: which neurons a pruning run prunes, and how it chooses them, or which
gradient unlearning method a baseline run trains with.

One registry that the loop, the series, the notebooks and the sweeps all read (the
`runs` parameter names entries of it). A run kind is data: add one with
`register_run_kind` and every consumer knows it. Every kind's run leaves the same step
records (forget and retain metrics from the unmodified model on), so frontiers, tables
and leaderboards treat pruning runs and baselines alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from selprune.errors import SelpruneError


@dataclass(frozen=True)
class RunKind:
    """A kind of pruning run.

    `kinds`: the neuron kinds it prunes (each at its own `*_frac` per step); `axis`: the
    kind whose fraction pruned is its x-axis in figures and tables; `random`: scores are
    uniform noise (the floor a selective run must beat); `whole_heads`: attention heads
    are scored whole (by the `heads` reducer) instead of single neurons; `notebook`: the
    notebook that does it; `exports`: its last step is saved as `pruned-model/`;
    `method`: a gradient unlearning baseline (`selprune.unlearning.METHODS`) that
    fine-tunes the model instead of pruning it (`kinds` is then empty)."""

    name: str
    kinds: tuple[str, ...]
    notebook: str
    random: bool = False
    whole_heads: bool = False
    exports: bool = False
    method: str | None = None

    @property
    def axis(self) -> str:
        """The neuron kind of its fraction pruned (a baseline prunes none: ff, at 0)."""
        return self.kinds[0] if self.kinds else "ff"


RUN_KINDS: dict[str, RunKind] = {}


def register_run_kind(kind: RunKind, *, overwrite: bool = False) -> None:
    if kind.name in RUN_KINDS and not overwrite:
        raise SelpruneError(f"run kind {kind.name!r} is already registered; pass overwrite=True to replace it")
    RUN_KINDS[kind.name] = kind


for _kind in (
    RunKind("ff", ("ff",), "03_prune_ffn.ipynb", exports=True),
    RunKind("random", ("ff",), "03_prune_ffn.ipynb", random=True),
    RunKind("attn", ("attn",), "04_prune_attention.ipynb"),
    RunKind("attn_heads", ("attn",), "04_prune_attention.ipynb", whole_heads=True),
    # FF and attention neurons together, ff_frac and attn_frac each step
    RunKind("both", ("ff", "attn"), "04_prune_attention.ipynb"),
    # the gradient unlearning baselines (selprune.unlearning), side by side in notebook 07
    *(RunKind(m, (), "07_compare_methods.ipynb", method=m) for m in ("ga", "graddiff", "npo", "npo_rt", "rmu")),
):
    register_run_kind(_kind)
FLOOR = "random"  # the run every selective run is read against
BASELINES = tuple(name for name, kind in RUN_KINDS.items() if kind.method)


def parse_runs(text: str) -> list[str]:
    """'ff, random' -> ['ff', 'random']: names separated by commas (spaces allowed),
    each a registered run kind, each once."""
    names = [r.strip() for r in str(text).split(",") if r.strip()]
    bad = [r for r in names if r not in RUN_KINDS]
    if bad:
        raise SelpruneError(f"runs={text!r} names unknown runs {bad}; choose among {', '.join(RUN_KINDS)}")
    if len(set(names)) != len(names):
        raise SelpruneError(f"runs={text!r} names a run twice; list each once")
    return names


def run_kind(name: str) -> RunKind:
    if name not in RUN_KINDS:
        raise SelpruneError(f"unknown run {name!r}; choose among {', '.join(RUN_KINDS)}")
    return RUN_KINDS[name]


def runs_of_notebook(notebook: str, names: list[str]) -> list[str]:
    """The runs among `names` that `notebook` does, in registry order."""
    return [r for r in RUN_KINDS if r in names and RUN_KINDS[r].notebook == notebook]


def probe_models(value: str) -> list[str]:
    """The models named by a `probes` value, in order: "unpruned" and pruning run kinds."""
    return [n.strip() for n in value.split(",") if n.strip()]


def probe_models_problem(value: str) -> str | None:
    """What is wrong with a `probes` value (None: fine): names that are not "unpruned" or a run kind."""
    bad = [n for n in probe_models(value) if n != "unpruned" and n not in RUN_KINDS]
    return None if not bad else (f"names {bad}: the probes take unpruned or runs ({', '.join(RUN_KINDS)}); "
                                 "fix the list")
