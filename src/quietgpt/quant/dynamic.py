"""Real int8 ("int8-dynamic"): PyTorch's own dynamic int8 linear kernels on a deep copy of the model (CPU);
see quant/__init__.py for the protocol and how it differs from the simulated grid."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT
from quietgpt.quant.spec import QuantConfig


def quantized_engines() -> list[str]:
    """The quantized CPU engines of this torch build (torch.backends.quantized.supported_engines without "none")."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_dynamic(cfg: QuantConfig, device: str | torch.device) -> None:
    """QuietError (one line, naming the config and the fix) unless PyTorch's dynamic int8 kernels run here: they
    exist for the CPU only, and only in a torch build with a quantized engine."""
    dev = torch.device(device)
    if dev.type != "cpu":
        raise QuietError(f"quant config {cfg.name} runs PyTorch's dynamic int8 kernels, which exist for the CPU only, "
                         f"not {dev}; measure with --device cpu, or leave {cfg.name} out of --quant")
    if not quantized_engines():
        raise QuietError(f"quant config {cfg.name} needs a quantized engine (fbgemm, x86, onednn or qnnpack) and this "
                         f"torch build has none; install a standard torch build, or leave {cfg.name} out of --quant")


def int8_dynamic(model: GPT) -> GPT:
    """A deep copy of `model` on the CPU, in eval mode, whose every nn.Linear (lm_head included) is PyTorch's
    DynamicQuantizedLinear (quantize_dynamic, qint8); `model` itself is untouched. Call check_dynamic first."""
    from torch.ao.quantization import quantize_dynamic

    qmodel = copy.deepcopy(model).to("cpu").eval()
    # torch marks torch.ao.quantization deprecated in favour of torchao (a separate package, not a quietgpt
    # dependency; its notice says "removed in 2.10", yet 2.13 still ships it): quantize_dynamic still runs the
    # fbgemm/x86/onednn/qnnpack int8 kernels the llama2.c experiment used, so keep it, and keep its two
    # deprecation notices (the API, the quantized tensor types) off the one-line CLI.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        return quantize_dynamic(qmodel, {nn.Linear}, dtype=torch.qint8, inplace=True)
