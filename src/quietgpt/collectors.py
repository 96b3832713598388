"""What one measurement reads off a model: per-tensor weight statistics, and an observation hook that
accumulates activation and attention statistics per (site, layer) and per (layer, head).

The rows these produce are the eval JSON's "weights", "activations" and "attention" sections; the metric
registry (registry.py) reduces them to the reported numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .model import GPT, SITES
from .moments import Moments

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- weights


def weight_kind(name: str) -> str:
    """embedding | layernorm | bias | sink | linear, from a GPT parameter name."""
    if ".wte." in f".{name}" or ".wpe." in f".{name}":
        return "embedding"
    if ".ln_" in f".{name}":
        return "layernorm"
    if name.endswith("sink_logit"):
        return "sink"
    if name.endswith(".bias"):
        return "bias"
    return "linear"


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


# ----------------------------------------------------------------------------- activations and attention


class _SiteStats:
    __slots__ = ("dim_max", "inf_max", "inf_n", "inf_sum", "max_at", "max_val", "moments")

    def __init__(self) -> None:
        self.inf_sum, self.inf_n, self.inf_max = 0.0, 0, 0.0
        self.moments = Moments()
        self.dim_max: Tensor | None = None
        self.max_val, self.max_at = -1.0, {}


class StatsCollector:
    """An observation hook (pass it to GPT.observe) that accumulates, per (site, layer):
    infinity norms per sequence, streaming moments, per-dimension max |x| and the location of the
    largest |x|; and per (layer, head) the attention statistics. Set `tokens` to the (B, T) input ids
    before each forward so outliers can be traced to a token."""

    def __init__(self, top_k: int = 5):
        self.top_k = top_k
        self.tokens: Tensor | None = None
        self.sites: dict[tuple[str, int], _SiteStats] = {}
        self.attn: dict[int, dict[str, Tensor | int]] = {}

    def __call__(self, site: str, layer: int, t: Tensor) -> None:
        t = t.detach()
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
        else:
            st.moments.update(t)
            dm = a.reshape(-1, a.shape[-1]).amax(0)
            st.dim_max = dm if st.dim_max is None else torch.maximum(st.dim_max, dm)
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
