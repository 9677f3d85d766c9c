"""Torch helpers shared by the foundation encoders: import, device, precision.

Nothing here imports torch at module import time; call :func:`import_torch`
first (it raises :class:`~cellatlas.errors.ModelUnavailableError` with the
install command when the optional extra is missing).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from cellatlas.encoders._foundation import EXTRA_INSTALL
from cellatlas.errors import InputError, ModelUnavailableError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def import_torch(model: str) -> Any:
    """Import and return ``torch``, or explain how to install it."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ModelUnavailableError(
            f"The {model} encoder needs PyTorch, which is not installed ({err}).",
            fix=f"Install the optional extra: {EXTRA_INSTALL}.",
            field="model",
        ) from err
    return torch


def import_transformers(model: str) -> Any:
    """Import and return ``transformers`` (quietly), or explain how to install it."""
    import_torch(model)
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ModelUnavailableError(
            f"The {model} encoder needs Hugging Face transformers, which is not installed ({err}).",
            fix=f"Install the optional extra: {EXTRA_INSTALL}.",
            field="model",
        ) from err
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def pick_device(device: str | None) -> Any:
    """``"auto"``/``None`` -> CUDA when available, else CPU; an unavailable CUDA falls back to CPU."""
    torch = import_torch("foundation")
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA was requested but is not available; running on CPU.")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise InputError(f"Unknown device '{device}'.", fix="Use auto, cpu, cuda or cuda:N.", field="device") from err


def pick_dtype(precision: str | None, device: Any) -> Any:
    """Compute dtype: ``auto`` is bf16 (or fp16 without bf16 support) on GPU and fp32 on CPU.

    fp16 on CPU is not supported by every kernel, so it falls back to fp32 there.
    """
    torch = import_torch("foundation")
    name = (precision or "auto").lower()
    if name not in PRECISIONS:
        raise InputError(f"Unknown precision '{precision}'.", fix=f"Use one of {', '.join(PRECISIONS)}.", field="precision")
    on_gpu = device.type == "cuda"
    if name == "auto":
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and not on_gpu:
        log.warning("fp16 is not supported on CPU; using fp32.")
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``dtype`` (a no-op for fp32)."""
    torch = import_torch("foundation")
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tensor_digest(state_dict: dict[str, Any]) -> str:
    """blake2b over the names, shapes and bytes of a state dict (for models built in memory)."""
    import hashlib

    torch = import_torch("foundation")
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}{tuple(state_dict[key].shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
