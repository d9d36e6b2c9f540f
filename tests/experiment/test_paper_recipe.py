"""The paper replication recipe (issue #18): the sweep files in sweeps/paper/, one per model of
Pochinkov & Schoots 2024 (docs/replication.md).

Each file must
- pass `selprune sweep --dry-run` without the network or a model (the hub, `datasets` and
  `from_pretrained` are made to fail here) on this machine, which has no GPU although the files
  ask for device cuda (each point checks its device where it runs);
- pin the authors' settings (budgets, fractions, steps, recipe, the four forget/retain pairs
  and the importance functions), the same in every file but for the model and its window;
- run through the real sweep code (`run_sweep`: point status, each point's runs, results.json,
  leaderboard) once its model and datasets are swapped for local ones: tiny random-init models
  of the same architectures (OPT, OPT with GELU for Galactica, GPT-NeoX for Pythia, a RoBERTa
  masked LM), saved with a byte-level tokenizer built here, and small local corpora, at tiny
  budgets on the CPU.

The default tests run the notebooks' work in this process (`Series.prune` for each of a point's
notebook runs, what notebooks 03 and 04 do, without their plots) on a few points of the OPT
file; the slow ones run every point of every file that way, and one point of the OPT and RoBERTa files through
the real notebooks (papermill kernels).
"""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pytest
import torch
import transformers as T
import yaml
from tiny_models import small_datasets  # (importing it sets torch to one thread)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from selprune.experiment import cli, sweep
from selprune.experiment.notebooks import kernel_params
from selprune.experiment.series import Series
from selprune.experiment.sweepfile import Sweep, load_sweep
from selprune.paths import REPO_ROOT

PAPER_DIR = REPO_ROOT / "sweeps" / "paper"
# file -> (hub id, the real model's model_type, the tiny stand-in's family, its context in tokens)
MODELS: dict[str, tuple[str, str, str, int]] = {
    "opt-1.3b": ("facebook/opt-1.3b", "opt", "opt", 2048),
    "galactica-1.3b": ("facebook/galactica-1.3b", "opt", "galactica", 2048),
    "pythia-1.4b": ("EleutherAI/pythia-1.4b", "gpt_neox", "gpt_neox", 2048),
    "roberta-large": ("FacebookAI/roberta-large", "roberta", "roberta", 512),  # 514 positions, 2 of them offset
}
# what the authors' scripts ran (nickypro/selective-pruning exp1 and exp2, taker 1.0.1)
PAPER = {"collect_tokens": 100_000, "eval_tokens": 100_000, "ff_frac": 0.02, "attn_frac": 0.02, "steps": 50,
         "score": "ratio", "eps_ff": 1e-3, "eps_attn": 1e-4, "ablation": "zero", "prune_mode": "iterative",
         "selection": "global", "skip_k": 50, "max_retain_drop": None, "stop_forget_top1": None,
         "device": "cuda", "dtype": "float16"}
PAIRS = {("github-code", "pile"), ("pile", "github-code"), ("github-python", "github-code"),
         ("github-code", "github-python")}  # (forget, retain) of experiment 1
TINY = {"device": "cpu", "dtype": "float32", "window": 32, "collect_tokens": 64, "eval_tokens": 64, "batch_size": 4,
        "steps": 2, "skip_k": 5}
D_MODEL, D_MLP, N_LAYERS = 32, 64, 2
FAST_POINTS = ("ff", "attn", "forget-pile")  # of the OPT file: both neuron kinds, the floor and a swapped pair


def _paper_file(name: str) -> Path:
    return PAPER_DIR / f"{name}.yaml"


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_there_is_one_paper_sweep_file_per_model() -> None:
    assert sorted(p.stem for p in PAPER_DIR.glob("*.yaml")) == sorted(MODELS)


# ---------------------------------------------------------------- offline dry run
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way to the network or to a model or dataset fails the test (and is listed)."""
    calls: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            raise AssertionError(f"the dry run tried {what}")
        return call

    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(datasets, "load_dataset", refuse("datasets.load_dataset"))
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse(f"huggingface_hub.{name}"))
    for cls in (T.AutoConfig, T.AutoTokenizer, T.AutoModelForCausalLM, T.AutoModelForMaskedLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse(f"{cls.__name__}.from_pretrained"))
    return calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dry_run_lists_every_point_without_the_network(name: str, tmp_path: Path, offline: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["sweep", "-f", str(_paper_file(name)), "--out", str(out), "--dry-run"]) == 0, \
        capsys.readouterr().err
    printed = capsys.readouterr().out
    points = load_sweep(_paper_file(name), out=out).points
    assert printed.startswith(f"{len(points)} points into {out}\n")
    for pt in points:
        assert f"  new     {pt.name} " in printed
    assert offline == [] and not out.exists(), "a dry run fetches and writes nothing"


# ------------------------------------------------------------- the paper's settings
@pytest.mark.parametrize("name", sorted(MODELS))
def test_paper_files_pin_the_reference_settings(name: str) -> None:
    hub_id, _, _, context = MODELS[name]
    sw = load_sweep(_paper_file(name))
    assert sw.out == Path("runs") / "sweeps" / "paper" / name and not sw.relearn
    for pt in sw.points:
        cfg = pt.params
        assert cfg["model"] == hub_id, pt.name
        assert {k: cfg[k] for k in PAPER} == PAPER, pt.name
        assert cfg["window"] <= context and cfg["collect_tokens"] // cfg["window"] * cfg["window"] >= 0.99e5
        assert cfg["seed"] == 0, pt.name  # github-code's one hub split is split by document (test_texts)
        assert set(pt.runs) <= {"ff", "random", "attn"}
    kinds = {(tuple(pt.runs), pt.cfg.importance, pt.cfg.forget, pt.cfg.retain) for pt in sw.points}
    code_pile = ("github-code", "pile")
    assert (("ff", "random"), "abs", *code_pile) in kinds and (("attn",), "abs", *code_pile) in kinds
    for importance in ("freq", "rms", "std"):  # experiment 2, FF and attention
        assert (("ff",), importance, *code_pile) in kinds and (("attn",), importance, *code_pile) in kinds
    assert (("attn",), "rand", *code_pile) in kinds, "the random attention scores of experiment 2"
    assert {(pt.cfg.forget, pt.cfg.retain) for pt in sw.points} == PAIRS


def test_every_paper_file_has_the_same_points_but_for_the_model() -> None:
    per_model = {}
    for name in MODELS:
        sw = load_sweep(_paper_file(name))
        per_model[name] = [(pt.name, pt.settings) for pt in sw.points]
        assert set(sw.varied) <= {"runs", "importance", "forget", "retain"}, (name, sw.varied)
    first = per_model.pop("opt-1.3b")
    assert all(points == first for points in per_model.values())


# --------------------------------------------------- end to end on tiny local models
def _tokenizer(masked: bool) -> T.PreTrainedTokenizerFast:
    """A byte-level BPE without merges (one token a byte), RoBERTa's special ids; the masked
    one wraps every text in <s> ... </s> and has a mask token."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"] + (["<mask>"] if masked else [])
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if masked:
        tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    extra = {"mask_token": "<mask>"} if masked else {}
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                     unk_token="<unk>", **extra)


def _tiny_model(family: str, vocab: int) -> T.PreTrainedModel:
    ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
    common = {"vocab_size": vocab, "hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4,
              **ids}
    positions = 2 * TINY["window"]
    if family in ("opt", "galactica"):  # Galactica is OPT with GELU
        act = {"activation_function": "gelu"} if family == "galactica" else {}
        cfg: T.PretrainedConfig = T.OPTConfig(ffn_dim=D_MLP, word_embed_proj_dim=D_MODEL,
                                              max_position_embeddings=positions, **act, **common)
        return T.OPTForCausalLM(cfg)
    if family == "gpt_neox":  # Pythia: rotary on a quarter of each head, parallel residual
        cfg = T.GPTNeoXConfig(intermediate_size=D_MLP, max_position_embeddings=positions, rotary_pct=0.25,
                              use_parallel_residual=True, **common)
        return T.GPTNeoXForCausalLM(cfg)
    cfg = T.RobertaConfig(intermediate_size=D_MLP, max_position_embeddings=TINY["window"] + 2, type_vocab_size=1,
                          **common)
    return T.RobertaForMaskedLM(cfg)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """file name -> a local model directory of a tiny random-init model of that file's architecture."""
    out = {}
    for name, (_, model_type, family, _) in MODELS.items():
        folder = tmp_path_factory.mktemp(family)
        tok = _tokenizer(masked=family == "roberta")
        torch.manual_seed(0)
        model = _tiny_model(family, len(tok))
        assert model.config.model_type == model_type, "the stand-in has the real model's architecture"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def local_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The paper files' datasets by name -> small local pre-split folders."""
    root = small_datasets(tmp_path_factory.mktemp("sets"))  # code/ and prose/
    (root / "python").mkdir()
    for split in ("train", "test"):
        docs = [json.dumps({"text": f"import os\n\ndef walk{i}(top):\n    return list(os.walk(top))  # {split}\n" * 3})
                for i in range(12)]
        (root / "python" / f"{split}.jsonl").write_text("\n".join(docs) + "\n")
    return {"github-code": root / "code", "github-python": root / "python", "pile": root / "prose"}


def local_spec(name: str, model: Path, sets: dict[str, Path], out: Path,
               points: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The paper file `name` with its model and datasets swapped for local ones (a dataset the
    mapping lacks is a KeyError) and tiny CPU budgets; `points` keeps only those variants."""
    spec = yaml.safe_load(_paper_file(name).read_text())

    def local(params: dict[str, Any]) -> dict[str, Any]:
        return {k: str(sets[v]) if k in ("forget", "retain") else v for k, v in params.items()}

    variants = [local(v) for v in spec["variants"] if points is None or v["name"] in points]
    assert points is None or [v["name"] for v in variants] == list(points), "the points asked for exist"
    return {**spec, "out": str(out), "base": {**local(spec["base"]), "model": str(model), **TINY},
            "variants": variants}


def in_process_series(params: dict[str, Any], progress: bool = True, notebooks: tuple[str, ...] = ()) -> Path:
    """What `run_series` has the kernels do for the pruning notebooks (03, 04), in this process:
    each notebook's runs through `Series.prune`, without the plots."""
    p = kernel_params(params)
    s = Series(progress=False, **p)
    for notebook in notebooks:
        for run in s.notebook_runs(notebook):
            s.prune(run)
    return Path(p["run_dir"])


def _run(name: str, tiny_dirs: dict[str, Path], local_sets: dict[str, Path], root: Path,
         points: tuple[str, ...] | None = None) -> Sweep:
    spec = local_spec(name, tiny_dirs[name], local_sets, root / "out", points)
    f = root / f"{name}.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    sw = load_sweep(f)
    log: list[str] = []
    sweep.run_sweep(sw, progress=False, log=log.append)
    assert not sw.failed, sw.failed
    assert all(p.status() == "done" for p in sw.points), log
    return sw


def _selected(frac: float, n: int, steps: int) -> float:
    """The fraction of `n` neurons pruned after `steps` steps of `frac` (selprune.select: k = max(1, round(frac n)))."""
    return min(n, steps * max(1, round(frac * n))) / n


def check_written(sw: Sweep, masked: bool) -> None:
    """The leaderboard has a done row for every run of every point, and each point's results
    hold every step of its runs, evaluated as the architecture asks (next tokens or masked ones)."""
    rows = _csv(sw.out / "leaderboard.csv")
    assert sorted((r["point"], r["run"]) for r in rows) == sorted((p.name, r) for p in sw.points for r in p.runs)
    assert all(r["status"] == "done" and int(r["steps"]) == TINY["steps"] for r in rows), rows
    assert (sw.out / "figures" / "leaderboard.png").is_file()
    windows = TINY["eval_tokens"] // TINY["window"]
    targets = windows * (round(0.15 * TINY["window"]) if masked else TINY["window"] - 1)
    for pt in sw.points:
        results = json.loads((pt.run_dir / "results.json").read_text())
        assert results["params"]["forget"] == pt.params["forget"]
        for run in pt.runs:
            records = results["runs"][run]["records"]
            assert [r["step"] for r in records] == list(range(TINY["steps"] + 1))
            kind = "attn" if run == "attn" else "ff"
            n = N_LAYERS * (D_MLP if kind == "ff" else D_MODEL)
            frac = pt.params[f"{kind}_frac"]
            assert records[-1]["fraction"][kind] == pytest.approx(_selected(frac, n, TINY["steps"]))
            for side in ("forget", "retain"):
                assert records[-1][side]["tokens"] == targets, (pt.name, run, side)
        assert not (pt.run_dir / "pruned-model").exists(), "keep_models is off: no model copy per point"


@pytest.fixture
def kernels_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "run_series", in_process_series)


def test_opt_points_run_end_to_end_on_a_tiny_local_opt(tiny_dirs: dict[str, Path], local_sets: dict[str, Path],
                                                       tmp_path: Path, kernels_in_process: None) -> None:
    sw = _run("opt-1.3b", tiny_dirs, local_sets, tmp_path, FAST_POINTS)
    check_written(sw, masked=False)
    for row in _csv(sw.out / "leaderboard.csv"):  # ranked exactly where the run reached 10% retain damage
        assert (row["rank"] != "") == (row["forget_drop_at_10"] != "") == (row["reached"] == "True"), row


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_point_runs_end_to_end_on_a_tiny_model_of_its_architecture(
        name: str, tiny_dirs: dict[str, Path], local_sets: dict[str, Path], tmp_path: Path,
        kernels_in_process: None) -> None:
    sw = _run(name, tiny_dirs, local_sets, tmp_path)
    assert len(sw.points) == 12
    check_written(sw, masked=MODELS[name][2] == "roberta")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["opt-1.3b", "roberta-large"])  # a causal and a masked LM: the kernels' two paths
def test_a_point_runs_through_the_real_notebooks(name: str, tiny_dirs: dict[str, Path], local_sets: dict[str, Path],
                                                 tmp_path: Path) -> None:
    sw = _run(name, tiny_dirs, local_sets, tmp_path, ("ff",))
    check_written(sw, masked=MODELS[name][2] == "roberta")
    (pt,) = sw.points
    assert sorted(p.name for p in (pt.run_dir / "notebooks").glob("*.ipynb")) == ["03_prune_ffn.ipynb"]
