"""What one measurement reads off a model: per-tensor weight statistics, and an observation hook that
accumulates activation and attention statistics per (site, layer) and per (layer, head), plus each
outlier/sink paper's own statistic computed the way its code does (see "the papers' own statistics").

The rows these produce are the eval JSON's "weights", "activations" and "attention" sections and the
paper sections "sinks", "massive", "bondarenko", "first_token", "gates" and "sparsity"; the metric registry
(registry.py) reduces them to the reported numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from quietgpt.measurement.moments import Moments
from quietgpt.nn.model import GPT, SITES, is_block_matmul

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- weights


def weight_kind(name: str) -> str:
    """embedding | head | layernorm | bias | sink | kvbias | gate | lambda | linear, from a GPT parameter name
    ("head": lm_head's weight, listed only when it is not tied to wte). "linear" is exactly a block's matmul
    weights (model.BLOCK_MATMULS), the tensors weights_by_layer pools, so the pool holds the same tensors in
    every variant."""
    if ".wte." in f".{name}" or ".wpe." in f".{name}" or name in ("emb_proj.weight", "head_proj.weight"):
        return "embedding"  # (the recipes' embedding projections count with the embeddings)
    if name == "lm_head.weight":
        return "head"
    if ".ln_" in f".{name}" or ".qk_norm." in name or ".subln." in name:
        return "layernorm"  # every norm's gain and bias
    if name.endswith("sink_logit"):
        return "sink"
    if name.endswith((".core.k_bias", ".core.v_bias")):
        return "kvbias"
    if ".attn.gate." in name and not name.endswith(".bias"):
        return "gate"
    if name.endswith((".core.diff.lq1", ".core.diff.lk1", ".core.diff.lq2", ".core.diff.lk2")):
        return "lambda"  # diff's lambda re-parameterisation vectors lq1, lk1, lq2, lk2 (Ye et al., eq. 2)
    if name.endswith(".bias"):
        return "bias"
    if is_block_matmul(name):
        return "linear"
    raise ValueError(f"weight_kind: no kind for parameter {name!r}; add it here")


def _layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "transformer" and parts[1] == "h":
        return int(parts[2])
    return -1


def weight_stats(model: GPT) -> tuple[list[dict], list[dict]]:
    """Per parameter tensor: {name, layer, kind, module, numel, kurtosis, excess_kurtosis, max_abs}
    (layer -1 outside the blocks; wte is tied to lm_head and listed once), and per block, the same
    statistics pooled over that block's linear weights (kind "linear")."""
    rows, per_layer = [], {}
    for name, p in model.named_parameters():  # tied parameters appear once
        kind = weight_kind(name)
        layer = _layer_of(name)
        m = Moments().update(p)
        max_abs = float(p.detach().abs().max()) if p.numel() else 0.0
        module = name.rsplit(".", 1)[0]
        if layer >= 0:
            module = module.split(".", 3)[3] if module.count(".") >= 3 else module
        rows.append(dict(name=name, layer=layer, kind=kind, module=module, numel=p.numel(),
                         kurtosis=m.kurtosis(), excess_kurtosis=m.kurtosis(fisher=True), max_abs=max_abs))
        if kind == "linear" and layer >= 0:
            pm, mx, nn_ = per_layer.get(layer, (Moments(), 0.0, 0))
            per_layer[layer] = (pm.merge(m), max(mx, max_abs), nn_ + p.numel())
    by_layer = [dict(layer=layer, kind="linear", numel=n, kurtosis=m.kurtosis(),
                     excess_kurtosis=m.kurtosis(fisher=True), max_abs=mx)
                for layer, (m, mx, n) in sorted(per_layer.items())]
    return rows, by_layer


# ----------------------------------------------------------------------------- the papers' own statistics

SINK_EPS = 0.3  # Gu et al.'s epsilon for Sink_1^eps
SINK_TOKENS = 64  # Gu et al.'s token_length: alpha averages the first 64 query positions
MASSIVE_ABS, MASSIVE_REL = 100.0, 1000.0  # Sun et al.: |x| > 100 and about 1000x the median |x|
# Bondarenko et al.'s ACT_KEYS (validate_clm.py, OPT module names) as quietgpt sites, in their order:
# self_attn_layer_norm, self_attn.out_proj, final_layer_norm (the pre-FFN LayerNorm), fc2, the layer; all
# read at the module's OUTPUT (their hook keeps x_out), plus the decoder's final LayerNorm (lnf_out).
BONDARENKO_MODULES = {"ln1_out": "transformer.h.{}.ln_1", "attn_out": "transformer.h.{}.attn.c_proj",
                      "ln2_out": "transformer.h.{}.ln_2", "mlp_out": "transformer.h.{}.mlp.c_proj",
                      "block_out": "transformer.h.{}", "lnf_out": "transformer.ln_f"}
_PAPER_ONLY_SITES = ("ln1_out", "ln2_out", "lnf_out", "attn_gate")


def row_kurtosis(x: Tensor) -> Tensor:
    """x (..., n) -> (...) float64: Pearson's kurtosis (population moments, normal = 3; moments.py's
    definition) of each row of n values, NaN where a row is constant. Two passes in float64 (the row
    mean, then the deviations), so a large mean costs no precision."""
    d = x.reshape(-1, x.shape[-1]).to(torch.float64, copy=True)
    d -= d.mean(-1, keepdim=True)
    d.square_()
    m2, m4 = d.sum(-1), torch.linalg.vecdot(d, d)
    k = x.shape[-1] * m4 / (m2 * m2)
    return torch.where(m2 > 0, k, torch.nan).reshape(x.shape[:-1])


def _lower_median(a: Tensor) -> Tensor:
    """a (R, n) -> (R,): each row's ((n - 1) // 2)-th smallest value, torch.median's (lower) median; on CPU
    by numpy's introselect, ~8x faster than torch.median there."""
    if a.device.type != "cpu":
        return a.median(dim=1).values
    k = (a.shape[1] - 1) // 2
    return torch.from_numpy(np.partition(a.numpy(), k, axis=1)[:, k])


class _PaperStats:
    """Each paper's own outlier/sink statistic, accumulated over the observed batches, following its code.

    * Gu et al., ICLR 2025, "When Attention Sink Emerges in Language Models" (sail-sg/Attention-Sink,
      eval_sink_open_source.py): per sequence, layer and head, alpha = the attention weight on the first
      key averaged over the first `sink_tokens` (64) query positions, position 0 INCLUDED (their importance
      score divides the column sum by the T - k queries that see key k, all T for k = 0); Sink_1^eps =
      the share of (sequence, layer, head) with alpha > eps (their mean over samples, layers and heads of
      the indicator), per layer and overall. Causal attention makes the first 64 positions of a window
      exactly a 64-token forward, so no extra pass is needed.
    * Kaul et al., ICLR 2025, "From Attention to Activation" ("Llama attends maximally to the first token
      in 98% of heads"): first_token_argmax_share = the share of (sequence, head, query) with query
      position >= 1 (query 0 sees only key 0) whose weight on key 0 is larger than on any other key
      (strictly: a query that ties, e.g. all zeros, does not count), over the whole window. On the block
      output per layer, as we read their Table 2 (their code was not available to check): E_m[max_d
      |X_m,0,d|] and E_m[max_{t>=1,d} |X_m,t,d|] (means over sequences m), and the kurtosis of each
      token's C hidden values averaged over sequences for token 0 and over sequences and tokens >= 1 for
      the others (their kappa_{m,1} and kappa_{m,>1}; Pearson, population moments).
    * Sun et al. 2024, "Massive Activations in Large Language Models" (locuslab/massive-activations,
      main_llm.py --exp2): per sequence and layer, the largest |x| and torch.median (the lower middle
      value) of |x| over the block output's T * C values, averaged over sequences; their ratio; the count
      of massive activations, |x| > 100 and |x| > 1000 x that sequence's median (their Sec. 2's rough
      criterion: magnitude over 100 and about 1,000 times the median magnitude of the hidden state);
      and the top_k largest |x| with their (dim, position, token). Per-sequence medians are exact and need
      no storage of the pooled values (64 x 1024 x 768 floats per layer at GPT-2 small).
    * Bondarenko et al. 2023, "Quantizable Transformers" (Qualcomm-AI-research/outlier-free-transformers,
      validate_clm.py): per module in BONDARENKO_MODULES (outputs of ln_1, attn.c_proj, ln_2, mlp.c_proj,
      the block, ln_f), the infinity norm of each sequence's whole T x C output and its kurtosis, each
      averaged over sequences (their AverageMeter; their 101-batch kurtosis cap never binds on
      n_sequences windows). Kurtosis is Pearson's, as everywhere here: their utils.kurtosis divides by
      (unbiased std)^4 + 1e-6, which is Pearson's times ((n - 1) / n)^2 (1 - 2e-5 at n = T * C = 1e5)
      while std^4 >> 1e-6, but drags it towards 0 for small activations (std 1e-3 in an untrained
      model's branch outputs gives ~1e-5), so the eps is left out; constant sequences are skipped.
    * Qiu et al. 2025, "Gated Attention for Large Language Models": the mean gate value per layer (and per
      head), over every (sequence, position, head) of the attn_gate site; no rows without a gate.
    * Zuhri, Fuadi & Aji 2025, "Softpick" (the sparsity of the attention maps they report): per layer and
      head, the count of attention weights that are exactly 0 among the causally visible (query, key)
      pairs, key <= query (the masked future keys are zeros of the mask, not of the normaliser, so they are
      left out), over the observed sequences; zero_share = zeros / visible. Counted for every variant:
      softpick's ReLU and clipped softmax's clip make exact zeros by design, the exp-based normalisers and
      sigmoid only where float32 underflows.
    """

    def __init__(self, sink_eps: float = SINK_EPS, sink_tokens: int = SINK_TOKENS):
        self.sink_eps, self.sink_tokens = sink_eps, sink_tokens
        self.sink: dict[int, dict] = {}
        self.massive: dict[int, dict] = {}
        self.first: dict[int, dict] = {}
        self.bond: dict[tuple[str, int], list[float]] = {}
        self.gates: dict[int, dict] = {}
        self.sparsity: dict[int, dict] = {}

    def _sinks(self, layer: int, p: Tensor) -> None:
        B, H, T, _ = p.shape
        S = min(self.sink_tokens, T)
        alpha = p[:, :, :S, 0].sum(-1, dtype=torch.float64) / S  # (B, H)
        # queries >= 1 (query 0 has key 0 alone) whose weight on key 0 beats every other key's strictly: a
        # tie is no first-token maximum (a clipped-softmax query can put exactly 0 everywhere)
        q = p[:, :, 1:]
        first_max = ((q[..., 0] > q[..., 1:].amax(-1)).sum(dim=(0, 2)) if T > 1
                     else torch.zeros(H, dtype=torch.long, device=p.device))  # (H,)
        acc = self.sink.setdefault(layer, dict(alpha=0.0, sinks=0.0, first_max=0, n=0, queries=0, tokens=S))
        acc["alpha"] = acc["alpha"] + alpha.sum(0)
        acc["sinks"] = acc["sinks"] + (alpha > self.sink_eps).sum(0, dtype=torch.float64)
        acc["first_max"] = acc["first_max"] + first_max
        acc["n"] += B
        acc["queries"] += B * (T - 1)
        acc["tokens"] = min(acc["tokens"], S)

    def _zeros(self, layer: int, p: Tensor) -> None:
        B, _, T, Tk = p.shape
        visible = torch.ones(T, Tk, dtype=torch.bool, device=p.device).tril()  # key <= query
        zeros = (p == 0).logical_and_(visible).sum(dim=(0, 2, 3))  # (H,)
        acc = self.sparsity.setdefault(layer, dict(zeros=0, visible=0))
        acc["zeros"] = acc["zeros"] + zeros
        acc["visible"] += B * int(visible.sum())  # per head: every head sees the same pairs

    def _massive(self, layer: int, t: Tensor) -> None:
        B, T, C = t.shape
        a = t.abs().reshape(B, T * C).float()
        med = _lower_median(a)  # torch.median's lower middle value, as Sun et al. use it
        big = a > MASSIVE_ABS
        rel = a > MASSIVE_REL * med[:, None]
        acc = self.massive.setdefault(layer, dict(top1=0.0, median=0.0, n=0, abs=0, rel=0, both=0, top=[]))
        acc["top1"] += float(a.amax(1).sum(dtype=torch.float64))
        acc["median"] += float(med.sum(dtype=torch.float64))
        acc["n"] += B
        acc["abs"] += int(big.sum())
        acc["rel"] += int(rel.sum())
        acc["both"] += int((big & rel).sum())
        vals, idx = a.reshape(-1).topk(min(self.top_k, a.numel()))
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            b, pos, dim = i // (T * C), (i // C) % T, i % C
            acc["top"].append(dict(value=float(t[b, pos, dim]), abs=v, dim=dim, position=pos,
                                   token=self._token(b, pos)))
        acc["top"] = sorted(acc["top"], key=lambda e: -e["abs"])[:self.top_k]

    def _first_token(self, layer: int, t: Tensor) -> None:
        B, T, _ = t.shape
        mx = t.abs().amax(-1).double()  # (B, T)
        k = row_kurtosis(t)  # (B, T): each token's C hidden values
        acc = self.first.setdefault(layer, dict(max0=0.0, max1=0.0, n=0, n1=0, k0=0.0, k0n=0, k1=0.0, k1n=0))
        acc["max0"] += float(mx[:, 0].sum())
        acc["n"] += B
        ok = ~k.isnan()
        acc["k0"] += float(k[:, 0][ok[:, 0]].sum())
        acc["k0n"] += int(ok[:, 0].sum())
        if T > 1:
            acc["max1"] += float(mx[:, 1:].amax(1).sum())
            acc["n1"] += B
            acc["k1"] += float(k[:, 1:][ok[:, 1:]].sum())
            acc["k1n"] += int(ok[:, 1:].sum())

    def _bondarenko(self, site: str, layer: int, t: Tensor) -> None:
        x = t.reshape(t.shape[0], -1)  # their x.view(B, -1): each sequence's whole T x C output
        acc = self.bond.setdefault((site, layer), [0.0, 0, 0.0, 0])  # inf-norm sum, n, kurtosis sum, n
        acc[0] += float(x.abs().amax(1).sum(dtype=torch.float64))
        acc[1] += x.shape[0]
        k = row_kurtosis(x)
        ok = ~k.isnan()
        acc[2] += float(k[ok].sum())
        acc[3] += int(ok.sum())

    def _gate(self, site: str, layer: int, g: Tensor) -> None:
        acc = self.gates.setdefault(layer, dict(sum=0.0, n=0, heads=0.0, per_head=0))
        acc["sum"] += float(g.sum(dtype=torch.float64))
        acc["n"] += g.numel()
        if g.dim() == 4:  # (B, H, T, k): per head too
            acc["heads"] = acc["heads"] + g.sum(dim=(0, 2, 3), dtype=torch.float64)
            acc["per_head"] += g.numel() // g.shape[1]

    # ------------------------------------------------------------------ rows of the eval JSON

    def sink_rows(self) -> list[dict]:
        """Per layer: Gu et al.'s sink_rate (share of (sequence, head) with alpha > eps) and mean alpha,
        Kaul et al.'s first_token_argmax_share, and per head the same three."""
        rows = []
        for layer, acc in sorted(self.sink.items()):
            n, q = acc["n"], max(acc["queries"], 1)
            alpha, share, amax = acc["alpha"] / n, acc["sinks"] / n, acc["first_max"].double() / q
            heads = [dict(head=h, alpha=float(alpha[h]), sink_share=float(share[h]),
                          first_token_argmax_share=float(amax[h]) if acc["queries"] else None)
                     for h in range(alpha.numel())]
            rows.append(dict(layer=layer, eps=self.sink_eps, tokens=acc["tokens"], n_sequences=n,
                             sink_rate=float(share.mean()), alpha_mean=float(alpha.mean()),
                             first_token_argmax_share=float(amax.mean()) if acc["queries"] else None,
                             heads=heads))
        return rows

    def massive_rows(self) -> list[dict]:
        """Per layer (block output): Sun et al.'s per-sequence top-1 and median |x| (means over sequences),
        their ratio, the counts over the thresholds (totals over sequences, and massive per sequence), and
        the top_k largest |x| with their location."""
        rows = []
        for layer, acc in sorted(self.massive.items()):
            n = acc["n"]
            top1, med = acc["top1"] / n, acc["median"] / n
            rows.append(dict(layer=layer, n_sequences=n, top1_seq_mean=top1, median_seq_mean=med,
                             ratio=top1 / med if med > 0 else None, count_abs_over_100=acc["abs"],
                             count_over_1000x_median=acc["rel"], count_massive=acc["both"],
                             massive_per_sequence=acc["both"] / n, top=acc["top"]))
        return rows

    def first_token_rows(self) -> list[dict]:
        """Per layer (block output): Kaul et al.'s max |x| and token kurtosis, first token vs the others."""
        def mean(s, k):
            return s / k if k else None
        return [dict(layer=layer, n_sequences=a["n"], max_first=mean(a["max0"], a["n"]),
                     max_other=mean(a["max1"], a["n1"]), kurtosis_first=mean(a["k0"], a["k0n"]),
                     kurtosis_other=mean(a["k1"], a["k1n"]))
                for layer, a in sorted(self.first.items())]

    def bondarenko_rows(self) -> list[dict]:
        """Per module (Bondarenko et al.'s list, in layer order): the per-sequence infinity norm and
        kurtosis, each averaged over sequences."""
        order = list(BONDARENKO_MODULES)
        items = sorted(self.bond.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0])))
        return [dict(module=BONDARENKO_MODULES[site].format(layer), site=site, layer=layer, n_sequences=n,
                     inf_norm_seq_mean=inf / n, kurtosis_seq_mean=kurt / nk if nk else None)
                for (site, layer), (inf, n, kurt, nk) in items]

    def gate_rows(self) -> list[dict]:
        """Per gated layer: the mean gate value, and per head where the gate is (B, H, T, k)."""
        return [dict(layer=layer, mean=a["sum"] / a["n"],
                     heads=(a["heads"] / a["per_head"]).tolist() if a["per_head"] else None)
                for layer, a in sorted(self.gates.items())]

    def sparsity_rows(self) -> list[dict]:
        """Per layer: the exactly-zero attention weights among the causally visible (query, key) pairs of
        every head and observed sequence (zeros, visible, zero_share = zeros / visible), and per head."""
        rows = []
        for layer, acc in sorted(self.sparsity.items()):
            zeros, per_head = acc["zeros"], acc["visible"]
            heads = [dict(head=h, zeros=int(z), zero_share=int(z) / per_head) for h, z in enumerate(zeros.tolist())]
            total = sum(h["zeros"] for h in heads)
            rows.append(dict(layer=layer, zeros=total, visible=per_head * len(heads),
                             zero_share=total / (per_head * len(heads)), heads=heads))
        return rows

    def papers(self) -> dict[str, list[dict]]:
        """The six paper sections of the eval JSON, by name."""
        return dict(sinks=self.sink_rows(), massive=self.massive_rows(), bondarenko=self.bondarenko_rows(),
                    first_token=self.first_token_rows(), gates=self.gate_rows(), sparsity=self.sparsity_rows())


# ----------------------------------------------------------------------------- activations and attention


class _SiteStats:
    __slots__ = ("dim_max", "inf_max", "inf_n", "inf_sum", "max_at", "max_val", "moments")

    def __init__(self) -> None:
        self.inf_sum, self.inf_n, self.inf_max = 0.0, 0, 0.0
        self.moments = Moments()
        self.dim_max: Tensor | None = None
        self.max_val, self.max_at = -1.0, {}


class StatsCollector(_PaperStats):
    """An observation hook (pass it to GPT.observe) that accumulates, per (site, layer):
    infinity norms per sequence, streaming moments, per-dimension max |x| and the location of the
    largest |x|; per (layer, head) the attention statistics; and the papers' own statistics
    (_PaperStats: sink rate, massive activations, Bondarenko et al.'s per-sequence norms and kurtosis,
    first-token vs other-token statistics, gate means, exact zeros of the attention weights). Set
    `tokens` to the (B, T) input ids before each forward so outliers can be traced to a token. `top_k` is
    also the number of massive activations listed per layer; sink_eps and sink_tokens are Gu et al.'s
    epsilon and token length."""

    def __init__(self, top_k: int = 5, sink_eps: float = SINK_EPS, sink_tokens: int = SINK_TOKENS):
        self.top_k = top_k
        self.tokens: Tensor | None = None
        self.sites: dict[tuple[str, int], _SiteStats] = {}
        self.attn: dict[int, dict[str, Tensor | int]] = {}
        _PaperStats.__init__(self, sink_eps, sink_tokens)

    def __call__(self, site: str, layer: int, t: Tensor) -> None:
        t = t.detach()
        if site in _PAPER_ONLY_SITES:  # LayerNorm outputs and gates feed the paper statistics only
            (self._gate if site == "attn_gate" else self._bondarenko)(site, layer, t)
            return None
        st = self.sites.setdefault((site, layer), _SiteStats())
        probs = site == "attn_probs"
        a = t if probs else t.abs()  # probabilities are >= 0 already
        # max |x| over the last dim first: one full pass serves the per-sequence norm and the argmax
        row_max = a.amax(-1)  # (B, T) or (B, H, T)
        per_seq = row_max.flatten(1).amax(1)
        st.inf_sum += float(per_seq.sum(dtype=torch.float64))
        st.inf_n += per_seq.numel()
        st.inf_max = max(st.inf_max, float(per_seq.max()))
        lead = np.unravel_index(int(row_max.argmax()), tuple(row_max.shape))
        last = int(a[lead].argmax())
        val = float(t[(*lead, last)])
        if abs(val) > st.max_val:
            st.max_val = abs(val)
            b = int(lead[0])
            if probs:  # (B, H, Tq, Tk)
                q_pos = int(lead[2])
                st.max_at = dict(value=val, head=int(lead[1]), position=q_pos, key_position=last,
                                 token=self._token(b, q_pos))
            else:  # (B, T, C)
                pos = int(lead[1])
                st.max_at = dict(value=val, dim=last, position=pos, token=self._token(b, pos))
        if probs:
            # pooled over the entries a query can see only (masked ones are exact zeros, which add nothing to
            # the power sums; counting only the visible ones keeps them out of the statistics)
            B, H, T, _ = t.shape
            st.moments.update_power_sums(B * H * T * (T + 1) // 2, t)
            self._attention(layer, t)
            self._sinks(layer, t)
            self._zeros(layer, t)
        else:
            st.moments.update(t)
            dm = a.reshape(-1, a.shape[-1]).amax(0)
            st.dim_max = dm if st.dim_max is None else torch.maximum(st.dim_max, dm)
            if site in BONDARENKO_MODULES:
                self._bondarenko(site, layer, t)
            if site == "block_out":
                self._massive(layer, t)
                self._first_token(layer, t)
        return None

    def _token(self, b: int, pos: int) -> int | None:
        return int(self.tokens[b, pos]) if self.tokens is not None else None

    def _attention(self, layer: int, p: Tensor) -> None:
        # p (B, H, T, T): each query's weights over the keys it can see (zeros above the diagonal)
        kept = p.sum(-1, dtype=torch.float64)  # (B, H, T)
        unassigned = 1.0 - kept
        u = unassigned.clamp(min=0.0)
        # entropy (nats) of the full outcome distribution: the keys plus, for null-logit variants, "nothing"
        # (p log p with p = 0 giving 0: log of a clamped p, times p; ~10x faster than torch.xlogy on CPU)
        plogp = p * p.clamp_min(torch.finfo(p.dtype).tiny).log()
        ent = -(plogp.sum(-1, dtype=torch.float64) + torch.special.xlogy(u, u))
        acc = self.attn.setdefault(layer, {"n": 0})
        for key, v in (("unassigned", unassigned), ("first", p[..., 0].double()), ("entropy", ent)):
            s = v.sum(dim=(0, 2))
            acc[key] = acc[key] + s if key in acc else s
        acc["n"] += p.shape[0] * p.shape[2]

    def activation_rows(self) -> list[dict]:
        order = {s: i for i, s in enumerate(SITES)}
        rows = []
        for (site, layer), st in sorted(self.sites.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
            top = []
            if st.dim_max is not None:
                k = min(self.top_k, st.dim_max.numel())
                vals, dims = st.dim_max.topk(k)
                top = [dict(dim=int(d), max_abs=float(v)) for v, d in zip(vals, dims, strict=True)]
            rows.append(dict(
                site=site, layer=layer, numel=st.moments.n,
                inf_norm_mean=st.inf_sum / st.inf_n if st.inf_n else None, inf_norm_max=st.inf_max,
                kurtosis=st.moments.kurtosis(), excess_kurtosis=st.moments.kurtosis(fisher=True),
                mean=st.moments.mean, std=math.sqrt(st.moments.var) if st.moments.var is not None else None,
                top_dims=top, max=st.max_at,
            ))
        return rows

    def attention_rows(self) -> list[dict]:
        rows = []
        for layer, acc in sorted(self.attn.items()):
            n = acc["n"]
            for h in range(acc["unassigned"].numel()):
                rows.append(dict(layer=layer, head=h, unassigned_mass=float(acc["unassigned"][h]) / n,
                                 first_token_mass=float(acc["first"][h]) / n, entropy=float(acc["entropy"][h]) / n))
        return rows
