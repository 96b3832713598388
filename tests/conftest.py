import collections
import itertools
import os
from pathlib import Path

import pytest
import torch

# Tests are small; more threads than cores only adds contention on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Runs set train.threads (torch's process-wide thread count); give every test the suite's own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shakespeare_path() -> Path:
    """tiny Shakespeare from ../shared beside the repo; tests using it skip when it is absent."""
    p = SHARED / "tinyshakespeare.txt"
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _small_bpe(text: str, n_merges: int = 150):
    """A tiktoken Encoding named gpt2 with GPT-2's split pattern and a BPE trained here on `text` (the real
    gpt2 files cannot be downloaded in tests): 256 byte tokens in a scrambled rank order, then up to
    n_merges merges."""
    import regex
    import tiktoken

    words = collections.Counter(regex.findall(GPT2_PATTERN, text))
    ranks = {bytes([b]): i for i, b in enumerate(sorted(range(256), key=lambda b: (b * 37) % 256))}
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for a, b in itertools.pairwise(s):
                pairs[a, b] += words[w]
        if not pairs:  # every word is one token already
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for s in seqs.values():
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.fixture
def small_bpe():
    """_small_bpe: a stand-in for tiktoken's gpt2 encoding, trained on a given text (needs tiktoken and regex)."""
    return _small_bpe


@pytest.fixture
def ensemble_equals_members():
    """A check: three members' EnsembleGPT gives each member's own logits, loss and parameter gradients (to atol)
    on one random batch per member; returns the ensemble."""

    def check(members, atol: float):
        from quietgpt.nn.ensemble import EnsembleGPT

        idx, tgt = torch.randint(0, 40, (len(members), 4, 16)), torch.randint(0, 40, (len(members), 4, 16))
        solo = [m(idx[i], tgt[i]) for i, m in enumerate(members)]
        grads = [torch.autograd.grad(solo[i][1], list(m.parameters())) for i, m in enumerate(members)]
        ens = EnsembleGPT(members)
        logits, loss = ens(idx, tgt)
        loss.sum().backward()
        ens.member_grads(members)
        for i, m in enumerate(members):
            assert torch.allclose(logits[i], solo[i][0], atol=atol)
            assert float(loss[i].detach() - solo[i][1].detach()) == pytest.approx(0)
            for g, p in zip(grads[i], m.parameters(), strict=True):
                assert torch.allclose(g, p.grad, atol=atol)
        return ens

    return check
