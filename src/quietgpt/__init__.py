"""quietgpt: does softmax1 ("quiet attention") remove the outliers that make transformers hard to quantize?

The subpackages are its layers, lowest first (docs/architecture.md has a paragraph on each; imports flow one
way, down this list, and tests/test_layers.py holds them to it):

    errors, utils, presets   leaves: errors, atomic writes, devices, progress, the shipped TOML presets
    nn                       the normalisers, attention and its fast paths, the GPT model
    quant                    quantization: the spec grammar, grids, methods and the quantized model
    config                   the typed run config ([model], [data], [train]) and the [study] table
    data, runs               tokens (tokenizers, sources, the synthetic task); run folders on disk
    interop                  Hugging Face import and export, pretrained initialisation
    measurement              one model's numbers: moments, collectors, perplexity, the metric registry
    training                 the nanoGPT loop and its parts
    study                    many runs, paired by seed, and their statistics
    report                   the answer, tables and figures of a study
    cli                      the `quietgpt` command
"""

from quietgpt.errors import ConfigError, QuietError
from quietgpt.interop.hf_import import from_hf, load_hf_gpt2
from quietgpt.measurement.evaluate import Measurement, measure
from quietgpt.nn.attention import QuietAttention, attention, reference_attention, select_path
from quietgpt.nn.model import GPT, GPTConfig
from quietgpt.nn.options import AttentionOptions
from quietgpt.nn.softmax import clipped_softmax, softmax1, softmax_n, softpick
from quietgpt.nn.variants import VARIANTS
from quietgpt.utils.version import __version__

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
    "from_hf",
    "load_hf_gpt2",
    "measure",
    "reference_attention",
    "select_path",
    "softmax1",
    "softmax_n",
    "softpick",
]
