"""The paper's dropout claim, checked on small ViTs trained here.

The paper reports that models trained with dropout separate better: pruning removes their
forget capability with less damage to retain. To test it, the same small ViT is trained
with and without dropout (same data, seed and steps: `selprune.vit_train`), one class is
pruned from each by the same recipe (a pruning run of `selprune.experiment.loop`), and the
two frontiers (forget top-1 drop against retain top-1 drop) and their headlines (forget
drop at 5/10/20% retain drop) are compared over seeds. A seed is both the training seed
(initialisation, batch order) and the pruning run's seed (collection images).

Everything lands under `out` and is reused on a rerun: a checkpoint that exists is not
trained again, a finished pruning run replays its records, so an interrupted claim resumes.

    selprune dropout-claim --out runs/dropout-claim --seeds 0,1,2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selprune.errors import SelpruneError
from selprune.paths import atomic_write_json
from selprune.selectivity import RETAIN_DROPS, summarize

# The pruning recipe: the kit's defaults (iterative, abs importance, ratio score, zero
# ablation, global selection), 2% of the FF (and of the attention) neurons per step as in the
# paper, for 25 steps or until retain top-1 has fallen by a quarter; ~20k collection tokens per
# side (1,176 Fashion-MNIST images of 17 tokens); every test image judged. Two pruning runs per
# model: FF neurons only, and FF + attention ("both"): on these ViTs the class lives mostly in
# the attention neurons (README, "The dropout claim").
RECIPE: dict[str, Any] = {"ff_frac": 0.02, "attn_frac": 0.02, "steps": 25, "max_retain_drop": 0.25,
                          "collect_tokens": 20_000, "eval_tokens": 10**7, "batch_size": 256, "dtype": "float32",
                          "device": "cpu"}
RUNS = ("ff", "both")


def _name(dropout: float, seed: int) -> str:
    return f"dropout-{dropout:g}__seed-{seed}"


def claim_row(records: list[dict[str, Any]], run: str, dropout: float, seed: int,
              log: dict[str, Any]) -> dict[str, Any]:
    """One pruning run's line: its model's training, its unpruned accuracy and its summaries."""
    s = summarize(records)
    return {"run": run, "dropout": dropout, "seed": seed, "test_top1": log["test"]["top1"],
            "forget_top1": records[0]["forget"]["top1"], "retain_top1": records[0]["retain"]["top1"],
            "steps": len(records) - 1, "selectivity_area": s["selectivity_area"],
            **{f"forget_drop@{d}": s["forget_drop_at_retain_drop"][f"{d:.2f}"] for d in RETAIN_DROPS},
            "retain_drop_max": s["retain_drop_max"], "curve": [  # the frontier, as records (plot_frontier)
                {"step": r["step"], "ff": r["fraction"]["ff"], "attn": r["fraction"]["attn"],
                 "forget": {"top1": r["forget"]["top1"]},
                 "retain": {"top1": r["retain"]["top1"]}} for r in records]}


def dropout_claim(out: str | Path, *, dataset: str = "fashion-mnist", forget: str = "0",
                  dropouts: tuple[float, ...] = (0.0, 0.1), seeds: tuple[int, ...] = (0, 1, 2),
                  train: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                  runs: tuple[str, ...] = RUNS, progress: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) one ViT per dropout and seed, prune class(es) `forget` from each by
    one recipe (each of `runs`), and return (and write to `out/claim.json`) one row per run."""
    from selprune.experiment.config import resolve, validate
    from selprune.experiment.loop import run_pruning
    from selprune.experiment.rundir import read_json
    from selprune.models import DEFAULT_MODEL, load_model
    from selprune.vit_train import train_vit

    if len(set(dropouts)) < 2:
        raise SelpruneError(f"dropouts={dropouts}: the claim compares at least two dropout rates, e.g. 0.0 and 0.1")
    out = Path(out)
    params = {**RECIPE, **(recipe or {}), "forget": f"image:{dataset}:{forget}", "retain": f"image:{dataset}:rest"}
    for run in runs:  # every parameter checked before any training (the model's path once it exists)
        validate(resolve({**params, "model": DEFAULT_MODEL}, require_runs=False), runs=[run])
    rows = []
    for dropout in dropouts:
        for seed in seeds:
            ckpt = out / "models" / _name(dropout, seed)
            if not (ckpt / "train_log.json").is_file():
                train_vit(dataset, ckpt, dropout=dropout, seed=seed, progress=progress, **(train or {}))
            model, processor = load_model(str(ckpt), dtype="float32", device=params["device"])
            cfg = resolve({**params, "model": str(ckpt), "seed": seed}, require_runs=False)
            for run in runs:
                folder = out / "runs" / _name(dropout, seed) / run
                records, pruner = run_pruning(cfg, run, folder, model, processor, progress=progress)
                pruner.restore()  # the next run starts from the trained model
                rows.append(claim_row(records, run, dropout, seed, read_json(ckpt / "train_log.json")))
    atomic_write_json(out / "claim.json", rows)
    return rows


def claim_table(rows: list[dict[str, Any]]):
    """Per run kind and dropout rate, over seeds: mean ± standard deviation of the unpruned
    test accuracy, the selectivity area, the final forget and retain drops, and each
    headline with how many runs reached its retain drop ("k/n": a run that never lost that
    much retain has no value there, which may mean it forgot *without* the damage, so the
    final drops sit beside them)."""
    import pandas as pd

    heads = [f"forget_drop@{d}" for d in RETAIN_DROPS]
    df = pd.DataFrame([{"run": r["run"], "dropout": r["dropout"], "test_top1": r["test_top1"],
                        "selectivity_area": r["selectivity_area"],
                        "final_forget_drop": 1 - r["curve"][-1]["forget"]["top1"] / r["forget_top1"],
                        "final_retain_drop": 1 - r["curve"][-1]["retain"]["top1"] / r["retain_top1"],
                        **{h: r[h] for h in heads}} for r in rows])
    cols = [c for c in df.columns if c not in ("run", "dropout")]
    df[cols] = df[cols].astype(float)

    def cell(v: pd.Series) -> str:
        got = v.dropna()
        spread = f" ± {got.std(ddof=1):.3f}" if len(got) > 1 else ""
        text = f"{got.mean():.3f}{spread}" if len(got) else "-"
        return text + (f" ({len(got)}/{len(v)})" if v.name in heads else "")

    table = df.groupby(["run", "dropout"])[cols].agg(cell)
    table.insert(0, "seeds", df.groupby(["run", "dropout"]).size())
    return table.reset_index()


def plot_claim(rows: list[dict[str, Any]]):
    """Every run's frontier, labelled by run, dropout rate and seed: one colour per rate, one
    line style per run."""
    from selprune.experiment.figures import plot_frontier

    rates, kinds = sorted({r["dropout"] for r in rows}), sorted({r["run"] for r in rows})
    label = {id(r): f"{r['run']}, dropout {r['dropout']:g}, seed {r['seed']}" for r in rows}
    styles = {label[id(r)]: {"color": f"C{rates.index(r['dropout'])}", "alpha": 0.85,
                             "ls": ("-", "--", ":")[kinds.index(r["run"]) % 3]} for r in rows}
    fig = plot_frontier({label[id(r)]: r["curve"] for r in rows}, styles=styles)
    fig.axes[0].set_title("Forgetting one class: ViTs trained with and without dropout")
    return fig
