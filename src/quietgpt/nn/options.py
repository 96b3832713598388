"""AttentionOptions: everything the attention core needs besides its tensors, as one frozen object checked
once where it is built (GPTConfig.attention_options() for the model, the keyword arguments of
nn.attention.attention for the functional API). Which options belong to which variant comes from the
variant table (variants.py): a variant's own option on another variant is an error unless it is at its
default, so a config never records a setting that did nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from quietgpt.errors import ConfigError
from quietgpt.nn.kernels import CUDA_KERNELS
from quietgpt.nn.variants import OPTION_OWNERS, VARIANT_SPECS, check_variant

PATHS = ("auto", "fast", "reference")


def check_path(path: str) -> None:
    if path not in PATHS:
        raise ConfigError(f"unknown attention path {path!r}; choose one of {', '.join(PATHS)}")


def check_cuda_kernel(cuda_kernel: str) -> None:
    if cuda_kernel not in CUDA_KERNELS:
        raise ConfigError(f"unknown CUDA attention kernel {cuda_kernel!r}; choose one of {', '.join(CUDA_KERNELS)}")


@dataclass(frozen=True)
class AttentionOptions:
    """Everything the attention core needs besides its tensors, checked once when built.

    variant      one of VARIANTS
    n            softmax_n's n (>= 0; used by "softmax_n" only)
    gamma, zeta  clipped softmax's parameters (gamma <= 0 <= 1 <= zeta; used by "clipped" only)
    dropout      dropout on the attention weights, in [0, 1) (QuietAttention applies it in training only)
    path         "auto" | "fast" | "reference" (see the module docstring)
    cuda_kernel  the CUDA LSE kernel preference, "auto" | "flash" | "cudnn" (see lse_kernel_for)
    is_causal    mask future keys (then T == Tk)
    scale        score scale; None = 1 / sqrt(head dim)
    sink_init    "sink": the learned null logit b_h at init (QuietAttention's parameter; 0 = softmax1)
    sigmoid_bias "sigmoid": its b, fixed; None = -log(Tk), Tk the keys of each call (Ramapuram et al.)

    n, gamma/zeta, sink_init and sigmoid_bias belong to one variant each (OPTION_OWNERS): on another
    variant they must stay at their defaults, so that a config never records a setting that did nothing.

    Frozen: a compiled graph reads these as constants, so nothing may change them behind its back;
    `dataclasses.replace` makes a changed copy (GPT.set_attention_path does).
    """

    variant: str = "softmax1"
    n: float = 1.0
    gamma: float = -0.03
    zeta: float = 1.0
    dropout: float = 0.0
    path: str = "auto"
    cuda_kernel: str = "auto"
    is_causal: bool = True
    scale: float | None = None
    sink_init: float = 0.0
    sigmoid_bias: float | None = None

    def __post_init__(self) -> None:
        check_variant(self.variant)
        check_path(self.path)
        check_cuda_kernel(self.cuda_kernel)
        for f in fields(self):
            owner = OPTION_OWNERS.get(f.name)
            if owner not in (None, self.variant) and getattr(self, f.name) != f.default:
                raise ConfigError(f"attention option {f.name}={getattr(self, f.name)!r} belongs to variant "
                                  f"{owner!r}, not {self.variant!r}; leave it at its default {f.default!r}")
        spec = VARIANT_SPECS[self.variant]
        if spec.check is not None:
            spec.check(self)
        if spec.fast is None and self.path == "fast":
            raise ConfigError(f"attention path 'fast' is not possible here ({spec.no_fast}); use path='auto'")
        if self.path == "fast" and self.dropout > 0 and not spec.fast_dropout:
            raise ConfigError(f"attention path 'fast' is not possible here ({self.variant}'s fast path has no "
                              "attention dropout); use path='auto' or dropout 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"attention dropout must be in [0, 1), got {self.dropout!r}")
