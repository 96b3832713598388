"""quietgpt's GPT-2 with a chosen attention normaliser, as a Hugging Face transformers model.

`quietgpt export` writes this file next to the weights of a model whose attention is not plain softmax
(a softmax model is exported as a plain GPT2LMHeadModel instead), with `auto_map` in config.json, so

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it. Self-contained: torch + transformers, no quietgpt. The architecture is nanoGPT's GPT-2
(learned positions, pre-LayerNorm blocks, fused qkv, 4x GELU MLP, tied lm_head), the parameter names
are quietgpt's (nn.Linear weights, (out, in)), and only the attention differs (config.attention), over
scores s = q.k / sqrt(head_dim) of a causal row, j running over the keys the query may see:

    softmax     p_i = exp(s_i) / sum_j exp(s_j)
    softmax1    p_i = exp(s_i) / (1 + sum_j exp(s_j))          a head may attend to "nothing"
    softmax_n   p_i = exp(s_i) / (n + sum_j exp(s_j))          n = config.softmax_n
    sink        softmax_n with n = exp(b_h), b_h a learned logit per head (attn.core.sink_logit)
    clipped     clip((zeta - gamma) softmax(s)_i + gamma, 0, 1)  (Bondarenko et al. 2023; clip_gamma, clip_zeta)
    gated       softmax attention; head h's output times sigmoid(x_h . w_h + b_h) (Bondarenko et al. 2023's
                per-token gate, attn.gate.weight (H, head_dim) and attn.gate.bias (H,), x_h = head h's slice
                of the block input)
    softpick    p_i = ReLU(exp(s_i) - 1) / (sum_j |exp(s_j) - 1| + 1e-8)  (Zuhri, Fuadi & Aji 2025, "Softpick":
                every s_i <= 0 gets exactly 0; rows sum to at most 1)
    outgate     softmax attention; head h's output Y_h times sigmoid(x W_g + b_g) for that head, x the whole
                block input (Qiu et al. 2025's G1 gate, attn.gate.weight, attn.gate.bias): config.gate_mode
                "elementwise" (head_dim gates per head, W_g (H * head_dim, C)), "headwise" (one per head,
                W_g (H, C)) or "constant" (sigmoid of a learned logit per head, attn.gate.bias (H,) alone)
    sigmoid     p_i = sigmoid(s_i + b), no row normalisation (Ramapuram et al. 2024): config.sigmoid_bias a
                number, or "auto": b = -log n, n the number of tokens of the call (of the row's real tokens
                when attention_mask pads it), so it changes with the length of the input
    kvbias      softmax over [k'_h; keys] with values [v'_h; values] (Sun et al. 2024, "Massive Activations",
                the explicit attention bias; attn.core.k_bias, attn.core.v_bias (H, head_dim)): with the
                bias logit s'_i = q_i.k'_h / sqrt(head_dim), p = softmax_n with log n = s'_i, and the output
                gains p'_i v'_h, p'_i = exp(s'_i) / (exp(s'_i) + sum_j exp(s_j))

The probabilities are materialised (B, H, T, T) in float32, as quietgpt's reference path does: this file is
for interoperability and inspection (`output_attentions=True` returns them; for the null variants and
kvbias a row sums to less than 1, the rest is what the head left on "nothing" or on k'), not for speed.
There is no KV cache: `generate` re-runs the whole (cropped) context for every token, as quietgpt's
GPT.generate does. Padding is supported through `attention_mask` (left padding for generation): padded
keys get weight 0 and add nothing to any denominator.
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

VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated", "softpick", "outgate", "sigmoid",
            "kvbias")
GATE_MODES = ("elementwise", "headwise", "constant")
NULL_LOGIT = ("softmax1", "softmax_n", "sink", "kvbias")  # softmax over the keys plus one null logit per row
SOFTPICK_EPS = 1e-8  # the default of softpick() in zaydzuhri/softpick-attention, as quietgpt uses it
_V5 = int(transformers.__version__.split(".")[0]) >= 5


class QuietGPTConfig(PretrainedConfig):
    """GPT-2 sizes under GPT-2's names (n_positions = quietgpt's block_size) plus quietgpt's attention
    settings: attention (one of VARIANTS), softmax_n, clip_gamma, clip_zeta, gate_mode (outgate: one of
    GATE_MODES), sigmoid_bias (sigmoid: "auto" or a finite number); gelu "none" (exact) or "tanh"; bias
    False drops the Linear and LayerNorm biases; gate_init and sink_init only matter for a model
    initialised from scratch."""

    model_type = "quietgpt"
    attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",  # noqa: RUF012 (HF's form)
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def __init__(self, vocab_size: int = 50304, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12,
                 n_head: int = 12, bias: bool = True, dropout: float = 0.0, attention: str = "softmax1",
                 softmax_n: float = 1.0, clip_gamma: float = -0.03, clip_zeta: float = 1.0, gelu: str = "none",
                 layer_norm_epsilon: float = 1e-5, gate_init: float = 0.25, sink_init: float = 0.0,
                 gate_mode: str = "elementwise", sigmoid_bias: str | float = "auto",
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, **kwargs):
        if attention not in VARIANTS:
            raise ValueError(f"attention {attention!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' or 'tanh', got {gelu!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode {gate_mode!r} is unknown; choose one of {', '.join(GATE_MODES)}")
        if sigmoid_bias != "auto":
            try:
                sigmoid_bias = float(sigmoid_bias)
            except (TypeError, ValueError):
                sigmoid_bias = math.nan
            if not math.isfinite(sigmoid_bias):
                raise ValueError(f"sigmoid_bias must be 'auto' (-log T) or a finite number, got {sigmoid_bias!r}")
        self.vocab_size, self.n_positions, self.n_embd = vocab_size, n_positions, n_embd
        self.n_layer, self.n_head, self.bias, self.dropout = n_layer, n_head, bias, dropout
        self.attention, self.softmax_n, self.clip_gamma, self.clip_zeta = attention, softmax_n, clip_gamma, clip_zeta
        self.gate_mode, self.sigmoid_bias = gate_mode, sigmoid_bias
        self.gelu, self.layer_norm_epsilon = gelu, layer_norm_epsilon
        self.gate_init, self.sink_init, self.initializer_range = gate_init, sink_init, initializer_range
        kwargs.setdefault("use_cache", False)  # no KV cache: generation recomputes the context
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def normalise(scores: torch.Tensor, allowed: torch.Tensor, config: QuietGPTConfig,
              null_logit: torch.Tensor | None, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention weights (B, H, T, T) float32 and, for the null-logit variants, the weight of the null entry
    (B, H, T, 1) (what kvbias puts on k'; None for the others), each formula of the module docstring once.

    scores (B, H, T, T) float32 with the keys a query may not see at -inf (future) or the dtype's minimum
    (padding); allowed (B, 1, T, T) bool, True where the query may see the key; null_logit the null entry's
    logit, broadcastable to (B, H, T, 1), for NULL_LOGIT; n_tokens (B, 1, 1, 1) the real tokens of each row
    (sigmoid's "auto" bias)."""
    variant = config.attention
    if variant in NULL_LOGIT:  # append log n, take an ordinary (max-shifted, overflow-free) softmax, split it
        null = null_logit.expand(*scores.shape[:-1], 1)
        p = torch.softmax(torch.cat([scores, null], dim=-1), dim=-1)
        return p[..., :-1], p[..., -1:]
    if variant == "softpick":  # shifted by c = max(row max, 0): exp(-c) cancels, and nothing overflows
        c = scores.masked_fill(~allowed, -math.inf).amax(-1, keepdim=True).clamp(min=0.0)
        d = torch.exp(scores - c) - torch.exp(-c)  # exp(-c) (exp(s) - 1)
        den = torch.where(allowed, d.abs(), 0.0).sum(-1, keepdim=True) + SOFTPICK_EPS * torch.exp(-c)
        return torch.where(allowed, torch.relu(d), 0.0) / den, None
    if variant == "sigmoid":
        b = -torch.log(n_tokens.float()) if config.sigmoid_bias == "auto" else float(config.sigmoid_bias)
        return torch.where(allowed, torch.sigmoid(scores + b), 0.0), None
    p = torch.softmax(scores, dim=-1)
    if variant == "clipped":
        gamma, zeta = float(config.clip_gamma), float(config.clip_zeta)
        p = ((zeta - gamma) * p + gamma).clamp(0.0, 1.0)
    return p, None


class Core(nn.Module):
    """The attention's own parameters: sink's learned null logit per head (quietgpt's attn.core.sink_logit),
    kvbias's learned key and value per head (attn.core.k_bias, attn.core.v_bias)."""

    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        sink, kv = config.attention == "sink", config.attention == "kvbias"
        head_dim = config.n_embd // config.n_head
        self.sink_logit = nn.Parameter(torch.full((config.n_head,), float(config.sink_init))) if sink else None
        self.k_bias = nn.Parameter(torch.zeros(config.n_head, head_dim)) if kv else None
        self.v_bias = nn.Parameter(torch.zeros(config.n_head, head_dim)) if kv else None


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


class OutputGate(nn.Module):
    """Qiu et al. 2025's G1 gate read from the whole block input: (B, T, C) -> (B, H, T, head_dim)
    elementwise, (B, H, T, 1) headwise, (1, H, 1, 1) constant (sigmoid of attn.gate.bias alone)."""

    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        self.n_head, mode = config.n_head, config.gate_mode
        width = {"elementwise": config.n_embd, "headwise": config.n_head}.get(mode)  # H * head_dim = n_embd
        self.weight = nn.Parameter(torch.zeros(width, config.n_embd)) if width is not None else None
        has_bias = config.bias or width is None
        self.bias = nn.Parameter(torch.zeros(width if width is not None else config.n_head)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return torch.sigmoid(self.bias).view(1, -1, 1, 1)
        B, T, _ = x.shape
        return torch.sigmoid(F.linear(x, self.weight, self.bias).view(B, T, self.n_head, -1)).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: QuietGPTConfig):
        super().__init__()
        self.config, self.n_head, self.n_embd = config, config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(config.dropout), nn.Dropout(config.dropout)
        self.core = Core(config)
        gates = {"gated": HeadGate, "outgate": OutputGate}
        self.gate = gates[config.attention](config) if config.attention in gates else None

    def null_logit(self, q: torch.Tensor, scale: float) -> torch.Tensor | None:
        """The null entry's logit, broadcastable to (B, H, T, 1): 0 (softmax1), log n (softmax_n), b_h (sink),
        q.k'_h * scale per query (kvbias); None for the other variants."""
        variant, device = self.config.attention, q.device
        if variant == "sink":
            return self.core.sink_logit.float().view(1, -1, 1, 1)
        if variant == "kvbias":
            return (q.float() * scale) @ self.core.k_bias.float().unsqueeze(-1)  # (B, H, T, D) @ (H, D, 1)
        if variant in ("softmax1", "softmax_n"):
            n = 1.0 if variant == "softmax1" else float(self.config.softmax_n)
            return torch.tensor(math.log(n) if n > 0 else -math.inf, device=device)
        return None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), mask (B, 1, 1, T) bool (True = a real token), n_tokens (B, 1, 1, 1) -> (output (B, T, C),
        weights (B, H, T, T))."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        scale = 1.0 / math.sqrt(C // self.n_head)
        scores = (q.float() * scale) @ k.float().transpose(-2, -1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # future keys -inf; padded keys the smallest finite value, so a row with only padding stays finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).masked_fill(~causal, -math.inf)
        probs, p_null = normalise(scores, mask & causal, self.config, self.null_logit(q, scale), n_tokens)
        y = self.attn_dropout(probs) @ v.float()
        if self.core.v_bias is not None:  # kvbias: the weight on k' reads v'
            y = y + self.attn_dropout(p_null) * self.core.v_bias.float().unsqueeze(1)  # (B, H, T, 1) x (H, 1, D)
        y = y.to(x.dtype)
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.attn(self.ln_1(x), mask, n_tokens)
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
        elif isinstance(module, OutputGate):  # as quietgpt (and Qiu et al.'s q_proj columns): gates start near 0.5
            if module.weight is not None:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Core):
            if module.sink_logit is not None:
                nn.init.constant_(module.sink_logit, float(self.config.sink_init))
            if module.k_bias is not None:  # Sun et al.'s init (locuslab/massive-activations)
                nn.init.normal_(module.k_bias, mean=0.0, std=std)
                nn.init.normal_(module.v_bias, mean=0.0, std=std)


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
        n_tokens = mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1, 1, 1): the length sigmoid's "auto" bias reads
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        hidden, attentions = [], []
        for block in self.transformer.h:
            hidden.append(x)
            x, probs = block(x, mask, n_tokens)
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
