"""The embedded synthetic corpus: determinism, grammar, and its irreducible loss (analytic vs empirical)."""

import math

import numpy as np
import pytest

from quietgpt.data import synthetic as S
from quietgpt.data.tokenizers import SyntheticTokenizer

N = 200_000


@pytest.fixture(scope="module")
def corpus():
    return S.generate(N, seed=7, with_logp=True)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = S.generate(20_000, 3), S.generate(20_000, 3), S.generate(20_000, 4)
    assert a.dtype == np.uint16 and a.shape == (20_000,)
    assert np.array_equal(a, b)
    assert (a != c).mean() > 0.5
    # a longer corpus starts with the shorter one (generation is a stream, not a function of length)
    assert np.array_equal(S.generate(30_000, 3)[:20_000], a)


def _walk(tokens):
    """Independent parser: yields (kind, key, answer, expected answer) for every statement."""
    spec = S.SPEC
    t = tokens.tolist()
    assert t[0] == S.NEW
    facts: dict[int, int] = {}
    p = 1
    while p < len(t) - 2:
        x = t[p]
        if x == S.NEW:
            facts = {}
            p += 1
        elif spec.filler0 <= x < spec.vocab_size:
            yield "filler", None, None, None
            p += 1
        elif x in (S.SET, S.GET):
            k, v = t[p + 1], t[p + 2]
            assert spec.key0 <= k < spec.value0, f"token after SET/GET at {p} is not a key"
            if x == S.SET:
                assert spec.value0 <= v < spec.filler0, f"SET k at {p} not followed by a value"
                facts[k] = v
                yield "set", k, v, None
            else:
                yield "get", k, v, facts.get(k, S.NONE)
            p += 3
        else:
            raise AssertionError(f"token {x} at {p} cannot start a statement")


def test_grammar_every_answer_is_the_latest_fact_or_none(corpus):
    tokens, _, _ = corpus
    stmts = list(_walk(tokens))
    gets = [s for s in stmts if s[0] == "get"]
    assert all(ans == expected for _, _, ans, expected in gets)
    none = sum(ans == S.NONE for _, _, ans, _ in gets)
    # both kinds of answer occur in earnest; overwritten keys occur too
    assert 0.2 < none / len(gets) < 0.8
    # long stretches of filler exist: the longest filler run is well above 10 tokens
    f = (tokens >= S.SPEC.filler0).astype(np.int8)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, f, 0])))[::2]
    assert runs.max() > 25


def test_tokenizer_round_trips_the_text_form():
    tok = SyntheticTokenizer()
    ids = S.generate(10_000, 1)
    text = tok.decode(ids)
    assert text.split()[:1] == ["NEW"]
    assert tok.encode(text) == ids.tolist()
    assert tok.vocab_size == S.SPEC.vocab_size == len(set(S.vocabulary())) == 52


def test_class_shares_match_the_analytic_ones(corpus):
    _, _, cls = corpus
    st = S.stats()
    share = np.bincount(cls, minlength=4) / len(cls)
    assert share[S.FILLER] == pytest.approx(st["share_filler"], abs=0.01)
    assert share[S.FACT] == pytest.approx(st["share_fact"], abs=0.01)
    assert share[S.QUERY] == pytest.approx(st["share_query"], abs=0.01)
    assert sum(st[k] for k in ("share_filler", "share_fact", "share_query", "share_new")) == pytest.approx(1.0)


def test_live_key_distribution_matches_simulation():
    # |S| at each statement start, simulated by walking the statements vs the chain's stationary law
    tokens = S.generate(N, seed=11)
    counts = np.zeros(S.SPEC.n_keys + 1)
    live: set = set()
    t = tokens.tolist()
    p = 1
    while p < len(t) - 2:
        counts[len(live)] += 1
        if t[p] == S.NEW:
            live = set()
            p += 1
        elif t[p] in (S.SET, S.GET):
            if t[p] == S.SET:
                live.add(t[p + 1])
            p += 3
        else:
            p += 1
    emp = counts / counts.sum()
    assert np.abs(emp - S.live_key_distribution()).max() < 0.02


def test_irreducible_loss_analytic_vs_empirical(corpus):
    _, logp, _ = corpus
    analytic = S.analytic_irreducible_loss()
    # hand check of the dominant term: filler tokens alone carry ln(16) + their type surprisal
    assert 2.0 < analytic < math.log(S.SPEC.vocab_size)
    nll = -logp
    # standard error from means of 1000-token blocks (tokens within a statement are correlated)
    blocks = nll[: len(nll) // 1000 * 1000].reshape(-1, 1000).mean(1)
    se = blocks.std(ddof=1) / math.sqrt(len(blocks))
    assert abs(nll.mean() - analytic) < 4 * se + 1e-3, (nll.mean(), analytic, se)
    # and the empirical estimate is sharp enough for the test to mean something
    assert se < 0.005


def test_irreducible_loss_changes_with_the_spec():
    # not a constant: e.g. more filler symbols add entropy in proportion to the filler share
    a = S.SyntheticSpec()
    b = S.SyntheticSpec(n_fillers=32)
    d = S.analytic_irreducible_loss(b) - S.analytic_irreducible_loss(a)
    assert d == pytest.approx(S.stats(a)["share_filler"] * math.log(2), rel=1e-9)


def test_window_floor_lies_above_the_entropy_rate_and_falls_with_the_window(corpus):
    tokens, logp, _ = corpus
    n = 100_000
    full = -logp[1:n].mean()  # the full-context loss of the same tokens
    floors = [S.window_floor(tokens[:n], T) for T in (32, 128, 512)]
    assert full < floors[2] < floors[1] < floors[0]
    assert floors[1] - full < 0.1  # the window costs a little, not a lot, at block 128


def test_window_floor_with_a_huge_window_approaches_the_entropy_rate(corpus):
    # with T far beyond every episode, truncation only hits j = 0 tokens: the floor tends to H
    tokens, logp, _ = corpus
    start = 1
    full = -logp[start:50_000].mean()
    assert S.window_floor(tokens[:50_000], 20_000) == pytest.approx(full, abs=2e-3)
