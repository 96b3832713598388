"""Seeds trained as one batched ensemble (nn/ensemble.py, training/ensemble.py): each member is exactly the solo
run it stands for (the same initial weights bit for bit, the same losses: equal in float64, within float32
rounding in float32), for every attention variant and optimizer; a member folder resumes alone or with its
ensemble; a member that goes non-finite stops alone; what cannot be batched is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quietgpt import GPT, GPTConfig
from quietgpt.cli import main
from quietgpt.config import load_config
from quietgpt.errors import ConfigError, QuietError
from quietgpt.runs.checkpoint import load_model
from quietgpt.training import ensemble as E
from quietgpt.training.loop import train

VARIANTS = ["softmax", "softmax1", "softmax_n", "sink", "clipped", "gated", "softpick", "outgate", "sigmoid", "kvbias"]


def tiny(cache: Path, **kw) -> dict:
    return {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 32, "train.batch_size": 4,
            "train.max_iters": 50, "train.lr_decay_iters": 50, "train.warmup_iters": 5, "train.eval_interval": 25,
            "train.eval_iters": 2, "train.log_interval": 1, "data.synthetic_tokens": 20000,
            "data.cache_dir": str(cache), "train.threads": 1, **kw}


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_ensemble_forward_and_gradients_are_each_members(variant, float64, ensemble_equals_members):
    """Three members with moved weights: logits, losses and every parameter gradient of the ensemble equal each
    member's own forward and backward to float64 rounding; the members' parameters are views of the stack."""
    members = []
    for s in range(3):
        torch.manual_seed(s)
        m = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, attention=variant, bias=True))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        members.append(m)
    ens = ensemble_equals_members(members, atol=1e-13)
    with torch.no_grad():  # a member's parameter is a view: the stack sees its change
        members[1].transformer.wpe.weight[0, 0] = 123.0
    assert float(ens.transformer.wpe.weight.detach()[1, 0, 0]) == 123.0


@pytest.mark.parametrize("dtype, tol", [("float64", 0.0), ("float32", 1e-5)])
@pytest.mark.parametrize("optimizer", ["adamw", "muon", "orthoadam"])
def test_each_member_is_its_solo_run(tmp_path, dtype, tol, optimizer):
    """The first 50 training losses of every member equal the solo run's (float64: to the bit; float32: within
    its rounding), and the initial weights are the solo run's bit for bit (the eval at iteration 0 agrees)."""
    torch.set_default_dtype(torch.float64 if dtype == "float64" else torch.float32)
    try:
        base = load_config("default", tiny(tmp_path / "c", **{"model.attention": "sink",
                                                              "train.optimizer": optimizer}))
        results = E.train_ensemble(E.ensemble_configs(base, [0, 1, 2], tmp_path / "ens"), progress=False)
        for s in (0, 1, 2):
            train(E.ensemble_configs(base, [s], tmp_path / "solo")[0], progress=False)
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(isinstance(r, dict) for r in results)
    for s in (0, 1, 2):
        a, b = losses(tmp_path / "ens" / f"s{s}"), losses(tmp_path / "solo" / f"s{s}")
        assert len(a) == len(b) == 50
        # Muon's Newton-Schulz runs in bfloat16: float32 rounding differences of the batched matmuls reach its
        # input and come out a little larger (float64 stays exact: the same math)
        assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= (tol * 100 if optimizer == "muon" else tol)
        rows = [map(json.loads, (tmp_path / d / f"s{s}" / "metrics.jsonl").read_text().splitlines())
                for d in ("ens", "solo")]
        evals = [next(r for r in rs if r.get("iter") == 0 and "val_loss" in r) for rs in rows]
        assert evals[0]["val_loss"] == evals[1]["val_loss"]  # the same init: the same step-0 eval, bit for bit


def test_resume_with_the_ensemble_or_alone_is_exact(tmp_path, float64):
    """An ensemble stopped at 20 of 40 iterations and resumed ends bit for bit where one run of 40 does; a
    member folder resumed alone (solo train --resume) ends there too, to float64 rounding (a solo step's
    matmuls round differently from the batched ones)."""
    base = load_config("default", tiny(tmp_path / "c", **{"train.max_iters": 40, "train.lr_decay_iters": 40,
                                                           "train.eval_interval": 10}))
    E.train_ensemble(E.ensemble_configs(base, [0, 1], tmp_path / "straight"), progress=False)
    short = load_config("default", tiny(tmp_path / "c", **{"train.max_iters": 20, "train.lr_decay_iters": 40,
                                                            "train.eval_interval": 10}))
    E.train_ensemble(E.ensemble_configs(short, [0, 1], tmp_path / "resumed"), progress=False)
    cfgs = E.ensemble_configs(base, [0, 1], tmp_path / "resumed")
    E.train_ensemble([cfgs[0]], resume=True, progress=False)  # member 0 alone, as a one-member ensemble
    train(cfgs[1], resume=True, progress=False)  # member 1 as a solo run
    for s in (0, 1):
        a, _ = load_model(tmp_path / "straight" / f"s{s}")
        b, _ = load_model(tmp_path / "resumed" / f"s{s}")
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(p, q) if s == 0 else torch.allclose(p, q, rtol=0, atol=1e-12), (s, name)


def test_members_at_different_iterations_wait_for_each_other(tmp_path, float64):
    """A member whose resume point is ahead (its checkpoints fell at other evals) waits until the others catch
    up, then all step together: the result is every member's straight run."""
    base = load_config("default", tiny(tmp_path / "c", **{"train.max_iters": 30, "train.lr_decay_iters": 30,
                                                           "train.eval_interval": 10}))
    E.train_ensemble(E.ensemble_configs(base, [0, 1], tmp_path / "straight"), progress=False)
    cfgs = E.ensemble_configs(base, [0, 1], tmp_path / "mixed")
    early = load_config("default", tiny(tmp_path / "c", **{"train.max_iters": 10, "train.lr_decay_iters": 30,
                                                            "train.eval_interval": 10}))
    E.train_ensemble(E.ensemble_configs(early, [0], tmp_path / "mixed"), progress=False)
    later = load_config("default", tiny(tmp_path / "c", **{"train.max_iters": 20, "train.lr_decay_iters": 30,
                                                            "train.eval_interval": 10}))
    E.train_ensemble(E.ensemble_configs(later, [1], tmp_path / "mixed"), progress=False)
    E.train_ensemble(cfgs, resume=True, progress=False)  # member 0 at 10, member 1 at 20
    for s in (0, 1):
        a, _ = load_model(tmp_path / "straight" / f"s{s}")
        b, _ = load_model(tmp_path / "mixed" / f"s{s}")
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
        assert losses(tmp_path / "mixed" / f"s{s}") == losses(tmp_path / "straight" / f"s{s}")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_member_that_goes_non_finite_follows_its_policy_alone(tmp_path, monkeypatch, policy):
    """Member seed 1's loss is made non-finite at iteration 7: with "stop" it fails (keeping its last good
    checkpoint) and the others finish; with "skip" that step is skipped and counted for it alone."""
    real = E.finish_step

    def poisoned(parts, loss_sum, accum, *, it, guard):
        if it == 7 and parts.base_model is members[1]:
            loss_sum = loss_sum * float("nan")
        return real(parts, loss_sum, accum, it=it, guard=guard)

    members: list = []
    real_ens = E.EnsembleGPT

    def spy(ms):
        members.extend(ms)
        return real_ens(ms)

    monkeypatch.setattr(E, "finish_step", poisoned)
    monkeypatch.setattr(E, "EnsembleGPT", spy)
    base = load_config("default", tiny(tmp_path / "c", **{"train.max_iters": 20, "train.nonfinite": policy,
                                                           "train.eval_interval": 5}))
    res = E.train_ensemble(E.ensemble_configs(base, [0, 1, 2], tmp_path / "e"), progress=False)
    assert isinstance(res[0], dict) and isinstance(res[2], dict)
    if policy == "stop":
        assert isinstance(res[1], E.MemberFailed) and "non-finite" in res[1].error and "iteration 7" in res[1].error
        assert json.loads((tmp_path / "e" / "s1" / "config.json").read_text())["iter"] == 5  # last good save
    else:
        assert res[1]["nonfinite_skips"] == 1 and res[0]["nonfinite_skips"] == 0
    assert res[0]["iters"] == 20 and json.loads((tmp_path / "e" / "s0" / "config.json").read_text())["iter"] == 20


@pytest.mark.parametrize("sets, words", [
    ({"model.dropout": 0.1}, "dropout"), ({"train.compile": "true"}, "train.compile"),
])
def test_what_cannot_be_batched_is_refused_in_one_line(tmp_path, sets, words):
    base = load_config("default", tiny(tmp_path / "c", **sets))
    with pytest.raises(ConfigError, match=words):
        E.train_ensemble(E.ensemble_configs(base, [0, 1], tmp_path / "e"), progress=False)
    other = load_config("default", tiny(tmp_path / "c", **{"model.n_layer": 1}))
    with pytest.raises(ConfigError, match="share every setting"):
        E.train_ensemble([E.ensemble_configs(load_config("default", tiny(tmp_path / "c")), [0], tmp_path / "a")[0],
                          E.ensemble_configs(other, [1], tmp_path / "b")[0]], progress=False)
    assert not (tmp_path / "e").exists()


def test_the_memory_estimate_caps_the_ensemble(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(E, "_available", lambda device: 3 * 2**20)
    rc = main(["train", "--seeds", "0-7", "--out", str(tmp_path / "e"),
               *[a for k, v in tiny(tmp_path / "c").items() for a in ("--set", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert rc == 2 and "train at most" in err and "seeds at once" in err and len(err.strip().splitlines()) == 1


def test_train_seeds_cli_and_its_bad_input(tmp_path, capsys):
    sets = [a for k, v in tiny(tmp_path / "c", **{"train.max_iters": 4}).items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "--seeds", "3,5", "--out", str(tmp_path / "e"), *sets]) == 0
    out = capsys.readouterr().out
    assert "seed 3:" in out and "seed 5:" in out and "peak memory" in out
    assert (tmp_path / "e" / "s3" / "model.safetensors").is_file()
    assert (tmp_path / "e" / "s5" / "summary.json").is_file()
    for bad in ("x", "3-1", "1,1"):
        assert main(["train", "--seeds", bad, "--out", str(tmp_path / "f"), *sets]) == 2
    assert main(["train", "--seeds", "0-1", "--seed", "2", "--out", str(tmp_path / "g"), *sets]) == 2
    assert E.parse_seeds("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(QuietError):
        E.parse_seeds("2-")
