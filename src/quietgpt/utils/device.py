"""Devices: a user's device name -> a torch.device that exists here, and what training needs to know about it
(the autocast dtype, TF32, waiting for queued work)."""

from __future__ import annotations

import contextlib

import torch

from quietgpt.errors import QuietError

__all__ = ["allow_tf32", "amp_context", "resolve_device", "synchronize"]


def resolve_device(name: str) -> torch.device:
    """"cpu" | "cuda" | "cuda:N" | "mps" | "auto" -> a torch.device that exists here, or a one-line QuietError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuietError(f"device {name!r} is not available here (no CUDA GPU visible to torch); "
                             "use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QuietError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} "
                             "GPU(s), use cuda:0..")
        return dev
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise QuietError("device 'mps' is not available here (no Apple GPU); use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise QuietError(f"unknown device {name!r}; choose cpu, cuda, cuda:N, mps or auto")


def amp_context(dtype: str, device: torch.device) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """train.dtype ("auto" | "float32" | "bfloat16" | "float16") on `device` -> (compute dtype, the autocast
    context to run forwards in; a no-op context for float32). "auto" is bf16 on a CUDA device that supports
    it, else float32. QuietError for float16 off CUDA (autocast fp16 needs a GradScaler, which is CUDA's)."""
    name = dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "float16" and device.type != "cuda":
        raise QuietError(f"train.dtype float16 needs a CUDA device (this run is on {device.type}); "
                         "use float32 or bfloat16")
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if compute == torch.float32:
        return compute, contextlib.nullcontext()
    return compute, torch.autocast(device_type=device.type, dtype=compute)


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32, as nanoGPT does (a 10-bit mantissa product,
    fp32 accumulation); under bf16/fp16 autocast this touches only the few ops kept in fp32. Process-wide."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """On CUDA, wait until `device` has finished the work queued so far, so that a timer read next measures
    it; a no-op on other devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
