"""Hostile models (issue #20, items 1, 3 and 6): each a one-line error naming the problem
and the fix, raised by `selprune.models.load_model` and so by `selprune prune` (exit
status 2, one line on stderr, no traceback), before anything is written; and a damaged
or half-written model cache repaired on the next start.

The models are tiny random Llamas and GPT-2s saved with the embedded tokenizer
(tests/conftest.py); a GGUF conversion is faked (`FakeGgufReads`, tests/test_models.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_models import EMBEDDED, FakeGgufReads, converted_dir, entries
from tiny_models import tiny_model

import selprune.models as models
from selprune.errors import SelpruneError
from selprune.experiment import cli
from selprune.models import load_model


def prune_error(capsys, model: str | Path, out: Path, *more: str, loads: bool = False) -> str:
    """Run `selprune prune -p model MODEL`; check exit status 2, one error line on stderr,
    no traceback, and no run directory made; return the line. `loads`: the model loads
    before the refusal, and transformers' own "Loading weights" bar, which `--quiet` does
    not silence in `selprune prune`, is left out of the count."""
    capsys.readouterr()  # what fixtures printed
    assert cli.main(["prune", "--quiet", "-p", "model", str(model), "--out", str(out), *more]) == 2
    stdout, err = capsys.readouterr()
    lines = [x for x in err.strip().splitlines() if not (loads and (x.startswith("Loading weights") or not x))]
    assert len(lines) == 1 and lines[0].startswith("selprune: error: "), err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists(), "a refused run must not create its folder"
    return lines[0]


@pytest.fixture
def model_dir(tmp_path, shared_tiny_llama_dir) -> Path:
    """A copy of a complete local model folder (tiny Llama, embedded tokenizer) to damage."""
    return Path(shutil.copytree(shared_tiny_llama_dir, tmp_path / "model"))


def test_the_undamaged_folder_loads(model_dir):
    """The control: every case below damages this folder, which itself loads."""
    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    assert model.config.model_type == "llama" and tok.eos_token_id is not None


# --------------------------------------------------------------------- model folders
def test_corrupt_config_json(tmp_path, capsys, model_dir):
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 3')  # cut short
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"{model_dir / 'config.json'} cannot be read as JSON" in line
    assert "damaged or half-copied; copy or download the model again" in line


def test_config_json_that_is_not_an_object(tmp_path, capsys, model_dir):
    (model_dir / "config.json").write_text("[1, 2]")
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert "holds a JSON list, not a model configuration" in line and "copy or download the model again" in line


def test_truncated_model_safetensors(tmp_path, capsys, model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"a weights file of model {model_dir} is truncated or damaged (safetensors:" in line
    assert "copy or download the model again" in line


def test_truncated_pickle_checkpoint(tmp_path, capsys, model_dir):
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "pytorch_model.bin").write_bytes((model_dir / "pytorch_model.bin").read_bytes()[:3000])
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"the pickle checkpoint of model {model_dir} is truncated or damaged" in line
    assert "copy or download the model again" in line


def test_truncated_tokenizer_json(tmp_path, capsys, model_dir):
    (model_dir / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes()[:1000])
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"cannot load model {model_dir} (JSONDecodeError:" in line
    assert "check that it is a complete Hugging Face model (config.json, weights, tokenizer files)" in line


def test_folder_without_weights(tmp_path, capsys, model_dir):
    (model_dir / "model.safetensors").unlink()
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"{model_dir} has no weights (model.safetensors," in line and "copy or download the model again" in line


def test_folder_without_tokenizer_files(tmp_path, capsys, model_dir):
    """What an export of an older selprune was (#20, item 1): transformers died on sentencepiece."""
    for f in model_dir.iterdir():
        if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            f.unlink()
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"{model_dir} has no tokenizer files" in line and "sentencepiece" not in line
    assert f"AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{model_dir}')" in line


def test_file_named_gguf_that_is_not_one(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 Not Found</html>")
    line = prune_error(capsys, fake, tmp_path / "run")
    assert f"{fake} is named .gguf but is not a GGUF file" in line and "download it again" in line


def test_truncated_gguf_file(tmp_path, capsys):
    from test_models import packaged_gguf

    cut = tmp_path / "cut.gguf"
    with packaged_gguf().open("rb") as f:
        cut.write_bytes(f.read(200_000))  # the header and part of the vocabulary
    line = prune_error(capsys, cut, tmp_path / "run")
    assert f"a weights file of model {cut} is truncated or damaged (it ends early:" in line
    assert "copy or download the model again" in line


class Payload:
    """Unpickling this runs `Path.touch(target)`: code, which torch's safe loader refuses to run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


def test_only_a_pickle_checkpoint_that_torch_refuses(tmp_path, capsys, model_dir):
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    ran = tmp_path / "the-pickle-ran-code"
    torch.save({**state, "extra": Payload(ran)}, model_dir / "pytorch_model.bin")
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert not ran.exists(), "the pickle's code ran"
    assert f"model {model_dir} has only a pickle checkpoint (pytorch_model.bin) that torch refuses to unpickle " \
           "for safety" in line
    assert "If you trust its source, convert it once to safetensors and pass the new folder NEW" in line
    # the conversion it names works (and, as it says, runs the pickle's code)
    command = line.split('python -c "', 1)[1].rstrip('"').replace("'NEW'", repr(str(tmp_path / "converted")))
    exec(command, {})
    assert ran.exists()
    model, _ = load_model(str(tmp_path / "converted"), dtype="float32", device="cpu")
    converted = model.state_dict()
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    assert torch.equal(converted["lm_head.weight"], state["model.embed_tokens.weight"])  # tied again


def test_model_that_needs_trust_remote_code(tmp_path, capsys, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                       "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_my.py").write_text(f"open({str(tmp_path / 'remote-code-ran')!r}, 'w')\n")
    line = prune_error(capsys, model_dir, tmp_path / "run")
    assert f"model {model_dir} needs trust_remote_code" in line and "auto_map points at custom Python code" in line
    assert "selprune does not run remote code" in line and "use a model of an architecture transformers supports" \
           in line
    assert not (tmp_path / "remote-code-ran").exists() and "Do you wish to run the custom code" not in line


def test_remote_code_refused_for_a_hub_id_too(monkeypatch):
    """A hub model in the local cache: transformers is told never to run its code (no
    prompt), and what it raises becomes the same error."""
    seen = {}

    def refuse(repo_id, **kw):
        seen.update(kw)
        raise ValueError(f"The repository {repo_id} contains custom code which must be executed to correctly load "
                         "the model. Please pass the argument `trust_remote_code=True` to allow custom code to be run.")

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", refuse)  # read first: it names the auto class
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(SelpruneError, match=r"model someorg/custom needs trust_remote_code: it ships custom Python "
                                            r"code.*selprune does not run remote code"):
        load_model("someorg/custom", dtype="float32", device="cpu")
    assert seen["trust_remote_code"] is False


# ---------------------------------------------------------------- window vs. context
@pytest.fixture
def gpt2_64_dir(tmp_path, smollm_tokenizer) -> Path:
    out = tmp_path / "gpt2-64"
    tiny_model("gpt2", n_positions=64).save_pretrained(out)
    smollm_tokenizer.save_pretrained(out)
    return out


def test_window_longer_than_the_models_context(tmp_path, capsys, gpt2_64_dir):
    """GPT-2 with 64 positions and window 128 (an IndexError deep in the embedding, before)."""
    assert models.max_positions(load_model(str(gpt2_64_dir), dtype="float32", device="cpu")[0]) == 64
    line = prune_error(capsys, gpt2_64_dir, tmp_path / "run", "-p", "window", "128", loads=True)
    assert f"window 128 is longer than the model's context: {gpt2_64_dir} takes at most 64 positions" in line
    assert "lower window to 64 or less (-p window 64)" in line


def test_series_refuses_a_window_longer_than_the_context_before_any_work(tmp_path, gpt2_64_dir, monkeypatch):
    from selprune.experiment import series

    monkeypatch.setattr(series, "data_for", lambda *a: pytest.fail("data prepared for a window the model cannot take"))
    s = series.Series(progress=False, model=str(gpt2_64_dir), window=128, run_dir=str(tmp_path / "run"))
    with pytest.raises(SelpruneError, match=r"window 128 is longer than the model's context: .* at most 64 positions"):
        s.base  # noqa: B018 - the unpruned metrics: the first work a series does
    assert not s.rd.has("base.json") and not (s.run_dir / "stats").exists()


# ------------------------------------------------------------------- the model cache
@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "selprune-cache"
    monkeypatch.setenv("SELPRUNE_CACHE", str(cache))
    return cache


def test_truncated_file_in_the_model_cache_is_converted_again(tmp_cache, monkeypatch, tiny_llama, smollm_tokenizer):
    fake = FakeGgufReads(tiny_llama, smollm_tokenizer)
    fake.install(monkeypatch)
    load_model(EMBEDDED, dtype="float32", device="cpu")
    out = converted_dir(tmp_cache)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    notes = []
    monkeypatch.setattr(models.log, "warning", lambda msg, *args: notes.append(msg % args))
    model, _ = load_model(EMBEDDED, dtype="float32", device="cpu")
    assert fake.gguf_reads == 2, "the damaged cache was not converted again"
    assert len(notes) == 1 and f"the converted model in {out} cannot be read (a weights file" in notes[0]
    assert notes[0].endswith("converting it again")
    expected = tiny_llama().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert entries(out.parent) == [out.name]


def test_model_cache_still_unreadable_after_converting_again_says_how_to_clear_it(tmp_cache, monkeypatch, tiny_llama,
                                                                                  smollm_tokenizer):
    FakeGgufReads(tiny_llama, smollm_tokenizer).install(monkeypatch)
    load_model(EMBEDDED, dtype="float32", device="cpu")
    out = converted_dir(tmp_cache)
    (out / "config.json").write_text("{")
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, dest: dest)  # a conversion that mends nothing
    with pytest.raises(SelpruneError) as e:
        load_model(EMBEDDED, dtype="float32", device="cpu")
    msg = str(e.value)
    assert f"the cached copy of model '{EMBEDDED}' in {out} cannot be read even after converting it again" in msg
    assert f"remove the folder (rm -rf '{out}') and rerun, or set SELPRUNE_CACHE to another folder" in msg


KILLED_CONVERSION = """
import os, signal, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
import selprune.models as models
source = sys.argv[1]

class Model:
    @staticmethod
    def from_pretrained(*a, **kw):
        model = AutoModelForCausalLM.from_pretrained(source)
        real = model.save_pretrained
        def save_then_die(folder, *a, **kw):
            real(folder, *a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)  # midway: weights written, tokenizer not
        model.save_pretrained = save_then_die
        return model

class Tokenizer:
    @staticmethod
    def from_pretrained(*a, **kw):
        return AutoTokenizer.from_pretrained(source)

models.AutoModelForCausalLM, models.AutoTokenizer = Model, Tokenizer
models.load_model("smollm2-135m", dtype="float32", device="cpu")
"""


def test_conversion_killed_midway_leaves_nothing_after_the_next_start(tmp_cache, monkeypatch, tiny_llama,
                                                                      smollm_tokenizer, shared_tiny_llama_dir):
    """Item 6: a SIGKILL while converting the embedded model leaves its temporary folder;
    the next start removes it (and converts)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_CONVERSION), str(shared_tiny_llama_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = converted_dir(tmp_cache)
    left = entries(out.parent)
    assert len(left) == 1 and left[0].startswith(f".{out.name}.tmp-"), left  # what the kill left behind
    assert (out.parent / left[0] / "model.safetensors").is_file() and not out.exists()

    fake = FakeGgufReads(tiny_llama, smollm_tokenizer)
    fake.install(monkeypatch)
    load_model(EMBEDDED, dtype="float32", device="cpu")
    assert entries(out.parent) == [out.name] and fake.gguf_reads == 1
