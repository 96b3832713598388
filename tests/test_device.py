"""quietgpt.utils.device: device names -> torch devices, and the autocast context a train.dtype gives."""

import contextlib

import pytest
import torch

from quietgpt.errors import QuietError
from quietgpt.utils.device import amp_context, resolve_device


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(QuietError, match="not available") as e:
            resolve_device("cuda")
        assert "\n" not in str(e.value)
    with pytest.raises(QuietError, match="unknown device"):
        resolve_device("tpu")


def test_amp_context_on_cpu():
    dtype, ctx = amp_context("float32", torch.device("cpu"))
    assert dtype == torch.float32 and isinstance(ctx, contextlib.nullcontext)
    assert amp_context("auto", torch.device("cpu"))[0] == torch.float32  # bf16 only where CUDA supports it
    dtype, ctx = amp_context("bfloat16", torch.device("cpu"))
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(QuietError, match="float16 needs a CUDA device"):
        amp_context("float16", torch.device("cpu"))
