"""The training loop: run folder contents, determinism, bit-exact resume (also after a crash mid-save),
golden losses, non-finite handling, the run lock, and the checks made before anything is written."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quietgpt.config import load_config
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT
from quietgpt.runs import checkpoint as ckpt
from quietgpt.runs.lock import RunLock
from quietgpt.training.batches import model_vocab
from quietgpt.training.loop import train
from quietgpt.training.schedule import derive_seed
from quietgpt.training.state import TrainState
from quietgpt.training.step import NonFiniteError

WORDS = ("the quick brown fox jumps over a lazy dog while seven bold wizards quietly hum "
         "and jovial knights examine crazy puzzles near the old mill").split()


def make_text(n_words: int, seed: int, words=WORDS) -> str:
    import random

    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(words))
        if len(line) == 9:
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    return "\n".join(lines) + "\n"



@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "words.txt"
    p.write_text(make_text(6000, seed=0), encoding="utf-8")
    return p


def tiny(tmp_path: Path, corpus: Path, out: str = "run", **over):
    base = {"data.source": str(corpus), "data.cache_dir": str(tmp_path.parent / "cache"), "data.tokenizer": "char",
            "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16, "model.dropout": 0.0,
            "train.batch_size": 4, "train.max_iters": 6, "train.eval_interval": 3, "train.eval_iters": 2,
            "train.log_interval": 1, "train.warmup_iters": 2, "train.lr_decay_iters": 10, "train.learning_rate": 3e-3,
            "train.seed": 7, "train.out_dir": str(tmp_path / out), "train.always_save_checkpoint": True,
            "train.threads": 1}  # tiny matmuls: one thread beats two that contend
    return load_config("default", {**base, **over})


def rows(run: Path, volatile=("tokens_per_s", "outlier_s")) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        out.append({k: v for k, v in json.loads(line).items() if k not in volatile})
    return out


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_run_folder_summary_and_metrics(tmp_path, corpus, capsys):
    cfg = tiny(tmp_path, corpus)
    summary = train(cfg, progress=True)
    run = Path(cfg.train.out_dir)
    for name in ("model.safetensors", "config.json", "train_state.pt", "metrics.jsonl", "summary.json",
                 "best/model.safetensors", "best/config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    text = corpus.read_text()
    assert summary["vocab_size"] == len(set(text))  # the model's vocabulary is the data's
    for key in ("train_loss", "val_loss", "best_val_loss", "iters", "tokens_per_s", "wall_s", "attention", "seed",
                "n_params", "device"):
        assert summary[key] is not None, key
    assert summary["iters"] == 6 and summary["tokens"] == 6 * 4 * 16
    assert summary["best_val_loss"] <= summary["val_loss"] + 1e-12
    r = rows(run, volatile=())
    evals = [x for x in r if "val_loss" in x]
    steps = [x for x in r if "loss" in x]
    assert [x["iter"] for x in evals] == [0, 3, 6]
    assert [x["iter"] for x in steps] == list(range(6))
    assert all(x["tokens_per_s"] > 0 and x["grad_norm"] > 0 and x["lr"] > 0 for x in steps)
    assert steps[0]["lr"] == pytest.approx(3e-3 / 3)  # warmup: lr (it + 1) / (warmup + 1)
    assert evals[-1]["val_loss"] == pytest.approx(summary["val_loss"])
    assert evals[0]["val_loss"] > evals[-1]["val_loss"]  # it learns something
    # the checkpoint is the final state and loads back
    _, cfg2 = ckpt.load_model(run)
    assert cfg2.model.vocab_size == summary["vocab_size"]
    assert json.loads((run / "config.json").read_text())["tokenizer"]
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["iter"] == 6
    # TrainState is all that is saved besides the weights, optimizer/scaler state dicts, config and meta
    assert set(state) == set(TrainState().to_dict()) | {"optimizer", "scaler", "model", "config", "extras",
                                                        "format_version"}
    err = capsys.readouterr().err  # stderr is not a TTY here: plain progress lines, no bar
    assert "iter 5/6: loss" in err and "\r" not in err


def test_determinism_on_cpu(tmp_path, corpus):
    a, b, c = (tiny(tmp_path, corpus, out=o, **({"train.seed": 8} if o == "c" else {})) for o in "abc")
    for cfg in (a, b, c):
        train(cfg, progress=False)
    ra, rb, rc = (Path(x.train.out_dir) for x in (a, b, c))
    assert rows(ra) == rows(rb)
    assert_same_weights(ra, rb)
    assert rows(ra) != rows(rc)


def test_golden_losses(tmp_path, corpus):
    """Regression pin (torchtitan style): the first losses of a tiny config. A change here means training
    numerics changed (init, data order, optimizer, schedule): update GOLDEN only on purpose."""
    cfg = tiny(tmp_path, corpus, **{"train.max_iters": 5, "train.eval_interval": 100})
    train(cfg, progress=False)
    losses = [x["loss"] for x in rows(Path(cfg.train.out_dir)) if "loss" in x]
    # independent sanity: at N(0, 0.02) init the logits are ~0, so the first loss is ~ln(vocab size)
    assert losses[0] == pytest.approx(math.log(len(set(corpus.read_text()))), abs=0.05)
    assert losses == pytest.approx(GOLDEN, abs=5e-5)  # float noise across CPUs is ~1e-6


# recorded with torch 2.13.0 (CPU), 1 thread, on the tiny() config above
GOLDEN = [3.846714973449707, 3.8429372310638428, 3.830996036529541, 3.798025369644165, 3.7872567176818848]


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, corpus):
    # outlier points on the eval grid too (a run resumed past its old end keeps a point there, like an eval)
    over = {"model.dropout": 0.1, "model.attention": "softmax1", "train.eval_interval": 4, "train.outlier_interval": 2}
    straight = tiny(tmp_path, corpus, out="straight", **over, **{"train.max_iters": 8})
    first = tiny(tmp_path, corpus, out="split", **over, **{"train.max_iters": 4})
    rest = tiny(tmp_path, corpus, out="split", **over, **{"train.max_iters": 8})
    s1 = train(straight, progress=False)
    train(first, progress=False)
    s2 = train(rest, resume=True, progress=False)
    a, b = Path(straight.train.out_dir), Path(rest.train.out_dir)
    assert rows(a) == rows(b)
    assert_same_weights(a, b)
    assert_same_weights(a / "best", b / "best")
    assert s1["val_loss"] == s2["val_loss"] and s1["tokens"] == s2["tokens"]
    # resuming a finished run is a no-op that reports the same summary
    s3 = train(rest, resume=True, progress=False)
    assert s3["val_loss"] == s2["val_loss"] and rows(b) == rows(a)


@pytest.mark.slow
def test_crash_mid_checkpoint_then_resume_is_exact(tmp_path, corpus, monkeypatch):
    """A kill between the checkpoint files (simulated: the weights' rename at iteration 6 dies) leaves a
    consistent resume point; resuming reproduces the uninterrupted run bit for bit."""
    straight = tiny(tmp_path, corpus, out="straight", **{"train.max_iters": 9})
    crashed = tiny(tmp_path, corpus, out="crashed", **{"train.max_iters": 9})
    train(straight, progress=False)
    real_replace = os.replace
    saves = {"n": 0}

    def dying_replace(src, dst):
        if Path(dst).name == "model.safetensors" and Path(dst).parent.name == "crashed":
            saves["n"] += 1
            if saves["n"] == 2:  # the checkpoint at iteration 6: train_state.pt is already written
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, progress=False)
    monkeypatch.undo()
    run = Path(crashed.train.out_dir)
    assert torch.load(run / "train_state.pt", weights_only=True)["iter"] == 6
    assert json.loads((run / "config.json").read_text())["iter"] == 3  # one checkpoint behind, consistent
    train(crashed, resume=True, progress=False)
    assert rows(Path(straight.train.out_dir)) == rows(run)
    assert_same_weights(Path(straight.train.out_dir), run)


def nan_after(monkeypatch, first: int, last: int | None = None) -> None:
    """Make training forwards number first..last (1-based, inclusive; None = forever) return a NaN loss."""
    real = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = real(self, idx, targets, **kw)
        if self.training and loss is not None:
            calls["n"] += 1
            if calls["n"] >= first and (last is None or calls["n"] <= last):
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    cfg = tiny(tmp_path, corpus, **{"train.max_iters": 8})
    nan_after(monkeypatch, first=6)  # the 6th training forward is iteration 5
    with pytest.raises(NonFiniteError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert isinstance(e.value, QuietError) and "\n" not in msg
    assert "iteration 5" in msg and "iteration 3" in msg
    run = Path(cfg.train.out_dir)
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["iter"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "summary.json").exists()


def test_nonfinite_deferred_check_names_the_first_bad_iteration(tmp_path, corpus, monkeypatch):
    """The accelerator path (no per-step host sync), exercised on CPU: the NaN at iteration 4 is noticed
    at the next check point (the eval before iteration 6's checkpoint), named correctly, and never saved."""
    import quietgpt.training.step as S

    monkeypatch.setattr(S, "check_every_step", lambda device, tc: False)
    cfg = tiny(tmp_path, corpus, **{"train.max_iters": 9, "train.log_interval": 100})
    nan_after(monkeypatch, first=5)
    with pytest.raises(NonFiniteError, match="iteration 4") as e:
        train(cfg, progress=False)
    assert "iteration 3" in str(e.value)  # the last good checkpoint
    state = torch.load(Path(cfg.train.out_dir) / "train_state.pt", weights_only=True)
    assert state["iter"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_skip_counts_and_limits(tmp_path, corpus, monkeypatch):
    cfg = tiny(tmp_path, corpus, **{"train.nonfinite": "skip"})
    nan_after(monkeypatch, first=3, last=3)
    summary = train(cfg, progress=False)
    assert summary["nonfinite_skips"] == 1
    assert {"iter": 2, "nonfinite_skip": 1} in rows(Path(cfg.train.out_dir))
    monkeypatch.undo()
    cfg = tiny(tmp_path, corpus, out="run2", **{"train.nonfinite": "skip", "train.max_nonfinite_skips": 2})
    nan_after(monkeypatch, first=2)
    with pytest.raises(NonFiniteError, match=r"train\.max_nonfinite_skips=2"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_lock_refuses_a_second_run_and_a_dead_owner_is_taken_over(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus)
    run = Path(cfg.train.out_dir)
    with RunLock(run), pytest.raises(QuietError, match="in use by another quietgpt run"):
        train(cfg, progress=False)
    assert not (run / "model.safetensors").exists()
    # a run in another process holds the lock, then dies by SIGKILL: its lock does not stay stuck
    code = (f"import sys, time; from quietgpt.runs.lock import RunLock; RunLock({str(run)!r}).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(QuietError, match=rf"pid/host {holder.pid} "):
            train(cfg, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (run / ".lock").read_text()  # the stale file is still there ...
    train(cfg, progress=False)  # ... and taken over
    assert (run / "summary.json").is_file()


def test_checks_before_anything_is_written(tmp_path, corpus):
    # an existing checkpoint is never overwritten by a fresh run
    cfg = tiny(tmp_path, corpus)
    train(cfg, progress=False)
    run = Path(cfg.train.out_dir)
    before = digest(run)
    with pytest.raises(QuietError, match="already holds a checkpoint"):
        train(cfg, progress=False)
    # resume with another architecture, or data with another vocabulary: refused
    with pytest.raises(QuietError, match=r"model\.n_embd=16") as e:
        train(tiny(tmp_path, corpus, **{"model.n_embd": 32}), resume=True, progress=False)
    assert "\n" not in str(e.value)
    other = tmp_path / "other.txt"
    other.write_text(make_text(3000, seed=1, words=["zebra", "yak", "xylophone", "quiz"]), encoding="utf-8")
    with pytest.raises(QuietError, match="vocab"):
        train(tiny(tmp_path, other), resume=True, progress=False)
    # a resume point past max_iters
    with pytest.raises(QuietError, match=r"past train\.max_iters"):
        train(tiny(tmp_path, corpus, **{"train.max_iters": 2}), resume=True, progress=False)
    assert digest(run) == before
    # nothing to resume
    with pytest.raises(QuietError, match="nothing to resume"):
        train(tiny(tmp_path, corpus, out="fresh"), resume=True, progress=False)
    # data shorter than block_size + 1
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be, " * 3, encoding="utf-8")
    with pytest.raises(QuietError) as e:
        train(tiny(tmp_path, short, out="short", **{"model.block_size": 64}), progress=False)
    assert "block_size" in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(QuietError, match="not available"):
            train(tiny(tmp_path, corpus, out="gpu", **{"train.device": "cuda"}), progress=False)
    assert not (tmp_path / "gpu" / "model.safetensors").exists()


def test_trackers_are_optional(tmp_path, corpus):
    """TensorBoard / W&B: used when installed and asked for; asked for but missing is a clear error."""
    import importlib.util

    for flag, module in (("train.tensorboard", "tensorboard"), ("train.wandb", "wandb")):
        cfg = tiny(tmp_path, corpus, out=module, **{flag: True})
        if importlib.util.find_spec(module) is None:
            with pytest.raises(QuietError, match=f"pip install {module}"):
                train(cfg, progress=False)
            assert not Path(cfg.train.out_dir).exists()  # nothing written, not even the folder
        elif module == "tensorboard":
            train(cfg, progress=False)
            assert any((Path(cfg.train.out_dir) / "tensorboard").iterdir())


def test_vocab_padding_only_for_gpt2_and_seed_streams():
    ds = lambda name, v: types.SimpleNamespace(vocab_size=v, tokenizer=types.SimpleNamespace(name=name))
    assert model_vocab(ds("gpt2", 50257)) == 50304
    assert model_vocab(ds("char", 65)) == 65 and model_vocab(ds("byte", 256)) == 256
    seeds = {derive_seed(1337, s) for s in (1, 100, 101, 1000, 1001)} | {derive_seed(1338, 1)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(5, 1) == derive_seed(5, 1)
