"""The metric registry: every per-run number quietgpt reports, defined once.

A `Metric` says what it measures (key, label, unit, a definition in words, the paper whose definition it
follows), which tensors or sites it reads (a `Selection` of the eval JSON's entries) and how it reduces
them, and which way is bad. Everything that shows a metric reads this table: `metrics.measure`'s
summary (and so `quietgpt eval`'s JSON and printout), the study's rows and results.csv, the report's
tables, definitions and per-layer plots. So a metric has one value wherever it appears, and a new one
is one entry here (plus, if it needs a new statistic, the collector in collectors.py that produces it).

Sources: "eval" metrics are computed from `Measurement.to_dict()` (eval.json), "train" metrics from
train()'s summary dict, "run" metrics are facts of the run itself (wall time), which the study records
but never compares: they are properties of the machine, not effects of the attention variant.

Trajectories: metrics flagged `trajectory` are also measured during training (training/outliers.py, every
train.outlier_interval steps, from the same `value`); `auc_metrics` derives from each a "trajectory" metric,
its mean level over training (`mean_level` of the points study/results.py reads from metrics.jsonl).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from quietgpt.nn.model import is_block_matmul
from quietgpt.nn.variants import NULL_VARIANTS

# ----------------------------------------------------------------------------- what a metric reads


def is_block_weight(entry: dict) -> bool:
    """The weights that enter weight_kurtosis_*: the four matmul weights of every block (model.BLOCK_MATMULS:
    attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj). Gate weights are left out on purpose: only gated variants
    have them, and a paired comparison must read the same tensors in every variant."""
    return is_block_matmul(str(entry.get("name", "")))


# Metrics that are 0 by definition for a variant whose attention rows sum to 1 (not in NULL_VARIANTS): a
# comparison of such a variant's value with another's holds by construction and is shown as "structural",
# never tested.
ZERO_UNLESS_NULL = ("unassigned_mass_mean",)


def zero_by_construction(metric: str, variant: str) -> bool:
    """Is `metric` (or its mean over training, auc_<metric>) 0 by definition for `variant` (an arm
    "variant+optimizer" counts as its variant)?"""
    base = metric[len("auc_"):] if metric.startswith("auc_") else metric
    return base in ZERO_UNLESS_NULL and variant.partition("+")[0] not in NULL_VARIANTS


ACT_SITES = ("embeddings", "attn_out", "mlp_hidden", "mlp_out", "block_out")  # every site but attn_probs


@dataclass(frozen=True)
class Selection:
    """Which entries of one eval JSON section ("weights", "activations", "attention") a metric reads."""
    section: str
    text: str  # what is selected, in words (goes into the metric's definition)
    keep: Callable[[dict], bool]

    def entries(self, ev: dict) -> list[dict]:
        return [e for e in ev.get(self.section) or [] if self.keep(e)]


BLOCK_WEIGHTS = Selection(
    "weights", "the block matmul weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of every layer; not "
    "embeddings, lm_head, LayerNorm, biases, sink logits or gate weights)", is_block_weight)
ACTIVATIONS = Selection(
    "activations", f"the observation sites {', '.join(ACT_SITES)} of every layer (all sites except attn_probs)",
    lambda e: e.get("site") in ACT_SITES)
BLOCK_OUT = Selection("activations", "the residual stream after each block (site block_out)",
                      lambda e: e.get("site") == "block_out")
HEADS = Selection("attention", "every (layer, head)", lambda e: True)
# the paper sections (collectors._PaperStats): one entry per layer, or per module for Bondarenko et al.'s
SINK_LAYERS = Selection("sinks", "every layer's attention", lambda e: True)
MASSIVE_LAYERS = Selection("massive", "every layer's block output (site block_out)", lambda e: True)
BONDARENKO_ACTS = Selection(
    "bondarenko", "Bondarenko et al.'s modules: the outputs of every layer's ln_1, attn.c_proj, ln_2, mlp.c_proj "
    "and block, and of ln_f", lambda e: True)
FIRST_TOKEN_LAYERS = Selection("first_token", "every layer's block output (site block_out)", lambda e: True)
GATED_LAYERS = Selection("gates", "every gated layer's attention gate", lambda e: True)
SPARSITY_LAYERS = Selection("sparsity", "every layer's attention", lambda e: True)


# ----------------------------------------------------------------------------- reductions


def number(x) -> float | None:
    """A finite float from a number or a {ppl|perplexity|value: number} dict, else None (never NaN)."""
    if isinstance(x, dict):
        x = next((x[k] for k in ("ppl", "perplexity", "value") if k in x), None)
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _reduce(fn: Callable[[list[float]], float]) -> Callable[[Sequence], float | None]:
    def reduce(values: Sequence) -> float | None:
        vals = [v for v in (number(x) for x in values) if v is not None]
        return float(fn(vals)) if vals else None
    return reduce


MAX, MEAN, SUM = _reduce(max), _reduce(np.mean), _reduce(sum)


# ----------------------------------------------------------------------------- the metric


@dataclass(frozen=True)
class Metric:
    """One reported number. Either `select` + `field` + `reduce` (a reduction over eval JSON entries) or
    `read(ev, summary)` (anything else) computes it; `value` is the one entry point."""
    key: str
    label: str
    unit: str
    definition: str  # what is measured and how it is reduced, in words
    paper: str  # whose definition this follows
    source: str  # "eval" | "train" | "run"
    higher_is_worse: bool | None = True  # None: no direction (a fact, or a property like abstention)
    select: Selection | None = None
    field: str | None = None
    reduce: Callable[[Sequence], float | None] | None = None
    read: Callable[[dict, dict], float | None] | None = None
    study: bool = True  # a column of the study's rows
    compared: bool = True  # in the study's paired comparisons
    headline: bool = False  # in the terminal summaries
    trajectory: bool = False  # also measured during training (train.outlier_interval; training/outliers.py)

    def value(self, ev: dict | None = None, summary: dict | None = None) -> float | None:
        """This metric of one run, from its eval JSON `ev` and its training summary; None when absent."""
        ev, summary = ev or {}, summary or {}
        if self.read is not None:
            return number(self.read(ev, summary))
        assert self.select is not None and self.field is not None and self.reduce is not None
        return self.reduce([e.get(self.field) for e in self.select.entries(ev)])

    def describe(self) -> dict:
        """The JSON description written into results.json's "metrics" (and shown by the report)."""
        return {"label": self.label, "unit": self.unit, "definition": self.definition, "paper": self.paper,
                "higher_is_worse": self.higher_is_worse, "headline": self.headline}


BONDARENKO = "Bondarenko et al. 2023, Quantizable Transformers (outlier-free-transformers)"
NANOGPT = "karpathy/nanoGPT train.py"
LLAMACPP = "llama.cpp's perplexity --kl-divergence (mean KLD, same top p)"
GU = "Gu et al. ICLR 2025, When Attention Sink Emerges in Language Models (sail-sg/Attention-Sink)"
KAUL = "Kaul et al. ICLR 2025, From Attention to Activation: Unravelling the Enigmas of LLMs"
SUN = "Sun et al. 2024, Massive Activations in Large Language Models (locuslab/massive-activations)"
QIU = "Qiu et al. 2025, Gated Attention for Large Language Models"
SOFTPICK = ("Zuhri, Fuadi & Aji 2025, Softpick: No Attention Sink, No Massive Activations with Rectified Softmax "
            "(zaydzuhri/softpick-attention)")


def _ppl_scope(eval_tokens: int | None) -> str:
    return (f"the first {eval_tokens:,} tokens of the validation split" if eval_tokens
            else "the whole validation split")


def _embedding_metrics() -> list[Metric]:
    """The position embedding's and the tied token embedding / lm_head's kurtosis and max |w|: tensors every
    grid that quantizes the embeddings and head rounds, but not in the block-weight metrics."""
    out = []
    for key, name, what in (("wpe", "transformer.wpe.weight", "the position embedding"),
                            ("wte", "transformer.wte.weight", "the token embedding (tied to lm_head)")):
        sel = Selection("weights", f"{what} ({name})", lambda e, name=name: e.get("name") == name)
        out += [Metric(f"{key}_kurtosis", f"{key} kurtosis", "kurtosis", f"Pearson kurtosis of {what}'s values",
                       BONDARENKO, "eval", select=sel, field="kurtosis", reduce=MAX),
                Metric(f"{key}_max_abs", f"{key} max |w|", "absolute value", f"largest |w| of {what}", BONDARENKO,
                       "eval", select=sel, field="max_abs", reduce=MAX)]
    return out


def _quant_metrics(quant: Sequence[str]) -> list[Metric]:
    """ppl_<q> for every quant config, then ppl_ratio_<q> for every one; the sweep's first config is the
    headline one."""
    def ppl(q: str) -> Callable[[dict, dict], float | None]:
        return lambda ev, s: (ev.get("perplexity") or {}).get(q)

    def ratio(q: str) -> Callable[[dict, dict], float | None]:
        def read(ev: dict, s: dict) -> float | None:
            p = ev.get("perplexity") or {}
            fp, pq = number(p.get("fp")), number(p.get(q))
            return pq / fp if fp and pq else None
        return read

    def section(name: str, q: str) -> Callable[[dict, dict], float | None]:
        return lambda ev, s: (ev.get(name) or {}).get(q)

    def how(q: str) -> tuple[str, str]:  # (what the perplexity is of, whose protocol)
        if q == "int8-dynamic":  # quant.int8_dynamic: real kernels, not the simulated grid
            return ("with PyTorch's dynamic int8 linear kernels (quantize_dynamic on every nn.Linear, lm_head "
                    "included: int8 weights, activations quantized per forward call; attention and residuals "
                    "float)", "PyTorch quantize_dynamic, as in the llama2.c softmax1 experiment")
        return (f"with simulated {q} quantization (quant/, docs/quantization.md; activation ranges calibrated on "
                "training batches)", BONDARENKO)

    # ppl_<q> is recorded but not compared: its comparison would repeat the penalty's (one metric per quantity)
    return [*(Metric(f"ppl_{q}", f"perplexity ({q})", "perplexity", f"perplexity {how(q)[0]}, on the same tokens "
                     "as the FP perplexity", how(q)[1], "eval", read=ppl(q), headline=i == 0, compared=False)
              for i, q in enumerate(quant)),
            *(Metric(f"ppl_ratio_{q}", f"{q} / FP perplexity", "ratio", f"ppl_{q} / ppl: the quantization "
                     "penalty (1 = none)", how(q)[1], "eval", read=ratio(q), headline=i == 0,
                     trajectory=True)
              for i, q in enumerate(quant)),
            *(Metric(f"kl_{q}", f"KL from FP ({q})", "nats/token", f"mean over the perplexity's tokens of KL(P_fp || "
                     f"P_q), the next-token distributions of the float model and of it {how(q)[0]}", LLAMACPP,
                     "eval", read=section("kl", q)) for q in quant),
            *(Metric(f"top1_{q}", f"top-1 agreement ({q})", "share", "share of the perplexity's tokens whose most "
                     f"likely next token is the float model's, {how(q)[0]}", LLAMACPP, "eval",
                     higher_is_worse=False, read=section("top1_agreement", q)) for q in quant)]


def _paper_metrics() -> list[Metric]:
    """Each outlier/sink paper's own number, computed as its code does (collectors._PaperStats)."""
    tok = "per layer, over the block output (site block_out)"
    return [
        Metric("sink_rate", "sink rate (Sink_1^0.3)", "share", "Gu et al.'s Sink_1^eps, eps = 0.3: the share of "
               "(sequence, layer, head) whose alpha, the attention weight on the first key averaged over the "
               "first 64 query positions (position 0 included), exceeds eps; the mean over layers",
               GU, "eval", select=SINK_LAYERS, field="sink_rate", reduce=MEAN, headline=True, trajectory=True),
        Metric("first_token_argmax_share", "first-token argmax share", "share", "the share of (sequence, layer, "
               "head, query position >= 1) whose largest attention weight is on the first key (Kaul et al.: "
               "heads 'attending maximally to the first token'); the mean over layers", KAUL, "eval",
               select=SINK_LAYERS, field="first_token_argmax_share", reduce=MEAN),
        Metric("attention_zero_share", "attention zero share (sparsity)", "share", "the share of attention "
               "weights that are exactly 0 among the causally visible (query, key) pairs, key <= query (masked "
               "future keys are left out: they are zeros of the mask, not of the normaliser), over every head "
               "and sampled sequence of " + SPARSITY_LAYERS.text + ", read off the reference path's weights (the "
               "sparsity of the attention maps Zuhri et al. report: softpick's ReLU gives 0 to every score <= 0); "
               "the mean over layers, which is the pooled share (every layer sees the same pairs). Measured, "
               "never assumed, for every variant, as unassigned mass is: clipped softmax's clip also makes exact "
               "zeros; softmax, the null-logit variants, the gates' softmax and sigmoid give exactly 0 only where "
               "float32 underflows (a score some 100 below its row's largest), so theirs is 0 or nearly, not 0 "
               "by construction", SOFTPICK, "eval", higher_is_worse=None, select=SPARSITY_LAYERS,
               field="zero_share", reduce=MEAN),
        Metric("massive_ratio_max", "massive activation ratio (layer max)", "ratio", "per layer, the largest "
               "|x| of the block output over its median |x|, each taken per sequence and averaged over the "
               "sampled sequences (Sun et al.'s top-1 and median curves); the max over layers", SUN, "eval",
               select=MASSIVE_LAYERS, field="ratio", reduce=MAX, trajectory=True),
        Metric("massive_count", "massive activations per sequence", "count", "the number of block-output "
               "values with |x| > 100 and |x| > 1000 x the median |x| of their sequence's layer output (Sun et "
               "al.'s criterion), summed over layers, averaged over the sampled sequences", SUN, "eval",
               select=MASSIVE_LAYERS, field="massive_per_sequence", reduce=SUM),
        Metric("bondarenko_max_inf_norm", "max inf. norm (Bondarenko)", "absolute value", "Bondarenko et al.'s "
               "'max inf. norm': per module, the infinity norm of each sequence's whole output averaged over the "
               "sampled sequences; the max over " + BONDARENKO_ACTS.text, BONDARENKO, "eval",
               select=BONDARENKO_ACTS, field="inf_norm_seq_mean", reduce=MAX, headline=True),
        Metric("bondarenko_avg_kurtosis", "avg. kurtosis (Bondarenko)", "kurtosis", "Bondarenko et al.'s 'avg. "
               "kurtosis': per module, the kurtosis (Pearson) of each sequence's whole output averaged over the "
               "sampled sequences; the mean over "
               + BONDARENKO_ACTS.text, BONDARENKO, "eval", select=BONDARENKO_ACTS,
               field="kurtosis_seq_mean", reduce=MEAN),
        Metric("act_max_first_token", "max |x|, first token", "absolute value", f"{tok}, the largest |x| of "
               "the first token's hidden vector averaged over sequences (Kaul et al.'s E_m[|X_m,1,d|]); the mean "
               "over layers", KAUL, "eval", select=FIRST_TOKEN_LAYERS, field="max_first", reduce=MEAN),
        Metric("act_max_other_tokens", "max |x|, other tokens", "absolute value", f"{tok}, the largest |x| "
               "over positions >= 1, averaged over sequences (Kaul et al.'s E_m[|X_m,>1,d|]); the mean over "
               "layers", KAUL, "eval", select=FIRST_TOKEN_LAYERS, field="max_other", reduce=MEAN),
        Metric("act_kurtosis_first_token", "kurtosis, first token", "kurtosis", f"{tok}, the kurtosis "
               "(Pearson) of the first token's hidden values, averaged over sequences (Kaul et al.'s "
               "E_m[kappa_m,1]); the mean over layers", KAUL, "eval", select=FIRST_TOKEN_LAYERS,
               field="kurtosis_first", reduce=MEAN),
        Metric("act_kurtosis_other_tokens", "kurtosis, other tokens", "kurtosis", f"{tok}, the kurtosis "
               "(Pearson) of each other token's hidden values, averaged over sequences and positions >= 1 "
               "(Kaul et al.'s E_m[kappa_m,>1]); the mean over layers", KAUL, "eval",
               select=FIRST_TOKEN_LAYERS, field="kurtosis_other", reduce=MEAN),
        Metric("gate_mean", "mean gate value", "gate value", "the mean of the attention gate's values over "
               "sequences, positions, heads and " + GATED_LAYERS.text + "; none for variants without a gate",
               QIU, "eval", higher_is_worse=None, select=GATED_LAYERS, field="mean", reduce=MEAN),
    ]


def catalogue(quant: Sequence[str] = ("w8a8",), eval_tokens: int | None = None) -> dict[str, Metric]:
    """Every metric, in report order, for a measurement with these quant configs and perplexity scope."""
    w = "each tensor's kurtosis (Pearson, normal = 3) over " + BLOCK_WEIGHTS.text
    first: list[Metric] = [
        Metric("val_loss", "validation loss", "nats/token", "train.py's final validation cross-entropy, mean "
               "over train.eval_iters random validation batches", NANOGPT, "train",
               read=lambda ev, s: s.get("val_loss"), headline=True),
        Metric("ppl", "perplexity (FP)", "perplexity", "exp of the mean cross-entropy of the final model over "
               f"{_ppl_scope(eval_tokens)} (non-overlapping windows of block_size), floating point", BONDARENKO,
               "eval", read=lambda ev, s: (ev.get("perplexity") or {}).get("fp"), headline=True),
        Metric("weight_kurtosis_mean", "weight kurtosis mean", "kurtosis", f"mean of {w}", BONDARENKO, "eval",
               select=BLOCK_WEIGHTS, field="kurtosis", reduce=MEAN),
        Metric("weight_kurtosis_max", "weight kurtosis max", "kurtosis", f"max of {w}", BONDARENKO, "eval",
               select=BLOCK_WEIGHTS, field="kurtosis", reduce=MAX, headline=True, trajectory=True),
        Metric("weight_max_abs", "weight max |w|", "absolute value", "largest |w| over " + BLOCK_WEIGHTS.text,
               BONDARENKO, "eval", select=BLOCK_WEIGHTS, field="max_abs", reduce=MAX),
        *_embedding_metrics(),
        Metric("act_inf_norm_max", "activation inf-norm max", "absolute value",
               "largest |activation| over " + ACTIVATIONS.text, BONDARENKO, "eval", select=ACTIVATIONS,
               field="inf_norm_max", reduce=MAX, headline=True, trajectory=True),
        Metric("act_kurtosis_mean", "activation kurtosis mean", "kurtosis", "mean over the same sites and "
               "layers of the activation tensor's kurtosis (Pearson, pooled over the sampled sequences)",
               BONDARENKO, "eval", select=ACTIVATIONS, field="kurtosis", reduce=MEAN, headline=True),
        Metric("act_kurtosis_max", "activation kurtosis max", "kurtosis", "max over the same sites and layers "
               "of the activation tensor's kurtosis", BONDARENKO, "eval", select=ACTIVATIONS, field="kurtosis",
               reduce=MAX, study=False),
        Metric("block_out_inf_norm_seq_mean_max", "block output inf-norm (sequence mean, layer max)",
               "absolute value", "per layer, the infinity norm of " + BLOCK_OUT.text + " per sequence, "
               "averaged over the sampled sequences; then the max over layers", BONDARENKO, "eval",
               select=BLOCK_OUT, field="inf_norm_mean", reduce=MAX, study=False, trajectory=True),
        Metric("block_out_kurtosis_mean", "block output kurtosis mean", "kurtosis", "mean over layers of the "
               "kurtosis of " + BLOCK_OUT.text, BONDARENKO, "eval", select=BLOCK_OUT, field="kurtosis",
               reduce=MEAN, study=False, trajectory=True),
        Metric("unassigned_mass_mean", "unassigned attention mass", "probability", "mean over layers, heads and "
               "query positions of 1 - sum of the attention weights (0 by construction for softmax)",
               "Miller 2023, Attention is off by one", "eval", higher_is_worse=None, select=HEADS,
               field="unassigned_mass", reduce=MEAN, headline=True, trajectory=True),
        Metric("first_token_mass_mean", "first-token attention mass", "probability", "mean over layers, heads "
               "and query positions of the attention weight on the first key", "Xiao et al. 2024, attention "
               "sinks", "eval", select=HEADS, field="first_token_mass", reduce=MEAN, study=False, trajectory=True),
        Metric("attention_entropy_mean", "attention entropy", "nats", "mean over layers, heads and query "
               "positions of the entropy of the attention distribution (keys plus 'nothing')", BONDARENKO,
               "eval", higher_is_worse=None, select=HEADS, field="entropy", reduce=MEAN, study=False),
        *_paper_metrics(),
    ]
    last = [
        Metric("tokens_per_s", "training tokens/s", "tokens/s", "training throughput (shared CPU: noisy with "
               "--jobs > 1)", NANOGPT, "train", higher_is_worse=False, read=lambda ev, s: s.get("tokens_per_s"),
               compared=False),
        Metric("wall_s", "run wall time (s)", "s", "seconds to train and measure the run", "-", "run",
               higher_is_worse=None, read=lambda ev, s: s.get("wall_s"), compared=False),
    ]
    return {m.key: m for m in (*first, *_quant_metrics(quant), *last)}


def eval_summary(ev: dict, quant: Sequence[str], eval_tokens: int | None = None) -> dict[str, float | None]:
    """{key: value} of every eval-sourced metric of one eval JSON (what `measure` puts in its summary)."""
    return {k: m.value(ev) for k, m in catalogue(quant, eval_tokens).items() if m.source == "eval"}


def study_metrics(quant: Sequence[str], eval_tokens: int | None = None) -> dict[str, Metric]:
    """The metrics a study records per run, in report order."""
    return {k: m for k, m in catalogue(quant, eval_tokens).items() if m.study}


# ----------------------------------------------------------------------------- trajectories


def trajectory_metrics(quant: Sequence[str] = ("w8a8", "w4a8")) -> dict[str, Metric]:
    """The eval metrics flagged `trajectory`, for a trajectory whose quantized points use these configs."""
    return {k: m for k, m in catalogue(quant).items() if m.trajectory and m.source == "eval"}


def mean_level(points: Sequence[tuple[float, float]] | None) -> float | None:
    """The area under a trajectory [(iteration, value), ...] (trapezoid rule, points sorted by iteration,
    non-finite values dropped) divided by the iteration span: the metric's mean level over training. One
    point: its value; none: None."""
    pts = sorted((float(i), v) for i, v in ((i, number(v)) for i, v in points or ()) if v is not None)
    if len(pts) < 2:
        return pts[0][1] if pts else None
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    span = xs[-1] - xs[0]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / span) if span > 0 else float(ys.mean())


def auc_metrics(quant: Sequence[str] = ("w8a8", "w4a8")) -> dict[str, Metric]:
    """auc_<key> for every trajectory metric: its mean_level over training, read from summary["trajectory"]
    ({key: [(iteration, value), ...]}, study/results.py gathers it from metrics.jsonl); compared like the
    final-step metrics, same direction."""
    def read(key: str) -> Callable[[dict, dict], float | None]:
        return lambda ev, s: mean_level((s.get("trajectory") or {}).get(key))

    return {f"auc_{k}": Metric(
        f"auc_{k}", f"{m.label}, mean over training", m.unit, f"area under the trajectory of {k} (measured every "
        "train.outlier_interval iterations on fixed validation windows; trapezoid rule) divided by the "
        "iteration span: its mean level over training", m.paper, "trajectory", m.higher_is_worse, read=read(k))
        for k, m in trajectory_metrics(quant).items()}
