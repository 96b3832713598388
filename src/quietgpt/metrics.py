"""Measure each link of the chain the study is about, the way Bondarenko et al. 2023 do:
outlier weights (kurtosis, max |w|) -> outlier activations (infinity norms, kurtosis, outlier dimensions)
-> heads that park their attention (unassigned mass, first-token mass, entropy) -> perplexity, in float
and after W8A8 (or any other) fake quantization.

`measure(model, dataset)` costs about one float pass over the validation split, one quantized pass per
quant config and a few calibration batches. One float pass computes both the perplexity and all
activation/attention statistics: the `n_sequences` sampled windows are ordinary perplexity windows
that run with the observation hooks on (and so on the reference attention path); every other window
runs on the fast path with no hooks.

Kurtosis is Pearson's, mu4 / sigma^4 (3 for a normal distribution), with the population (biased)
moments, computed in float64; `excess_kurtosis` = kurtosis - 3 (scipy's default "fisher" form).
Undefined values (a constant tensor) are None, never NaN.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QuietError
from .hf import load_hf_gpt2
from .model import GPT, SITES
from .quant import parse_quant_list, quantized
from .registry import ACTIVATIONS, eval_summary

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- moments and kurtosis


class Moments:
    """Streaming float64 count, mean and central moment sums M2..M4 of everything passed to `update`.

    Chunks are merged with the pairwise formulas of Pébay (2008), which are exact in exact arithmetic
    and stable in floating point, so memory is O(1) however many values stream through, and the result
    equals the one-shot computation over the concatenation up to rounding.
    """

    __slots__ = ("m2", "m3", "m4", "mean", "n")

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, x: Tensor | np.ndarray) -> Moments:
        """Fold in all values of x (any shape): the chunk's own central moments in float64, then a merge."""
        a = torch.as_tensor(x).detach().reshape(-1).to(torch.float64, copy=True)
        if a.numel() == 0:
            return self
        mean = float(a.mean())
        d = a.sub_(mean)
        d2 = d * d
        other = Moments()
        other.n, other.mean = a.numel(), mean
        # dot products: fused multiply-sums without temporaries
        other.m2, other.m3, other.m4 = float(d2.sum()), float(torch.dot(d2, d)), float(torch.dot(d2, d2))
        return self.merge(other)

    def update_power_sums(self, n: int, x: Tensor) -> Moments:
        """Fold in n values whose nonzero ones are all in x (x may hold extra exact zeros, e.g. masked
        attention weights, that are not counted). Uses float64 raw power sums, which is accurate when
        |mean| is not much larger than the spread (true for probabilities in [0, 1])."""
        a = x.detach().reshape(-1).to(torch.float64)
        if n == 0:
            return self
        a2 = a * a
        s1, s2, s3, s4 = float(a.sum()), float(a2.sum()), float(torch.dot(a2, a)), float(torch.dot(a2, a2))
        mu = s1 / n
        other = Moments()
        other.n, other.mean = n, mu
        other.m2 = max(s2 - n * mu * mu, 0.0)
        other.m3 = s3 - 3 * mu * s2 + 2 * n * mu**3
        other.m4 = s4 - 4 * mu * s3 + 6 * mu * mu * s2 - 3 * n * mu**4
        return self.merge(other)

    def merge(self, o: Moments) -> Moments:
        """Fold o's values into self (in place) and return self."""
        if o.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = o.n, o.mean, o.m2, o.m3, o.m4
            return self
        na, nb = self.n, o.n
        n = na + nb
        delta = o.mean - self.mean
        d_n = delta / n
        m4 = (self.m4 + o.m4 + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * d_n * d_n * (na * na * o.m2 + nb * nb * self.m2) + 4.0 * d_n * (na * o.m3 - nb * self.m3))
        m3 = self.m3 + o.m3 + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * o.m2 - nb * self.m2)
        m2 = self.m2 + o.m2 + delta * d_n * na * nb
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + d_n * nb, m2, m3, m4
        return self

    @property
    def var(self) -> float | None:
        """Population variance (divide by n)."""
        return self.m2 / self.n if self.n else None

    def kurtosis(self, fisher: bool = False) -> float | None:
        """Pearson's n M4 / M2^2 (minus 3 when fisher); None for fewer than 2 values or zero variance."""
        if self.n < 2 or not self.m2 > 0.0:
            return None
        k = self.n * self.m4 / (self.m2 * self.m2)
        return k - 3.0 if fisher else k


def kurtosis(x: Tensor | np.ndarray, fisher: bool = False) -> float | None:
    """Kurtosis of all values of x in float64; Pearson's (normal = 3) unless fisher (normal = 0).
    Equals scipy.stats.kurtosis(x.ravel(), fisher=fisher, bias=True); None where that is NaN."""
    return Moments().update(x).kurtosis(fisher)


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


# ----------------------------------------------------------------------------- perplexity


def eval_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) windows covering a split of n_tokens tokens: every token after
    the first is predicted exactly once. Full block_size windows, then one shorter tail window."""
    n_pred = n_tokens - 1
    full = n_pred // block_size
    out = [(i * block_size, block_size) for i in range(full)]
    if n_pred - full * block_size > 0:
        out.append((full * block_size, n_pred - full * block_size))
    return out


def _batch(tokens: np.ndarray, windows: Sequence[tuple[int, int]], device) -> tuple[Tensor, Tensor]:
    x = np.stack([np.asarray(tokens[s:s + n]) for s, n in windows]).astype(np.int64)
    y = np.stack([np.asarray(tokens[s + 1:s + 1 + n]) for s, n in windows]).astype(np.int64)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


@torch.no_grad()
def nll_pass(model: GPT, tokens: np.ndarray, windows: Sequence[tuple[int, int]], *, batch_size: int = 16,
             device: str | torch.device = "cpu", observed: set[int] = frozenset(),
             collector: StatsCollector | None = None, observe_batch: int | None = None) -> tuple[float, int]:
    """Sum of token NLLs (nats, float64) and the token count over `windows` of `tokens`.

    Windows whose index is in `observed` run in their own batches (of at most `observe_batch`) with
    `collector` hooked to every observation site; the rest run hook-free on the fast path."""
    total, count = 0.0, 0
    groups: list[tuple[list[int], bool]] = []
    plain = [i for i in range(len(windows)) if i not in observed]
    obs = [i for i in range(len(windows)) if i in observed]
    for ids, is_obs, bs in ((plain, False, batch_size), (obs, True, observe_batch or batch_size)):
        cur: list[int] = []
        for i in ids:  # batches of equal-length windows
            if cur and (len(cur) == bs or windows[cur[-1]][1] != windows[i][1]):
                groups.append((cur, is_obs))
                cur = []
            cur.append(i)
        if cur:
            groups.append((cur, is_obs))
    for ids, is_obs in groups:
        x, y = _batch(tokens, [windows[i] for i in ids], device)
        if is_obs and collector is not None:
            collector.tokens = x
            with model.observe(collector):
                logits, _ = model(x)
        else:
            logits, _ = model(x)
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return total, count


def _ppl(nll: float, n: int) -> float:
    return math.exp(nll / n) if n else float("nan")


# ----------------------------------------------------------------------------- the measurement


@dataclass
class Measurement:
    """Everything `quietgpt eval` reports; `to_dict()` is its JSON (keys documented in the README)."""
    weights: list[dict]
    weights_by_layer: list[dict]
    activations: list[dict]
    attention: list[dict]
    perplexity: dict[str, float | int]  # fp, tokens, and one entry per quant config
    loss: dict[str, float]  # mean token NLL in nats: fp and one entry per quant config
    summary: dict[str, Any]
    quant: dict[str, dict]  # each quant config's settings
    model: dict
    checkpoint: str | None
    data: str | None
    n_sequences: int
    block_size: int
    seed: int
    calib_batches: int
    timings: dict[str, float]
    wall_s: float
    eval_tokens: int | None = None  # perplexity on the first eval_tokens validation tokens (None: all)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(obj):
    """Plain JSON types, with NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic | torch.Tensor):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _summary(weights, activations, attention, perplexity, quant: Sequence[str], eval_tokens: int | None) -> dict:
    """Every eval metric of the registry (registry.py: one definition each), plus where the largest
    activation kurtosis and |activation| sit (site, layer, dim, position, token), which are locations,
    not metrics."""
    ev = {"weights": weights, "activations": activations, "attention": attention, "perplexity": perplexity}
    out: dict[str, Any] = eval_summary(ev, quant, eval_tokens)
    acts = [a for a in ACTIVATIONS.entries(ev) if a["kurtosis"] is not None]
    if acts:
        worst = max(acts, key=lambda a: a["kurtosis"])
        out["act_kurtosis_max_at"] = dict(site=worst["site"], layer=worst["layer"])
        big = max(acts, key=lambda a: a["inf_norm_max"])
        out["act_inf_norm_max_at"] = dict(site=big["site"], layer=big["layer"], **big["max"])
    return out


def _calibration_batches(train: np.ndarray, n: int, batch_size: int, block_size: int, seed: int,
                         device) -> list[Tensor]:
    """n seeded (batch_size, block_size) int64 batches of random contiguous windows of `train`."""
    T = min(block_size, len(train) - 1)
    if T < 1:
        raise QuietError("the training split is too short to calibrate quantization; prepare more data")
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(train) - T, (batch_size,), generator=g).tolist()
        out.append(torch.from_numpy(np.stack([np.asarray(train[s:s + T]) for s in starts]).astype(np.int64)).to(device))
    return out


def measure(model: GPT, dataset, *, quant: Sequence[str] | str = ("w8a8",), n_sequences: int = 64,
            calib_batches: int = 16, seed: int = 0, device: str | torch.device = "cpu",
            batch_size: int = 16, calib_batch_size: int = 8, block_size: int | None = None, top_k: int = 5,
            checkpoint: str | None = None, data: str | None = None, eval_tokens: int | None = None) -> Measurement:
    """Measure `model` on `dataset` (anything with 1-D integer arrays .train and .val and .vocab_size).

    Float perplexity over the whole validation split (or its first `eval_tokens` tokens) in
    non-overlapping windows of block_size (default: the model's); activation and attention statistics
    over `n_sequences` full windows drawn from those with `seed`; weight statistics; and for each quant
    config (see quant.parse_quant), perplexity of the fake-quantized model calibrated on `calib_batches`
    seeded batches of the training split. The model is left as it was (weights restored, hooks removed,
    train/eval mode kept).
    """
    t_start = time.perf_counter()
    configs = parse_quant_list(quant)
    T = min(block_size or model.config.block_size, model.config.block_size)
    if eval_tokens is not None and (isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int)
                                    or eval_tokens < 2):
        raise QuietError(f"eval_tokens must be an integer >= 2 (or None for the whole split), got {eval_tokens!r}")
    val = dataset.val if eval_tokens is None else dataset.val[:eval_tokens]
    vocab = int(getattr(dataset, "vocab_size", 0) or 0)
    if vocab > model.config.vocab_size:
        raise QuietError(f"the data's vocabulary ({vocab} tokens) is larger than the model's "
                         f"({model.config.vocab_size}); evaluate on data prepared with the model's tokenizer")
    if len(val) < 2:
        raise QuietError("the validation split has fewer than 2 tokens; prepare more data or raise data.val_fraction")
    top = int(np.max(val)) if len(val) else 0
    if top >= model.config.vocab_size:
        raise QuietError(f"the validation data has token id {top} but the model's vocabulary is "
                         f"{model.config.vocab_size}; evaluate on data prepared with the model's tokenizer")
    if n_sequences < 1:
        raise QuietError(f"n_sequences must be >= 1, got {n_sequences}")
    model = model.to(device)
    was_training = model.training
    model.eval()
    try:
        windows = eval_windows(len(val), T)
        full = [i for i, (_, n) in enumerate(windows) if n == T] or list(range(len(windows)))
        rng = np.random.default_rng(seed)
        sample = set(rng.choice(full, size=min(n_sequences, len(full)), replace=False).tolist())
        # keep one batch's (B, T, vocab) logits and, on the reference path, (B, H, T, T) probabilities modest
        batch_size = max(1, min(batch_size, 2**27 // (T * model.config.vocab_size)))
        obs_batch = max(1, min(batch_size, 2**24 // (model.config.n_head * T * T)))
        collector = StatsCollector(top_k)
        timings = {}
        t0 = time.perf_counter()
        nll, ntok = nll_pass(model, val, windows, batch_size=batch_size, device=device, observed=sample,
                             collector=collector, observe_batch=obs_batch)
        timings["fp_and_stats_s"] = time.perf_counter() - t0
        perplexity: dict[str, float | int] = {"fp": _ppl(nll, ntok), "tokens": ntok}
        loss = {"fp": nll / ntok}
        t0 = time.perf_counter()
        weights, by_layer = weight_stats(model)
        timings["weights_s"] = time.perf_counter() - t0
        calib_batch_size = max(1, min(calib_batch_size, 2**27 // (T * model.config.vocab_size)))
        calib = (_calibration_batches(dataset.train, calib_batches, calib_batch_size, T, seed, device)
                 if configs else [])
        timings["calib_s"] = 0.0
        for cfg in configs:
            t0 = time.perf_counter()
            with quantized(model, cfg, calib):
                t1 = time.perf_counter()
                timings["calib_s"] += t1 - t0
                nll_q, _ = nll_pass(model, val, windows, batch_size=batch_size, device=device)
            timings[f"{cfg.name}_s"] = time.perf_counter() - t1
            perplexity[cfg.name] = _ppl(nll_q, ntok)
            loss[cfg.name] = nll_q / ntok
        activations, attention = collector.activation_rows(), collector.attention_rows()
        summary = _summary(weights, activations, attention, perplexity, [c.name for c in configs], eval_tokens)
        return Measurement(
            weights=weights, weights_by_layer=by_layer, activations=activations, attention=attention,
            perplexity=perplexity, loss=loss, summary=summary,
            quant={c.name: c.to_dict() for c in configs}, model=model.config.to_dict(), checkpoint=checkpoint,
            data=data, n_sequences=len(sample), block_size=T, seed=seed, calib_batches=calib_batches,
            timings=timings, wall_s=time.perf_counter() - t_start, eval_tokens=eval_tokens,
        )
    finally:
        model.train(was_training)


def evaluate_checkpoint(ckpt_dir: str | Path, *, data: str | None = None, quant: Sequence[str] | str = ("w8a8",),
                        device: str = "cpu", **kw) -> dict:
    """load_model(ckpt_dir) + prepare(its data config, with the source replaced by `data` if given)
    + measure(...).to_dict(). Raises QuietError for a missing/bad checkpoint or mismatched data."""
    import dataclasses

    from .checkpoint import load_model

    parse_quant_list(quant)  # fail on a bad config before loading anything
    model, cfg = load_model(ckpt_dir, device=device)
    from .data import prepare

    data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, source=data)
    try:
        dataset = prepare(data_cfg)
    except QuietError as e:
        raise QuietError(_eval_advice(str(e), hf=False)) from None
    _check_tokenizer(ckpt_dir, dataset)
    return measure(model, dataset, quant=quant, device=device, checkpoint=str(ckpt_dir),
                   data=data_cfg.source, **kw).to_dict()


def _eval_advice(msg: str, *, hf: bool) -> str:
    """data.py's advice for train/prepare names `--set data.tokenizer=X`; `eval` has no --set: with --hf it
    takes --tokenizer X, and a checkpoint must be read with its own tokenizer."""
    if hf:
        return re.sub(r"--set data\.tokenizer=(\w+)", r"--tokenizer \1", msg)
    msg = re.sub(r",? or use --set data\.tokenizer=\w+", "", msg)
    return re.sub(r"use --set data\.tokenizer=\w+", "pass --data that the checkpoint's own tokenizer reads", msg)


def _check_tokenizer(ckpt_dir, dataset) -> None:
    """If the checkpoint recorded its tokenizer (config.json "tokenizer"), the data must use the same one:
    two char vocabularies of equal size can still map ids to different characters."""
    import json

    try:
        meta = json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    want = meta.get("tokenizer") if isinstance(meta, dict) else None
    tok = getattr(dataset, "tokenizer", None)
    have = tok.to_meta() if tok is not None and hasattr(tok, "to_meta") else None
    if isinstance(want, dict) and isinstance(have, dict) and want != have:
        raise QuietError(f"the data's tokenizer ({have.get('name', have)}) differs from the one the checkpoint "
                         f"was trained with ({want.get('name', want)}); pass --data prepared with the same tokenizer")


def evaluate_hf(path: str | Path, *, data: str, tokenizer: str | None = None, quant: Sequence[str] | str = ("w8a8",),
                device: str = "cpu", cache_dir: str = "", **kw) -> dict:
    """measure(...).to_dict() of a saved Hugging Face GPT-2 model on the data source `data`, tokenised
    with `tokenizer` (default: gpt2 when the model has GPT-2's vocabulary, else the data's default) and
    cached in `cache_dir` ("" = the default cache)."""
    from .config import DataConfig

    parse_quant_list(quant)
    model = load_hf_gpt2(path)
    from .data import prepare

    if tokenizer is None:
        tokenizer = "gpt2" if model.config.vocab_size >= 50257 else "auto"
    try:
        dataset = prepare(DataConfig(source=data, tokenizer=tokenizer, cache_dir=cache_dir))
    except QuietError as e:
        raise QuietError(_eval_advice(str(e), hf=True)) from None
    if dataset.vocab_size > model.config.vocab_size:
        raise QuietError(f"--tokenizer {tokenizer} gives a vocabulary of {dataset.vocab_size} tokens but the model "
                         f"in {path} has {model.config.vocab_size}; pass the --tokenizer the model was trained with "
                         "(auto, char, byte or gpt2)")
    return measure(model, dataset, quant=quant, device=device, checkpoint=str(path), data=data, **kw).to_dict()
