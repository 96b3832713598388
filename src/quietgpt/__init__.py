"""quietgpt: does softmax1 ("quiet attention") remove the outliers that make transformers hard to quantize?

Import flow is one way: softmax <- kernels, chunked <- variants <- attention <- gates, model <- training /
measurement / quant <- study / report <- cli (docs/architecture.md has one paragraph per module).
"""

from .attention import VARIANTS, AttentionOptions, QuietAttention, attention, reference_attention, select_path
from .errors import ConfigError, QuietError
from .metrics import Measurement, measure
from .model import GPT, GPTConfig
from .softmax import clipped_softmax, softmax1, softmax_n, softpick

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "VARIANTS",
    "AttentionOptions",
    "ConfigError",
    "GPTConfig",
    "Measurement",
    "QuietAttention",
    "QuietError",
    "__version__",
    "attention",
    "clipped_softmax",
    "measure",
    "reference_attention",
    "select_path",
    "softmax1",
    "softmax_n",
    "softpick",
]
