"""The embedded synthetic corpus: filler, facts and recall queries (no files, no network).

Why this task: the question under study is whether attention heads that have nothing to do ("no-op"
heads) push their softmax mass onto a sink token and so grow outlier activations. This corpus gives
heads a reason to abstain: most tokens are filler that needs nothing from context, and a minority are
recall queries that need one specific earlier token.

Grammar (one stream of statements; each statement's type is drawn i.i.d.):

    stream    := NEW statement*
    statement := filler      (p_filler)   one filler token f_i, i uniform in [0, n_fillers)
               | fact        (p_set)      SET k v   with k uniform over keys, v uniform over values
               | query       (p_get)      GET k a   a = the value of the most recent SET k in this
                                                    episode, or NONE if k was not set in this episode
               | new         (p_new)      NEW       starts a new episode: forgets every fact

The key of a query is drawn like this: when some keys are set in the episode, with probability
`recall_bias` it is one of them (uniform), otherwise it is uniform over all keys (so set or not). So
some queries hit a key that never appeared in the episode (answer NONE) and some hit an overwritten
key (answer: the latest value). An episode is 33 tokens on average (geometric), so the facts a
query needs almost always lie inside a 128-token window.

Default mix (exact, from `stats()`): 61% of tokens are filler (runs of 5 on average, geometric tail),
18% facts, 18% queries (6% answers, 47% of them NONE), 3% NEW; irreducible loss 2.679 nats/token.
Sized for a 4-layer, 128-dim, block-128 model: the grammar and the filler statistics are learnt in a
few hundred iterations, while recall (an induction-style two-step lookup) is the slow, smaller part
of the loss: answers are 6% of tokens, worth ~0.13 nats/token between no recall and perfect recall.

Vocabulary (52 tokens; ids in this order): NEW=0, SET=1, GET=2, NONE=3, keys k0..k15 (4..19),
values v0..v15 (20..35), fillers f0..f15 (36..51). As text, tokens are these names separated by
spaces (`SyntheticTokenizer` in tokenizers.py encodes/decodes that text).

Irreducible loss. Every token but two kinds is an independent draw whose probability does not depend
on the past: a statement's first token (type + filler identity), the key after SET, the value after
SET k. The key after GET depends on the set S of keys set in the episode (recall_bias); the answer
after GET k is a deterministic function of the episode. So the entropy rate, in nats/token, is

    H = [H(first token) + p_set (ln n_keys + ln n_values) + p_get E_s H(key | |S| = s)] / E[len]
    E[len] = p_filler + 3 p_set + 3 p_get + p_new

where |S| follows a Markov chain over statements (NEW resets it, a SET of a new key adds one) whose
stationary distribution gives E_s. `analytic_irreducible_loss()` computes it exactly;
`generate(..., with_logp=True)` returns the generator's own log-probabilities, whose mean must agree.

A model that sees the whole episode reaches H. A model with a T-token window sometimes cannot see
the fact (or the NEW) an answer depends on, at the start of a window; `window_floor(tokens, T)` gives
the loss of an explicit window-limited predictor, an upper bound on what a perfect T-token model
reaches (the truth lies between H and it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Bump when the generator changes in any way, so prepared caches of the old corpus are not reused.
GENERATOR_VERSION = 1

# token classes (for shares and for tests)
FILLER, FACT, QUERY, NEWCLS = 0, 1, 2, 3
CLASS_NAMES = ("filler", "fact", "query", "new")


@dataclass(frozen=True)
class SyntheticSpec:
    n_keys: int = 16
    n_values: int = 16
    n_fillers: int = 16
    p_filler: float = 0.80  # statement-type probabilities (sum to 1)
    p_set: float = 0.08
    p_get: float = 0.08
    p_new: float = 0.04
    recall_bias: float = 0.75  # P(a query picks a key set in the episode | some key is set)

    def __post_init__(self) -> None:
        total = self.p_filler + self.p_set + self.p_get + self.p_new
        if abs(total - 1.0) > 1e-9 or min(self.p_filler, self.p_set, self.p_get, self.p_new) <= 0:
            raise ValueError(f"statement probabilities must be positive and sum to 1, got {total}")

    # token ids
    @property
    def key0(self) -> int:
        return 4

    @property
    def value0(self) -> int:
        return 4 + self.n_keys

    @property
    def filler0(self) -> int:
        return 4 + self.n_keys + self.n_values

    @property
    def vocab_size(self) -> int:
        return 4 + self.n_keys + self.n_values + self.n_fillers


SPEC = SyntheticSpec()
NEW, SET, GET, NONE = 0, 1, 2, 3


def vocabulary(spec: SyntheticSpec = SPEC) -> list[str]:
    """Token names, index = token id."""
    return (["NEW", "SET", "GET", "NONE"] + [f"k{i}" for i in range(spec.n_keys)]
            + [f"v{i}" for i in range(spec.n_values)] + [f"f{i}" for i in range(spec.n_fillers)])


def describe(spec: SyntheticSpec = SPEC) -> dict:
    """The generator's identity (what the cache key and meta.json record)."""
    return {"generator_version": GENERATOR_VERSION, **asdict(spec)}


# ----------------------------------------------------------------------------- generation


def generate(n_tokens: int, seed: int, spec: SyntheticSpec = SPEC, *, with_logp: bool = False):
    """The corpus: a pure function of (n_tokens, seed, spec).

    Returns tokens (n_tokens,) uint16; with with_logp also logp (n_tokens,) float64, the generator's
    own log-probability of each token given everything before it (0 for answers), and cls
    (n_tokens,) uint8, each token's class (FILLER, FACT, QUERY, NEWCLS).
    """
    rng = np.random.default_rng(seed)
    nk, nv, nf = spec.n_keys, spec.n_values, spec.n_fillers
    k0, v0, f0 = spec.key0, spec.value0, spec.filler0
    cum = np.cumsum([spec.p_filler, spec.p_set, spec.p_get])
    lp_filler = math.log(spec.p_filler / nf)
    lp_set, lp_get, lp_new = math.log(spec.p_set), math.log(spec.p_get), math.log(spec.p_new)
    lp_key, lp_val = -math.log(nk), -math.log(nv)
    alpha = spec.recall_bias

    toks: list[int] = [NEW]
    logp: list[float] = [0.0]  # the stream starts with NEW by definition
    cls: list[int] = [NEWCLS]
    value = [-1] * nk  # current episode: key -> value id (or -1)
    live: list[int] = []  # keys set in this episode, in order of first SET
    chunk = 65536
    while len(toks) < n_tokens:
        # draw a chunk of statements' random numbers at once (fast), then walk them in Python
        kind = np.searchsorted(cum, rng.random(chunk), side="right").tolist()
        key = rng.integers(nk, size=chunk).tolist()
        val = rng.integers(nv, size=chunk).tolist()
        fil = rng.integers(nf, size=chunk).tolist()
        coin = rng.random(chunk).tolist()
        pick = rng.random(chunk).tolist()
        for i in range(chunk):
            t = kind[i]
            if t == 0:  # filler
                toks.append(f0 + fil[i])
                logp.append(lp_filler)
                cls.append(FILLER)
            elif t == 1:  # SET k v
                k, v = key[i], val[i]
                if value[k] < 0:
                    live.append(k)
                value[k] = v
                toks += (SET, k0 + k, v0 + v)
                logp += (lp_set, lp_key, lp_val)
                cls += (FACT,) * 3
            elif t == 2:  # GET k a
                s = len(live)
                if s and coin[i] < alpha:
                    k = live[int(pick[i] * s)]
                else:
                    k = key[i]
                pk = (alpha * (value[k] >= 0) / s + (1 - alpha) / nk) if s else 1 / nk
                a = v0 + value[k] if value[k] >= 0 else NONE
                toks += (GET, k0 + k, a)
                logp += (lp_get, math.log(pk), 0.0)
                cls += (QUERY,) * 3
            else:  # NEW
                value = [-1] * nk
                live = []
                toks.append(NEW)
                logp.append(lp_new)
                cls.append(NEWCLS)
            if len(toks) >= n_tokens:
                break
    tokens = np.asarray(toks[:n_tokens], dtype=np.uint16)
    if not with_logp:
        return tokens
    return tokens, np.asarray(logp[:n_tokens], dtype=np.float64), np.asarray(cls[:n_tokens], dtype=np.uint8)


# ----------------------------------------------------------------------------- exact statistics


def live_key_distribution(spec: SyntheticSpec = SPEC) -> np.ndarray:
    """pi (n_keys + 1,): stationary P(|S| = s) at a statement's start, S = keys set in the episode.

    Per statement: NEW sends s to 0; SET sends s to s + 1 with probability (n_keys - s) / n_keys;
    filler and GET leave it.
    """
    n = spec.n_keys
    P = np.zeros((n + 1, n + 1))
    for s in range(n + 1):
        P[s, 0] += spec.p_new
        P[s, s] += spec.p_filler + spec.p_get + spec.p_set * s / n
        if s < n:
            P[s, s + 1] += spec.p_set * (n - s) / n
    # left eigenvector of P for eigenvalue 1: solve pi (P - I) = 0 with sum(pi) = 1
    A = np.vstack([(P - np.eye(n + 1)).T, np.ones(n + 1)])
    b = np.zeros(n + 2)
    b[-1] = 1.0
    return np.linalg.lstsq(A, b, rcond=None)[0]


def query_key_probs(s: int, spec: SyntheticSpec = SPEC) -> tuple[float, float]:
    """(P(a given set key), P(a given unset key)) for a query when s keys are set."""
    if s == 0:
        return 0.0, 1.0 / spec.n_keys
    b = (1 - spec.recall_bias) / spec.n_keys
    return spec.recall_bias / s + b, b


def stats(spec: SyntheticSpec = SPEC) -> dict:
    """Exact statistics of the process: irreducible loss (nats/token), token class shares, share of
    queries answered NONE, mean episode length in tokens."""
    pi = live_key_distribution(spec)
    nk = spec.n_keys
    h_qkey = 0.0  # E_s H(query key | s)
    p_none = 0.0
    for s in range(nk + 1):
        a, b = query_key_probs(s, spec)
        h = -(s * a * math.log(a) if s else 0.0) - (nk - s) * b * math.log(b)
        h_qkey += pi[s] * h
        p_none += pi[s] * (nk - s) * b  # the key drawn is unset -> NONE
    probs_first = [spec.p_set, spec.p_get, spec.p_new] + [spec.p_filler / spec.n_fillers] * spec.n_fillers
    h_first = -sum(p * math.log(p) for p in probs_first)
    h_stmt = h_first + spec.p_set * (math.log(nk) + math.log(spec.n_values)) + spec.p_get * h_qkey
    mean_len = spec.p_filler + 3 * spec.p_set + 3 * spec.p_get + spec.p_new
    return {
        "irreducible_loss": h_stmt / mean_len,
        "share_filler": spec.p_filler / mean_len,
        "share_fact": 3 * spec.p_set / mean_len,
        "share_query": 3 * spec.p_get / mean_len,
        "share_new": spec.p_new / mean_len,
        "share_answer": spec.p_get / mean_len,
        "answer_none_fraction": p_none,
        "mean_episode_tokens": mean_len / spec.p_new,
    }


def analytic_irreducible_loss(spec: SyntheticSpec = SPEC) -> float:
    """Entropy rate of the corpus, nats/token: the loss of a perfect model that sees whole episodes."""
    return stats(spec)["irreducible_loss"]


def window_floor(tokens: np.ndarray, block_size: int, spec: SyntheticSpec = SPEC) -> float:
    """Mean loss (nats/token) of an explicit predictor that sees only a window, as get_batch serves it.

    A target at window index j is predicted from the j + 1 tokens before it, j uniform in
    [0, block_size). The predictor is exact (the generator's own probabilities) except where the
    window hides what a token depends on: an answer whose deciding SET / earlier GET of the key / NEW is
    cut off gets P(NONE) = the corpus' NONE rate and the rest spread over the values; a query key is
    predicted from the keys whose SET is visible; a token after a lone key at j = 0 is a SET-value or
    answer mixture. Being a real window-limited predictor, its loss upper-bounds a perfect model's.
    Counts tokens from the first NEW in `tokens` on (a slice of the stream may start mid-episode).
    """
    T = block_size
    nk, nv = spec.n_keys, spec.n_values
    k0, v0, vend = spec.key0, spec.value0, spec.value0 + spec.n_values
    st = stats(spec)
    pi_none = st["answer_none_fraction"]
    w_set = spec.p_set / (spec.p_set + spec.p_get)  # P(SET | a key token with its marker unseen)
    lp_val = -math.log(nv)
    js = np.arange(T)
    # -log P(query key) when s keys are visibly set: for a set key (nl_set) and an unset key (nl_unset)
    probs = [query_key_probs(s, spec) for s in range(nk + 1)]
    nl_set = np.array([-math.log(a) if a > 0 else math.inf for a, _ in probs])
    nl_unset = np.array([-math.log(b) for _, b in probs])
    t = tokens.tolist()
    start = t.index(NEW) if NEW in t else len(t)
    total, count = 0.0, 0
    new_pos = start
    last_info: dict[int, int] = {}  # key -> position of its latest SET/GET statement in this episode
    last_set: dict[int, int] = {}  # key -> position of its latest SET in this episode
    p = start + 1
    while p < len(t):
        x = t[p]
        if x == NEW:
            total -= math.log(spec.p_new)
            count += 1
            new_pos, last_info, last_set = p, {}, {}
            p += 1
        elif x >= spec.filler0:
            total -= math.log(spec.p_filler / spec.n_fillers)
            count += 1
            p += 1
        elif x in (SET, GET):
            if p + 2 >= len(t):
                break
            k, a = t[p + 1] - k0, t[p + 2]
            if x == SET:
                loss = [-math.log(spec.p_set), math.log(nk), -lp_val]
                # the value: from a lone key (j = 0) it might be an answer
                loss[2] = (-math.log(w_set / nv + (1 - w_set) * (1 - pi_none) / nv) - loss[2]) / T + loss[2]
                last_set[k] = p
            else:
                # query key: from the keys whose SET is visible, i.e. SET position >= p - j
                dists = np.sort(np.array([p - q for q in last_set.values()], dtype=np.int64))
                s_vis = np.searchsorted(dists, js, side="right")  # (T,) keys visible at each j
                if k in last_set:
                    seen = js >= p - last_set[k]
                    key_loss = np.where(seen, nl_set[s_vis], nl_unset[s_vis]).mean()
                else:
                    key_loss = nl_unset[s_vis].mean()
                # answer at p + 2, context ends at p + 1; deciding info at position q is seen when j >= p + 1 - q
                d = p + 1 - max(last_info.get(k, new_pos), new_pos)
                none = a == NONE
                l_trunc = -math.log(pi_none if none else (1 - pi_none) / nv)
                l_lone = -math.log((w_set / nv if v0 <= a < vend else 0.0) + (1 - w_set) * math.exp(-l_trunc))
                n_trunc = max(0, min(d, T) - 1)  # j in [1, d)
                ans_loss = (l_lone + n_trunc * l_trunc) / T
                loss = [-math.log(spec.p_get), float(key_loss), ans_loss]
            last_info[k] = p
            total += sum(loss)
            count += 3
            p += 3
        else:
            raise ValueError(f"token {x} at {p} breaks the grammar")
    return total / max(count, 1)
