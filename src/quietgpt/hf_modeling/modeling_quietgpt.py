"""quietgpt's GPT-2 with a chosen attention normaliser, as a Hugging Face transformers model.

`quietgpt export` writes this file next to the weights of a model whose attention is not plain softmax
(a softmax model is exported as a plain GPT2LMHeadModel instead), with `auto_map` in config.json, so

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it. Self-contained: torch + transformers, no quietgpt. The architecture is nanoGPT's GPT-2
(learned positions, pre-LayerNorm blocks, fused qkv, 4x GELU MLP, tied lm_head), the parameter names
are quietgpt's (nn.Linear weights, (out, in)), and only the attention normaliser differs
(config.attention), over scores s = q.k / sqrt(head_dim) of a causal row:

    softmax     p_i = exp(s_i) / sum_j exp(s_j)
    softmax1    p_i = exp(s_i) / (1 + sum_j exp(s_j))          a head may attend to "nothing"
    softmax_n   p_i = exp(s_i) / (n + sum_j exp(s_j))          n = config.softmax_n
    sink        softmax_n with n = exp(b_h), b_h a learned logit per head (attn.core.sink_logit)
    clipped     clip((zeta - gamma) softmax(s)_i + gamma, 0, 1)  (Bondarenko et al. 2023; clip_gamma, clip_zeta)
    gated       softmax attention; head h's output times sigmoid(x_h . w_h + b_h) (Bondarenko et al. 2023's
                per-token gate, attn.gate.weight (H, head_dim) and attn.gate.bias (H,), x_h = head h's slice
                of the block input)

The probabilities are materialised (B, H, T, T) in float32, as quietgpt's reference path does: this file is
for interoperability and inspection (`output_attentions=True` returns them; for the null variants a row
sums to less than 1, the rest is what the head left on "nothing"), not for speed. There is no KV cache:
`generate` re-runs the whole (cropped) context for every token, as quietgpt's GPT.generate does. Padding
is supported through `attention_mask` (left padding for generation): padded keys get probability 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:  # transformers >= 4.38; models must inherit it explicitly from 4.50 on
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover
    GenerationMixin = object

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated")
_V5 = int(transformers.__version__.split(".")[0]) >= 5


class QuietGPTConfig(PretrainedConfig):
    """GPT-2 sizes under GPT-2's names (n_positions = quietgpt's block_size) plus quietgpt's attention
    settings: attention (one of VARIANTS), softmax_n, clip_gamma, clip_zeta; gelu "none" (exact) or
    "tanh"; bias False drops the Linear and LayerNorm biases; gate_init and sink_init only matter for a
    model initialised from scratch."""

    model_type = "quietgpt"
    attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",  # noqa: RUF012 (HF's form)
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def __init__(self, vocab_size: int = 50304, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12,
                 n_head: int = 12, bias: bool = True, dropout: float = 0.0, attention: str = "softmax1",
                 softmax_n: float = 1.0, clip_gamma: float = -0.03, clip_zeta: float = 1.0, gelu: str = "none",
                 layer_norm_epsilon: float = 1e-5, gate_init: float = 0.25, sink_init: float = 0.0,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, **kwargs):
        if attention not in VARIANTS:
            raise ValueError(f"attention {attention!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {gelu!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.vocab_size, self.n_positions, self.n_embd = vocab_size, n_positions, n_embd
        self.n_layer, self.n_head, self.bias, self.dropout = n_layer, n_head, bias, dropout
        self.attention, self.softmax_n, self.clip_gamma, self.clip_zeta = attention, softmax_n, clip_gamma, clip_zeta
        self.gelu, self.layer_norm_epsilon = gelu, layer_norm_epsilon
        self.gate_init, self.sink_init, self.initializer_range = gate_init, sink_init, initializer_range
        kwargs.setdefault("use_cache", False)  # no KV cache: generation recomputes the context
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def normalise(scores: torch.Tensor, config: QuietGPTConfig, sink_logit: torch.Tensor | None) -> torch.Tensor:
    """Attention weights (B, H, T, T) float32 from float32 scores whose masked entries are -inf (future
    keys) or the dtype's minimum (padding). The null variants append one logit log n per row, take an
    ordinary (max-shifted, overflow-free) softmax and drop that entry: exp(s_i) / (n + sum_j exp(s_j))."""
    variant = config.attention
    if variant in ("softmax1", "softmax_n", "sink"):
        if variant == "sink":
            log_n = sink_logit.float().view(1, -1, 1, 1)
        else:
            n = 1.0 if variant == "softmax1" else float(config.softmax_n)
            log_n = torch.tensor(math.log(n) if n > 0 else -math.inf, device=scores.device)
        null = log_n.expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, null], dim=-1), dim=-1)[..., :-1]
    p = torch.softmax(scores, dim=-1)
    if variant == "clipped":
        gamma, zeta = float(config.clip_gamma), float(config.clip_zeta)
        p = ((zeta - gamma) * p + gamma).clamp(0.0, 1.0)
    return p


class Core(nn.Module):
    """Holds the sink variant's learned null logit per head (quietgpt's attn.core.sink_logit)."""

    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        sink = config.attention == "sink"
        self.sink_logit = nn.Parameter(torch.full((config.n_head,), float(config.sink_init))) if sink else None


class HeadGate(nn.Module):
    """Per-head sigmoid gate read from that head's slice of the block input: (B, T, C) -> (B, H, T, 1)."""

    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.weight = nn.Parameter(torch.zeros(self.n_head, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(self.n_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        logits = torch.einsum("bthd,hd->bht", x.view(B, T, self.n_head, self.head_dim), self.weight)
        return torch.sigmoid(logits + self.bias.view(1, -1, 1)).unsqueeze(-1)


class Attention(nn.Module):
    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        self.config, self.n_head, self.n_embd = config, config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(config.dropout), nn.Dropout(config.dropout)
        self.core = Core(config)
        self.gate = HeadGate(config) if config.attention == "gated" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), mask (B, 1, T, T) bool (True = may attend) -> (output (B, T, C), probs (B, H, T, T))."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        scores = (q.float() * (1.0 / math.sqrt(C // self.n_head))) @ k.float().transpose(-2, -1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # future keys -inf; padded keys the smallest finite value, so a row with only padding stays finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).masked_fill(~causal, -math.inf)
        probs = normalise(scores, self.config, self.core.sink_logit)
        y = (self.attn_dropout(probs) @ v.float()).to(x.dtype)
        if self.gate is not None:
            y = y * self.gate(x).to(y.dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), probs


class MLP(nn.Module):
    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.attn(self.ln_1(x), mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), probs


class QuietGPTPreTrainedModel(PreTrainedModel):
    config_class = QuietGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]  # noqa: RUF012 (transformers reads these class attributes as they are)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init for a model built from scratch (from_pretrained loads every tensor instead)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, HeadGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            g = self.config.gate_init
            nn.init.constant_(module.bias, math.log(g / (1.0 - g)))
        elif isinstance(module, Core) and module.sink_logit is not None:
            nn.init.constant_(module.sink_logit, float(self.config.sink_init))


class QuietGPTForCausalLM(QuietGPTPreTrainedModel, GenerationMixin):
    """The language model: input_ids (B, T) -> CausalLMOutput(logits (B, T, vocab_size), loss if labels)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"} if _V5 else ["lm_head.weight"]

    def __init__(self, config: QuietGPTConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutput | tuple:
        """input_ids (B, T), T <= n_positions; attention_mask (B, T), 0 = padding; position_ids (B, T)
        (default: counted over the unpadded tokens); labels (B, T) as in every HF causal LM (shifted here,
        -100 ignored). Cache arguments from generate are accepted and ignored."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"cannot forward a sequence of length {T}; n_positions is {self.config.n_positions}")
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = attention_mask.bool().view(B, 1, 1, T)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        hidden, attentions = [], []
        for block in self.transformer.h:
            hidden.append(x)
            x, probs = block(x, mask)
            attentions.append(probs)
        x = self.transformer.ln_f(x)
        hidden.append(x)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutput(loss=loss, logits=logits, hidden_states=tuple(hidden) if output_hidden_states else None,
                             attentions=tuple(attentions) if output_attentions else None)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "use_return_dict", True)
        return out if use_dict else out.to_tuple()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache (transformers >= 4.45 asks)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """The whole context for every new token, cropped to the last n_positions tokens (as quietgpt's
        GPT.generate does; positions then restart at 0)."""
        n = self.config.n_positions
        if attention_mask is not None:
            attention_mask = attention_mask[:, -n:]
        return {"input_ids": input_ids[:, -n:], "attention_mask": attention_mask}
