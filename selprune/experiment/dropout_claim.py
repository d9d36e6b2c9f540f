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
# ablation, global selection) on FF neurons, 2% per step as in the paper, until retain top-1
# has fallen by a quarter; about 400 collection images per side; every test image judged.
RECIPE: dict[str, Any] = {"ff_frac": 0.02, "steps": 25, "max_retain_drop": 0.25, "collect_tokens": 20_000,
                          "eval_tokens": 10**7, "batch_size": 256, "dtype": "float32", "device": "cpu"}


def _name(dropout: float, seed: int) -> str:
    return f"dropout-{dropout:g}__seed-{seed}"


def claim_row(records: list[dict[str, Any]], dropout: float, seed: int, log: dict[str, Any]) -> dict[str, Any]:
    """One model's line: its training, its unpruned accuracy and the run's summaries."""
    s = summarize(records)
    return {"dropout": dropout, "seed": seed, "test_top1": log["test"]["top1"],
            "forget_top1": records[0]["forget"]["top1"], "retain_top1": records[0]["retain"]["top1"],
            "steps": len(records) - 1, "selectivity_area": s["selectivity_area"],
            **{f"forget_drop@{d}": s["forget_drop_at_retain_drop"][f"{d:.2f}"] for d in RETAIN_DROPS},
            "retain_drop_max": s["retain_drop_max"], "curve": [  # the frontier, as records (plot_frontier)
                {"step": r["step"], "ff": r["fraction"]["ff"], "forget": {"top1": r["forget"]["top1"]},
                 "retain": {"top1": r["retain"]["top1"]}} for r in records]}


def dropout_claim(out: str | Path, *, dataset: str = "fashion-mnist", forget: str = "0",
                  dropouts: tuple[float, ...] = (0.0, 0.1), seeds: tuple[int, ...] = (0, 1, 2),
                  train: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) one ViT per dropout and seed, prune class(es) `forget` from each by
    one recipe, and return (and write to `out/claim.json`) one row per model."""
    from selprune.experiment.config import resolve
    from selprune.experiment.loop import run_pruning
    from selprune.experiment.rundir import read_json
    from selprune.models import load_model
    from selprune.vit_train import train_vit

    if len(set(dropouts)) < 2:
        raise SelpruneError(f"dropouts={dropouts}: the claim compares at least two dropout rates, e.g. 0.0 and 0.1")
    out = Path(out)
    params = {**RECIPE, **(recipe or {}), "forget": f"image:{dataset}:{forget}", "retain": f"image:{dataset}:rest"}
    resolve({**params, "model": "smollm2-135m"}, require_runs=False)  # every parameter checked before any training
    rows = []
    for dropout in dropouts:
        for seed in seeds:
            ckpt = out / "models" / _name(dropout, seed)
            if not (ckpt / "train_log.json").is_file():
                train_vit(dataset, ckpt, dropout=dropout, seed=seed, progress=progress, **(train or {}))
            model, processor = load_model(str(ckpt), dtype="float32", device=params["device"])
            cfg = resolve({**params, "model": str(ckpt), "seed": seed}, require_runs=False)
            records, _ = run_pruning(cfg, "ff", out / "runs" / _name(dropout, seed), model, processor,
                                     progress=progress)
            rows.append(claim_row(records, dropout, seed, read_json(ckpt / "train_log.json")))
    atomic_write_json(out / "claim.json", rows)
    return rows


def claim_table(rows: list[dict[str, Any]]):
    """Mean and standard deviation over seeds, per dropout rate, of the unpruned accuracy
    and the headlines (a run that never reached a retain drop counts as missing)."""
    import pandas as pd

    cols = ["test_top1", "selectivity_area", *(f"forget_drop@{d}" for d in RETAIN_DROPS)]
    df = pd.DataFrame([{k: r[k] for k in ["dropout", "seed", *cols]} for r in rows])
    df[cols] = df[cols].astype(float)
    g = df.groupby("dropout")[cols]
    table = g.mean().round(3).astype(str) + " ± " + g.std(ddof=1).round(3).astype(str)
    table.insert(0, "seeds", df.groupby("dropout")["seed"].count())
    return table.reset_index()


def plot_claim(rows: list[dict[str, Any]]):
    """Every model's frontier, labelled by dropout rate and seed, one colour per rate."""
    from selprune.experiment.figures import plot_frontier

    rates = sorted({r["dropout"] for r in rows})
    label = {id(r): f"dropout {r['dropout']:g}, seed {r['seed']}" for r in rows}
    styles = {label[id(r)]: {"color": f"C{rates.index(r['dropout'])}", "alpha": 0.85} for r in rows}
    fig = plot_frontier({label[id(r)]: r["curve"] for r in rows}, styles=styles)
    fig.axes[0].set_title("Forgetting one class: ViTs trained with and without dropout")
    return fig
