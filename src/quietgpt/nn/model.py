"""A GPT-2 language model in the manner of karpathy/nanoGPT, whose attention normaliser is a choice.

Everything but the attention core matches nanoGPT's model.py: token + learned position embeddings,
pre-LayerNorm blocks, fused qkv projection, 4x GELU MLP, final LayerNorm, lm_head tied to the token
embedding, optional biases, dropout, N(0, 0.02) init with residual projections scaled by
1/sqrt(2 n_layer). Four variants add parameters: "sink" (one logit per head, in the attention core),
"kvbias" (a key and a value per head, in the core), "gated" (a per-head sigmoid gate on each head's
output, Bondarenko et al. 2023) and "outgate" (Qiu et al. 2025's G1 output gate: elementwise, headwise or
a learned constant). GPTConfig's attention settings (attention, softmax_n, clip_*, sigmoid_bias, dropout,
path, cuda_kernel, sink_init) reach the core as one frozen AttentionOptions, built once per block by
`GPTConfig.attention_options()`. The options that belong to one variant (VARIANT_FIELDS) must stay at
their defaults on every other variant: "set" means "differs from its default".

Observation sites: nn.Identity taps through which activations pass. Forward hooks on them (see
`GPT.observe`) read, or replace, activations without touching the forward; with no hook a tap costs
one function call.
    embeddings   (B, T, C)  token + position embeddings (layer -1)
    attn_out     (B, T, C)  attention sub-block output after c_proj, before the residual add
    mlp_hidden   (B, T, 4C) MLP hidden after GELU
    mlp_out      (B, T, C)  MLP output after c_proj
    block_out    (B, T, C)  the residual stream after the block
    attn_probs   (B, H, T, T) attention weights (observing them runs the reference path)
    ln1_out      (B, T, C)  ln_1's output (the attention sub-block's input)
    ln2_out      (B, T, C)  ln_2's output (the MLP's input)
    lnf_out      (B, T, C)  the final LayerNorm's output (layer n_layer)
    attn_gate    (B, H, T, 1) the gate values in (0, 1) of gated attention (gated variants only)
The last four are hooks on the LayerNorm / HeadGate modules themselves (no extra tap): they exist for
the paper metrics (collectors.py) and are not in the eval JSON's "activations" rows.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from quietgpt.errors import ConfigError
from quietgpt.nn.attention import QuietAttention
from quietgpt.nn.gates import GATE_MODES, HeadGate, OutputGate
from quietgpt.nn.kernels import CUDA_KERNELS
from quietgpt.nn.norms import NORMS, QKNorm, make_norm
from quietgpt.nn.options import PATHS, AttentionOptions
from quietgpt.nn.softmax import check_clip_params
from quietgpt.nn.variants import VARIANT_FIELDS, VARIANTS

Tensor = torch.Tensor
SITES = ("embeddings", "attn_out", "mlp_hidden", "mlp_out", "block_out", "attn_probs", "ln1_out", "ln2_out",
         "lnf_out", "attn_gate")
BLOCKS = ("prenorm", "op")

# Every block's matmul weights (nn.Linear, y = x W^T), by their module name inside the block: the one
# definition of "the block's weights" for the weight-kurtosis metrics (measurement/registry.py), the per-layer
# pool of eval.json's weights_by_layer (measurement/collectors.py) and Muon's parameters (training/optim.py).
BLOCK_MATMULS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def is_block_matmul(name: str) -> bool:
    """Is a GPT parameter name ("transformer.h.3.mlp.c_fc.weight") one of a block's BLOCK_MATMULS weights?"""
    parts = name.split(".")
    return (len(parts) == 6 and parts[:2] == ["transformer", "h"] and parts[2].isdigit() and parts[5] == "weight"
            and f"{parts[3]}.{parts[4]}" in BLOCK_MATMULS)




@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed, as nanoGPT does
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, like GPT-2; False is a bit better/faster
    attention: str = "softmax"  # one of attention.VARIANTS
    softmax_n: float = 1.0  # n for attention="softmax_n"
    clip_gamma: float = -0.03  # clipped softmax's gamma (<= 0)
    clip_zeta: float = 1.0  # clipped softmax's zeta (>= 1)
    gate_init: float = 0.25  # gated attention: the gate's value at init (sigmoid of its bias)
    sink_init: float = 0.0  # sink: the learned null logit b_h at init (0 = starts as softmax1)
    gate_mode: str = "elementwise"  # outgate: elementwise | headwise | constant (Qiu et al.'s G1 gate)
    sigmoid_bias: str = "auto"  # sigmoid: b, "auto" (-log T, T the call's sequence length) or a number
    path: str = "auto"  # attention path: auto | fast | reference
    cuda_kernel: str = "auto"  # CUDA LSE kernel: auto (cuDNN where it runs, flash when compiled) | flash | cudnn
    gelu: str = "none"  # GELU approximation: "none" (exact, nanoGPT) or "tanh" (HF GPT-2's gelu_new)
    # recipes beyond the normaliser (docs/attention.md "Recipes"): the norm layer, the block, OSP's projections
    norm: str = "layernorm"  # layernorm | rmsnorm | ssnorm (OSP's single-scale RMSNorm); every norm of the model
    block: str = "prenorm"  # prenorm (GPT-2) | op (He et al.'s outlier-protected block)
    resid_gain: float = 0.2  # op only: each residual branch is added times this fixed gain (their mlp_block_resid_gain)
    embed_proj: bool = False  # OSP's embedding projections: C x C after the token embedding and before the head

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention not in VARIANTS:
            raise ConfigError(f"model.attention {self.attention!r} is unknown; choose one of {', '.join(VARIANTS)}")
        if self.path not in PATHS:
            raise ConfigError(f"model.path {self.path!r} is unknown; choose one of {', '.join(PATHS)}")
        if self.cuda_kernel not in CUDA_KERNELS:
            raise ConfigError(
                f"model.cuda_kernel {self.cuda_kernel!r} is unknown; choose one of {', '.join(CUDA_KERNELS)}"
            )
        if not (0.0 <= self.softmax_n < math.inf):
            raise ConfigError(f"model.softmax_n must be a finite number >= 0, got {self.softmax_n!r}")
        try:
            check_clip_params(self.clip_gamma, self.clip_zeta)
        except ConfigError as e:
            raise ConfigError(f"model.clip_gamma/clip_zeta: {e}") from None
        if not 0.0 < self.gate_init < 1.0:
            raise ConfigError(f"model.gate_init must be in (0, 1), got {self.gate_init!r}")
        if self.gelu not in ("none", "tanh"):
            raise ConfigError(f"model.gelu must be 'none' or 'tanh', got {self.gelu!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm {self.norm!r} is unknown; choose one of {', '.join(NORMS)}")
        if self.block not in BLOCKS:
            raise ConfigError(f"model.block {self.block!r} is unknown; choose one of {', '.join(BLOCKS)}")
        if self.block != "op" and self.resid_gain != 0.2:
            raise ConfigError("model.resid_gain belongs to model.block = 'op'; leave it at 0.2 or set model.block=op")
        if not 0.0 < self.resid_gain <= 1.0:
            raise ConfigError(f"model.resid_gain must be in (0, 1], got {self.resid_gain!r}")
        if self.path == "fast" and self.attention == "clipped":
            raise ConfigError("model.path 'fast' is impossible for attention 'clipped'; use path = 'auto'")
        self._check_variant_fields()
        self.attention_options()  # what only the attention core checks (e.g. path "fast" with dropout)

    def _check_variant_fields(self) -> None:
        if self.gate_mode not in GATE_MODES:
            raise ConfigError(f"model.gate_mode {self.gate_mode!r} is unknown; choose one of {', '.join(GATE_MODES)}")
        if isinstance(self.sigmoid_bias, int | float) and not isinstance(self.sigmoid_bias, bool):
            self.sigmoid_bias = repr(float(self.sigmoid_bias))  # a number given from Python: stored as text
        if self.sigmoid_bias != "auto" and _finite(self.sigmoid_bias) is None:
            raise ConfigError(f"model.sigmoid_bias must be 'auto' (-log T) or a finite number, "
                              f"got {self.sigmoid_bias!r}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, owner in VARIANT_FIELDS.items():
            if self.attention != owner and getattr(self, name) != defaults[name]:
                raise ConfigError(f"model.{name} belongs to attention {owner!r}, not {self.attention!r}; "
                                  f"leave it at its default ({defaults[name]!r}) or set model.attention = '{owner}'")

    def attention_options(self) -> AttentionOptions:
        """The attention core's settings (variant, n, clip, sigmoid bias, dropout, path, CUDA kernel, sink
        init) as one frozen AttentionOptions; every block's QuietAttention runs with these."""
        bias = None if self.sigmoid_bias == "auto" else _finite(self.sigmoid_bias)
        return AttentionOptions(variant=self.attention, n=self.softmax_n, gamma=self.clip_gamma,
                                zeta=self.clip_zeta, dropout=self.dropout, path=self.path,
                                cuda_kernel=self.cuda_kernel, sink_init=self.sink_init, sigmoid_bias=bias)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


def _finite(text: str) -> float | None:
    """float(text) if it is a finite number, else None."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.core = QuietAttention(config.n_head, config.attention_options(), head_dim, layer)
        self.gate: nn.Module | None = None
        if config.attention == "gated":
            self.gate = HeadGate(config.n_head, head_dim)
        elif config.attention == "outgate":
            self.gate = OutputGate(config.n_head, head_dim, config.n_embd, config.gate_mode, config.bias)
        # the outlier-protected block normalises each head's queries and keys (He et al.'s QK-norm)
        self.qk_norm = QKNorm(head_dim) if config.block == "op" else None
        self.tap_out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        gate = self.gate(x) if self.gate is not None else None  # (B, H, T, 1 or head_dim) or (1, H, 1, 1)
        y = self.core(q, k, v, gate=gate)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.tap_out(self.resid_dropout(self.c_proj(y)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.tap_hidden = nn.Identity()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.tap_out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.tap_hidden(self.gelu(self.c_fc(x)))
        return self.tap_out(self.dropout(self.c_proj(h)))


class Block(nn.Module):
    """GPT-2's pre-norm block, x + attn(ln_1(x)) then x + mlp(ln_2(x)); or He et al.'s outlier-protected block
    (model.block = "op", bobby-he/simplified_transformers, config/model/op.yaml and model_utils.py's
    myGPT2Block): no pre-norm on the branches (ln_1 kept in the first block only, their "embedding LN"; ln_f
    kept), QK-norm in the attention, each branch added times a fixed gain (resid_gain, their 0.2 for 18
    layers; O(1 / sqrt(depth)) in general). Where quietgpt's op differs from theirs: the MLP stays GELU (theirs
    ReLU) and the init stays nanoGPT's, so that the shared weights are every variant's at a seed."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        op = config.block == "op"
        self.ln_1 = make_norm(config.norm, config.n_embd, config.bias) if not op or layer == 0 else nn.Identity()
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.Identity() if op else make_norm(config.norm, config.n_embd, config.bias)
        self.mlp = MLP(config)
        self.gain = config.resid_gain if op else 1.0  # a constant, not a parameter (theirs are frozen)
        self.tap_resid = nn.Identity()  # the residual sum after attention (ln_2's input); quant.py hooks it
        self.tap_out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.gain == 1.0:  # GPT-2's block: no multiplication, bit for bit the pre-norm model
            x = self.tap_resid(x + self.attn(self.ln_1(x)))
            x = x + self.mlp(self.ln_2(x))
        else:
            x = self.tap_resid(x + self.gain * self.attn(self.ln_1(x)))
            x = x + self.gain * self.mlp(self.ln_2(x))
        return self.tap_out(x)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Paired comparisons need every variant to start from the same shared weights for a given seed.
        # Module constructors draw from the RNG (and variants construct different modules), so rewind
        # it after construction, initialise the shared parameters first, and variant extras last.
        rng_at_start = torch.random.get_rng_state()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config.norm, config.n_embd, config.bias),
        ))
        # OSP's embedding projections (C x C, identity at init: the model starts as the one without them)
        self.emb_proj = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.embed_proj else None
        self.head_proj = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.embed_proj else None
        self.tap_embeddings = nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and un-embeds.
        self.transformer.wte.weight = self.lm_head.weight
        torch.random.set_rng_state(rng_at_start)
        self.apply(self._init_weights)  # HeadGate is neither Linear nor Embedding: initialised below
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                # GPT-2's scaled init: each block adds two residual branches, so keep their sum's variance flat.
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self._init_variant_extras()

    def _init_variant_extras(self) -> None:
        """The variants' and recipes' own parameters, drawn after every shared one (so those match across
        variants and recipes). OSP's projections start as the identity (theirs are orthogonal at init: identity
        keeps the model's function at init, and the paired design, unchanged)."""
        c = self.config
        for proj in (self.emb_proj, self.head_proj):
            if proj is not None:
                torch.nn.init.eye_(proj.weight)
        for block in self.transformer.h:
            gate, core = block.attn.gate, block.attn.core
            if isinstance(gate, HeadGate):  # start every gate near gate_init; small random weights learn from there
                torch.nn.init.normal_(gate.weight, mean=0.0, std=0.02)
                torch.nn.init.constant_(gate.bias, math.log(c.gate_init / (1.0 - c.gate_init)))
            elif isinstance(gate, OutputGate) and gate.weight is not None:  # as q_proj's columns in Qiu et al.
                torch.nn.init.normal_(gate.weight, mean=0.0, std=0.02)
            if core.diff is not None:  # Ye et al.'s init: lambda's vectors N(0, 0.1) (multihead_diffattn.py)
                for vec in (core.diff.lq1, core.diff.lk1, core.diff.lq2, core.diff.lk2):
                    torch.nn.init.normal_(vec, mean=0.0, std=0.1)
            if core.k_bias is not None:  # Sun et al.'s init (locuslab/massive-activations, model_attn_bias.py)
                torch.nn.init.normal_(core.k_bias, mean=0.0, std=0.02)
                torch.nn.init.normal_(core.v_bias, mean=0.0, std=0.02)

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.emb_proj or module is self.head_proj:
            return  # a recipe's own parameters: set in _init_variant_extras, drawing nothing from the RNG
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---------------------------------------------------------------- forward and generation

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, last_only: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) int64 token ids, T <= block_size -> (logits (B, T, vocab) float, loss or None).

        loss is the mean cross-entropy over targets (B, T), entries -1 ignored. last_only returns
        logits for the last position only, (B, 1, vocab): what generation needs.
        """
        _, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {T}; block_size is {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        tok = self.transformer.wte(idx)
        if self.emb_proj is not None:
            tok = self.emb_proj(tok)
        x = self.transformer.drop(self.tap_embeddings(tok + self.transformer.wpe(pos)))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.head_proj is not None:
            x = self.head_proj(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :] if last_only else x), None

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None) -> Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        temperature 0 is greedy decoding; top_k keeps only the k most likely tokens; seed makes the
        samples reproducible without touching the global RNG. Call model.eval() first.
        """
        gen = None
        if seed is not None:
            gen = torch.Generator(device=idx.device)
            gen.manual_seed(seed)
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond, last_only=True)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=gen)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ---------------------------------------------------------------- bookkeeping

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token embeddings count, because
        they are tied to lm_head), as nanoGPT reports it."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at context `seq_len` (default block_size), the
        PaLM appendix B estimate nanoGPT's estimate_mfu uses: 6 N for the weights plus 12 L H Q T for
        the attention scores and values. Extra per-row work (softmax1's sigmoid, gates) is not counted,
        so every variant is held to the same yardstick in MFU."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length (e.g. a pretrained 1024 model used at 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ConfigError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: every >= 2-D tensor (matmul weights, embeddings, gate weights, kvbias's k' and v',
        as in Sun et al.'s nanoGPT code) decays; biases, LayerNorm parameters, sink logits and constant
        gate logits do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """nanoGPT's AdamW with decay/no-decay groups, fused where this torch supports it."""
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        extra = {"fused": True} if fused_ok else {}
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=learning_rate, betas=betas, **extra)

    def set_attention_path(self, path: str) -> None:
        """Switch every block's attention path (auto | fast | reference). The options are frozen (a
        compiled graph holds them as constants), so each block gets a checked copy."""
        for block in self.transformer.h:
            block.attn.core.opts = replace(block.attn.core.opts, path=path)

    def attention_paths(self) -> list[str | None]:
        """The path each block's attention ran on its last forward (None before the first)."""
        return [block.attn.core.last_path for block in self.transformer.h]

    # ---------------------------------------------------------------- observation

    def sites(self) -> Iterator[tuple[str, int, nn.Module]]:
        """(site, layer, tap module) for every observation site; embeddings are layer -1, ln_f's output
        layer n_layer; attn_gate only for blocks that have a gate."""
        yield "embeddings", -1, self.tap_embeddings
        for i, block in enumerate(self.transformer.h):
            yield "attn_probs", i, block.attn.core.tap_probs
            yield "attn_out", i, block.attn.tap_out
            yield "mlp_hidden", i, block.mlp.tap_hidden
            yield "mlp_out", i, block.mlp.tap_out
            yield "block_out", i, block.tap_out
            yield "ln1_out", i, block.ln_1
            yield "ln2_out", i, block.ln_2
            if block.attn.gate is not None:
                yield "attn_gate", i, block.attn.gate
        yield "lnf_out", len(self.transformer.h), self.transformer.ln_f

    @contextlib.contextmanager
    def observe(self, fn: Callable[[str, int, Tensor], Tensor | None],
                sites: tuple[str, ...] | None = None) -> Iterator[None]:
        """Call fn(site, layer, tensor) for every activation passing a tap while the context is open;
        a non-None return value replaces the activation (fake quantization uses this). `sites` limits
        which sites are observed; observing attn_probs runs those blocks' reference path."""
        wanted = SITES if sites is None else sites
        for s in wanted:
            if s not in SITES:
                raise ConfigError(f"unknown observation site {s!r}; choose from {', '.join(SITES)}")
        handles = []
        try:
            for site, layer, tap in self.sites():
                if site in wanted:
                    handles.append(tap.register_forward_hook(
                        lambda _m, _inp, out, site=site, layer=layer: fn(site, layer, out)))
            yield
        finally:
            for h in handles:
                h.remove()
