"""Quantization of a GPT: simulated ("fake") uniform quantization, W8A8 as in Bondarenko et al. 2023, and
PyTorch's real dynamic int8 kernels.

The modules: spec.py (the spec grammar -> QuantConfig), grids.py (fake quantization, weight grids, the
activation quantizer), simulated.py (the quantized model as a context manager), dynamic.py (int8-dynamic).

Fake quantization rounds a float tensor onto an integer grid and maps it straight back,
    q(x) = scale * (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point),
so a float model computes exactly what an integer pipeline with those grids would, on any CPU.

The protocol (the paper's repo, Qualcomm-AI-research/outlier-free-transformers, "quant_setup=all"):
* weights: symmetric, signed, per-tensor (option: per output channel), range from the current min-max
  (option: the MSE-optimal clipping threshold, a 100-point grid search). Biases, LayerNorm parameters and
  sink logits stay in high precision (an int32 accumulator holds biases in a real integer kernel), and so
  do kvbias's learned key and value (one vector per head, like a bias).
* activations: asymmetric, per-tensor, static ranges from a running min-max (momentum 0.9) over N
  calibration batches from the training split (option: per-batch percentile instead of min/max).
  The range always includes 0 so that zero is exact. Quantized: the input and output of every linear
  layer (and of the gated and outgate variants' gates: input, weight and gate values; outgate's
  constant gate is a per-head scale, kept in high precision like biases), the residual
  sums (the embedding sum, the sum after attention, the block output; in this pre-LN model these are
  exactly the LayerNorm inputs, so they are quantized once, not twice) and the attention probabilities
  (observing them runs attention on the reference path, the only one that materialises them).
* embeddings and head: `embeddings` quantizes the position embedding table; `head` quantizes lm_head's
  weight, input and output (the logits). wte is tied to lm_head, one matrix, so `head` decides both.

During calibration the quantizers already quantize with their running estimate, as the paper's
QuantizationManager does, so each quantizer is calibrated on the quantized values upstream of it.

Real int8 ("int8-dynamic"): beside the simulated grid, PyTorch's own dynamic int8 kernels, the protocol of the
public llama2.c softmax1 experiment: `torch.ao.quantization.quantize_dynamic(copy, {nn.Linear}, dtype=qint8)`
on a deep copy of the model, on the CPU (fbgemm/x86, onednn or qnnpack). Every nn.Linear becomes a
DynamicQuantizedLinear: int8 weights (symmetric, per tensor, min-max) and inputs quantized at run time, per
forward call (one batch of windows), per tensor, asymmetric, on the 7-bit range [0, 127] those kernels use
(reduce_range, which keeps their int16 accumulation from overflowing); the output is float. lm_head is an
nn.Linear, so the logits matmul is int8 too (its int8 weight is a copy: the tied wte lookup stays float, as
nn.Embedding has no dynamic kernel). Everything else stays float: attention scores and probabilities, the
residual sums, LayerNorms, the gated variant's HeadGate. So it is not W8A8 (no static ranges, no quantized
probabilities or residuals): a deployment path, reported beside the simulated grid, with its wall time.

Differences from the paper's code, on purpose: its LayerNorm weights are also quantized and its attention
scores (QK^T) are re-quantized before the softmax; here LayerNorm parameters stay float and scores are not
quantized (the probabilities after the normaliser are, which is where softmax vs softmax1 differ). Its
fc1 + activation are fused (one quantizer after the ReLU); here c_fc's output is quantized before the GELU
as well as after it (the GELU output is c_proj's input).
"""

from quietgpt.quant.dynamic import check_dynamic, int8_dynamic, quantized_engines
from quietgpt.quant.grids import ActQuantizer, asymmetric_params, fake_quant, quantize_weight, symmetric_scale
from quietgpt.quant.simulated import QuantState, quantized
from quietgpt.quant.spec import INT8_DYNAMIC, QUANT_FORMAT, QuantConfig, parse_quant, parse_quant_list

__all__ = ["INT8_DYNAMIC", "QUANT_FORMAT", "ActQuantizer", "QuantConfig", "QuantState", "asymmetric_params",
           "check_dynamic", "fake_quant", "int8_dynamic", "parse_quant", "parse_quant_list", "quantize_weight",
           "quantized", "quantized_engines", "symmetric_scale"]
