"""Devices and dtypes: where a model runs and in what precision.

`auto` picks a GPU when there is one, and bf16 only where it is fast (CUDA with bf16
support; on a CPU only with native bf16 instructions, measured once, since emulated bf16
is slower than fp32). MPS has no float64, so statistics sums live on the host there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selprune.errors import SelpruneError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; an unavailable explicit device is an error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SelpruneError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SelpruneError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SelpruneError(f"device {device!r} asked for, but torch sees only {torch.cuda.device_count()} CUDA "
                            f"GPU(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SelpruneError(f"device {device!r} asked for, but MPS is not available; use device='cpu'")
    return dev


def float64_device(device: torch.device) -> torch.device:
    """Where float64 sums for activations on `device` live: on `device` itself, so that a
    batch adds to them without a device-to-host copy, except on MPS, which has no float64
    (there the sums live on the CPU and each batch's float32 partial sums are copied over)."""
    return torch.device("cpu") if device.type == "mps" else device


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's input ids should be on: its input embedding's.

    Not `next(model.parameters()).device`: with accelerate's `device_map` the first
    parameter may sit elsewhere, and an offloaded embedding's weight is on the meta device
    between forward passes, where its hook's execution device is the one that counts."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    param = weight if isinstance(weight, torch.Tensor) else next(model.parameters())
    if param.device.type == "meta":
        execution = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
    return param.device


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`: bf16 on CUDA (fp16 where the GPU has no bf16), fp32 everywhere else.

    fp32 on every CPU, also one with fast bf16 instructions: `auto` must give the same
    numbers on every CPU, so that stored results reproduce wherever they are rerun (an
    earlier `auto` chose bf16 by timing a matmul, which made results depend on the
    machine). Ask for bfloat16 explicitly for speed on such a CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise SelpruneError(f"unknown dtype {dtype!r}; use auto or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --------------------------------------------------------------------------- loaders
