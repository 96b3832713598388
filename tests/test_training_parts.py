"""The parts of the training loop on their own: TrainState's round trip (and older checkpoints), train_step's
accumulation and non-finite policies, the progress printer, the run folder's cleanup."""

import math

import pytest
import torch

from quietgpt.config import TrainConfig
from quietgpt.nn.model import GPT, GPTConfig
from quietgpt.runs.lock import RunLock, remove_stale_temporaries
from quietgpt.training.state import TrainState
from quietgpt.training.step import NonFiniteError, NonFiniteGuard, build_step_parts, train_step
from quietgpt.utils.progress import Progress

CPU = torch.device("cpu")
# the keys train_state.pt has always had next to optimizer/scaler/model/config/extras/format_version
LEGACY_KEYS = {"iter", "best_val_loss", "rng", "nonfinite_skips", "tokens", "train_time_s", "wall_s", "world_size",
               "seed", "last_losses", "step_id", "best_step_id"}


def test_train_state_round_trip_and_old_checkpoints():
    st = TrainState(iter=7, best_val_loss=2.5, best_step_id="b", step_id="s", nonfinite_skips=1, tokens=448,
                    train_time_s=1.5, wall_s=3.0, last_losses={"train": 2.4, "val": 2.5},
                    rng={"torch": torch.get_rng_state(), "data": torch.Generator().get_state(), "cuda": torch.empty(0)},
                    world_size=2, seed=3)
    d = st.to_dict()
    assert set(d) == LEGACY_KEYS
    back = TrainState.from_dict({**d, "optimizer": {}, "model": {}})  # other entries are ignored
    assert back.to_dict().keys() == d.keys()
    for k in d:
        if k == "rng":
            assert all(torch.equal(back.rng[n], st.rng[n]) for n in st.rng)
        else:
            assert getattr(back, k) == getattr(st, k), k
    d["last_losses"]["val"] = 0.0  # to_dict's containers are copies
    assert st.last_losses["val"] == 2.5
    # an early checkpoint: only what load_train_state requires, plus best_val_loss
    old = TrainState.from_dict({"iter": 4, "best_val_loss": 3.0, "rng": {"data": torch.empty(0)}})
    assert (old.iter, old.nonfinite_skips, old.tokens, old.wall_s, old.last_losses, old.best_step_id) == \
        (4, 0, 0, 0.0, {}, None)
    with pytest.raises(KeyError):
        TrainState.from_dict({"best_val_loss": 1.0})
    assert math.isinf(TrainState().best_val_loss)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def _batch(seed: int, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(16, (b, 9), generator=g)
    return xy[:, :-1], xy[:, 1:]


def test_train_step_accumulation_equals_one_big_batch():
    tc = TrainConfig(dtype="float32")
    a, b = _model(), _model()
    pa, pb = build_step_parts(a, tc, CPU), build_step_parts(b, tc, CPU)
    (x1, y1), (x2, y2) = _batch(1), _batch(2)
    ra = train_step(pa, [(x1, y1), (x2, y2)], it=0, lr=1e-2, guard=NonFiniteGuard(tc, CPU))
    rb = train_step(pb, [(torch.cat([x1, x2]), torch.cat([y1, y2]))], it=0, lr=1e-2, guard=NonFiniteGuard(tc, CPU))
    assert ra.micro_batches == 2 and not ra.skipped
    assert ra.mean_loss() == pytest.approx(rb.mean_loss(), abs=1e-6)
    assert float(ra.grad_norm) == pytest.approx(float(rb.grad_norm), rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in a.parameters())  # gradients are zeroed (set to None) after the step
    assert pa.optimizer.param_groups[0]["lr"] == 1e-2


def _poisoned(model: GPT) -> GPT:
    real = model.forward
    model.forward = lambda x, y=None: (lambda out: (out[0], out[1] * float("nan")))(real(x, y))
    return model


def test_train_step_nonfinite_policies(monkeypatch):
    stop = TrainConfig(dtype="float32", nonfinite="stop")
    parts = build_step_parts(_poisoned(_model()), stop, CPU)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at iteration 7 \(loss nan\); no checkpoint"):
        train_step(parts, [_batch(3)], it=7, lr=1e-3, guard=NonFiniteGuard(stop, CPU))

    skip = TrainConfig(dtype="float32", nonfinite="skip", max_nonfinite_skips=1)
    model = _poisoned(_model())
    before = [p.detach().clone() for p in model.parameters()]
    parts, guard = build_step_parts(model, skip, CPU), NonFiniteGuard(skip, CPU, kept=lambda: "KEPT")
    r = train_step(parts, [_batch(3)], it=2, lr=1e-3, guard=guard)
    assert r.skipped and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    guard.check_skip_limit(2, 1)
    with pytest.raises(NonFiniteError, match=r"skip 2 of at most train\.max_nonfinite_skips=1; KEPT"):
        guard.check_skip_limit(3, 2)

    # deferred (the accelerator path, exercised on the CPU): flagged, not raised, until checked
    import quietgpt.training.step as S

    monkeypatch.setattr(S, "check_every_step", lambda device, tc: False)
    guard = NonFiniteGuard(stop, CPU)
    parts = build_step_parts(_model(), stop, CPU)
    train_step(parts, [_batch(1)], it=0, lr=1e-3, guard=guard)
    guard.check_deferred()  # all finite so far
    _poisoned(parts.base_model)  # from iteration 1 on
    for it in (1, 2):
        assert not train_step(parts, [_batch(it)], it=it, lr=1e-3, guard=guard).skipped
    with pytest.raises(NonFiniteError, match="loss or gradient at iteration 1;"):
        guard.check_deferred()


def test_progress_plain_lines(capsys):
    p = Progress(10, 2, enabled=True, desc="study", unit="run", prefix="quietgpt study: ")
    assert not p.tty  # pytest captures stderr: no terminal, no bar
    assert math.isnan(p.eta())
    p.postfix("a running")  # bar only: nothing printed
    p.advance()
    p.line(f"[{p.n}/{p.total}] a ok; eta {p.eta():.0f}s")
    p.note("hello")
    p.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("quietgpt study: [3/10] a ok; eta ") and err[1] == "quietgpt study: hello"
    off = Progress(5, enabled=False)
    off.advance(), off.line("x"), off.note("y"), off.close()
    assert capsys.readouterr().err == "" and off.n == 1


def test_stale_temporaries_are_removed_under_the_lock(tmp_path):
    (tmp_path / "best").mkdir()
    for f in (".model.safetensors.abc.tmp", "best/.config.json.x.tmp", "keep.tmp", "model.safetensors"):
        (tmp_path / f).write_text("x")
    remove_stale_temporaries(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        ["keep.tmp", "model.safetensors"]
    (tmp_path / ".w.1.tmp").write_text("x")
    with RunLock(tmp_path):
        assert not (tmp_path / ".w.1.tmp").exists()
