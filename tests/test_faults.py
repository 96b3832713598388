"""Nothing lost: kills and crashes mid-save, non-finite training, full disks, two runs on one folder.

The random SIGKILL trials live in benchmarks/faults.py (a short version runs here); the tests below pin the
deterministic cases: a crash in each save of a run (the final one included) then an exact resume, a
diverging run that stops and keeps its last good checkpoint, skipping with a limit, ENOSPC while saving,
and the run lock against a live and a dead owner (real processes).
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quietgpt import cli
from quietgpt.config import load_config
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT
from quietgpt.runs import checkpoint as ckpt
from quietgpt.training.loop import train
from quietgpt.training.step import NonFiniteError
from quietgpt.utils import atomic

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


TINY = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 32,
        "train.batch_size": 4, "train.eval_iters": 2, "train.log_interval": 2, "train.warmup_iters": 2,
        "train.threads": 1, "data.synthetic_tokens": 20000, "train.seed": 11}


def cfg(out: Path, cache: Path, **over):
    return load_config("default", {**TINY, "data.cache_dir": str(cache), "train.out_dir": str(out),
                                   "train.max_iters": 12, "train.lr_decay_iters": 12, "train.eval_interval": 4,
                                   **over})


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def losses(run: Path) -> list[tuple]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out += [(r["iter"], k, r[k]) for k in ("train_loss", "val_loss", "loss") if k in r]
    return out


def assert_same_run(a: Path, b: Path) -> None:
    for rel in ("model.safetensors", "best/model.safetensors"):
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{rel}:{k}"
    assert losses(a) == losses(b)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for k in ("train_loss", "val_loss", "best_val_loss", "iters", "tokens"):
        assert sa[k] == sb[k], k


class Crash(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way up handles it."""


def crash_on(monkeypatch, nth: int, name: str):
    """Make the nth os.replace onto `name` (a path relative to the run folder, e.g. "model.safetensors" or
    "best/model.safetensors"; the rename that publishes an atomic write) die."""
    seen = {"n": 0}
    real = os.replace
    parts = tuple(Path(name).parts)

    def replace(src, dst):
        if Path(dst).parts[-len(parts):] == parts and (len(parts) > 1 or Path(dst).parent.name != "best"):
            seen["n"] += 1
            if seen["n"] == nth:
                raise Crash
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(cfg(out, cache), progress=False)
    return out


# saves happen at iters 4, 8 and 12 (the final one); crash while publishing each file of the last two
@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_state.pt", "model.safetensors", "config.json", "best/model.safetensors",
                                  "best/config.json"])
@pytest.mark.parametrize("nth", [2, 3])
def test_crash_in_a_save_then_resume_is_bit_exact(tmp_path, cache, reference, monkeypatch, name, nth):
    out = tmp_path / "run"
    crash_on(monkeypatch, nth, name)
    with pytest.raises(Crash):
        train(cfg(out, cache), progress=False)
    monkeypatch.undo()
    assert not list(out.rglob("*.tmp")), "a crashed atomic write left its temporary file"
    ckpt.load_model(out)  # what a reader sees after the crash loads
    train(cfg(out, cache), resume=True, progress=False)
    assert_same_run(out, reference)


def test_nonfinite_stop_through_the_cli(tmp_path, cache, capsys):
    """A learning rate of 1e6 (no monkeypatching): the run stops with exit 2 naming the iteration, and the
    checkpoint it keeps is a good one (finite weights, loads)."""
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--max-iters", "40"]
    for k, v in {**TINY, "data.cache_dir": str(cache), "train.learning_rate": 1e6, "train.grad_clip": 0.0,
                 "train.warmup_iters": 0, "train.eval_interval": 1, "train.lr_decay_iters": 40}.items():
        args += ["--set", f"{k}={v}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()  # progress lines, then the error as the one last line
    assert "Traceback" not in err and err.count("error:") == 1
    err = err.splitlines()[-1]
    assert err.startswith("quietgpt train: error: ")
    assert "non-finite" in err and "at iteration " in err
    it = int(err.split("at iteration ")[1].split()[0].rstrip(";,"))
    assert it >= 1
    if (out / "train_state.pt").exists():
        state = ckpt.load_train_state(out)
        assert state["iter"] <= it
        model, _ = ckpt.load_model(out)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert f"iteration {state['iter']}" in err


def _poison(monkeypatch, bad_steps):
    """Make the training loss NaN at the given 0-based training forward calls (evals untouched)."""
    real = GPT.forward
    calls = {"n": -1}

    def forward(self, idx, targets=None, *a, **k):
        logits, loss = real(self, idx, targets, *a, **k)
        if self.training and loss is not None:
            calls["n"] += 1
            if calls["n"] in bad_steps:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_nonfinite_stop_names_iteration_keeps_checkpoint(tmp_path, cache, monkeypatch):
    out = tmp_path / "run"
    _poison(monkeypatch, {6})
    with pytest.raises(NonFiniteError, match=r"non-finite loss at iteration 6\b.*iteration 4"):
        train(cfg(out, cache), progress=False)
    assert ckpt.load_train_state(out)["iter"] == 4
    model, _ = ckpt.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_skip_counts_then_stops_past_the_limit(tmp_path, cache, monkeypatch):
    out = tmp_path / "a"
    _poison(monkeypatch, {1, 5})
    s = train(cfg(out, cache, **{"train.nonfinite": "skip", "train.max_nonfinite_skips": 2}), progress=False)
    assert s["nonfinite_skips"] == 2
    skips = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "nonfinite_skip" in x]
    assert [(r["iter"], r["nonfinite_skip"]) for r in skips] == [(1, 1), (5, 2)]
    monkeypatch.undo()
    _poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteError, match=r"iteration 5.*skip 3 of at most train.max_nonfinite_skips=2"):
        train(cfg(tmp_path / "b", cache, **{"train.nonfinite": "skip", "train.max_nonfinite_skips": 2}),
              progress=False)


@pytest.mark.parametrize("failing", ["write", "replace", "mkstemp"])
def test_full_disk_while_saving(tmp_path, cache, monkeypatch, capsys, failing):
    """ENOSPC (or EROFS) while a resumed run saves: a one-line error (exit 2), no temporary file left, every
    file of the previous checkpoint byte-identical, and the folder not left locked."""
    out = tmp_path / "run"
    train(cfg(out, cache, **{"train.max_iters": 4}), progress=False)
    before = {k: v for k, v in tree_hash(out).items() if k != "metrics.jsonl"}
    code = errno.EROFS if failing == "mkstemp" else errno.ENOSPC
    if failing == "write":
        real_save = torch.save

        def save(obj, f, *a, **k):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(torch, "save", save)
        del real_save
    elif failing == "replace":
        real = os.replace

        def replace(src, dst):
            if Path(dst).name in ("train_state.pt", "model.safetensors"):
                raise OSError(code, os.strerror(code))
            return real(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
    else:
        real_mk = atomic.tempfile.mkstemp

        def mkstemp(*a, prefix="", **k):
            if "train_state" in prefix:
                raise OSError(code, os.strerror(code))
            return real_mk(*a, prefix=prefix, **k)

        monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    assert cli.main(["train", "--out", str(out), "--resume", "--max-iters", "8"]) == 2
    err = capsys.readouterr().err.strip()  # the progress line, then the error as the one last line
    assert "Traceback" not in err and err.count("error:") == 1
    err = err.splitlines()[-1]
    assert err.startswith("quietgpt train: error: cannot write ")
    assert os.strerror(code) in err and "train_state.pt" in err
    monkeypatch.undo()
    assert not list(out.rglob("*.tmp"))
    after = {k: v for k, v in tree_hash(out).items() if k != "metrics.jsonl"}
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    assert ckpt.load_train_state(out)["iter"] == 4
    train(cfg(out, cache, **{"train.max_iters": 8}), resume=True, progress=False)  # not locked, resumable


HOLD = """
import sys, time
from quietgpt.runs.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_second_run_refused_then_dead_owner_taken_over(tmp_path, cache, capsys):
    """A live process holds the folder: `train` and `study` refuse in one line (exit 2), naming the pid.
    Once the owner is SIGKILLed (its .lock file stays behind), a new run takes the folder over."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        args = ["train", "--out", str(out), "--max-iters", "4", "--set", f"data.cache_dir={cache}"]
        args += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by another quietgpt run" in err and str(p.pid) in err
        assert not (out / "train_state.pt").exists()
    finally:
        p.kill()
        p.wait()
    assert (out / ".lock").exists()  # the killed owner could not clean up
    assert cli.main(args) == 0
    assert ckpt.load_train_state(out)["iter"] == 4


@pytest.mark.slow
def test_faults_benchmark_short(tmp_path):
    """benchmarks/faults.py: 4 trials (two SIGKILLed training runs, one SIGKILLed study, one SIGKILLed ensemble
    of three seeds) all clean."""
    out = tmp_path / "faults.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--trials", "4", "--json", str(out),
                        "--iters", "30", "--eval-interval", "5", "--seed", "1"],
                       capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["trials"] == 4 and res["study_trials"] == 1 and res["ensemble_trials"] == 1
    assert res["kills"] >= 4
    assert (res["corrupt_checkpoints"], res["failed_resumes"], res["mismatched"]) == (0, 0, 0), r.stderr[-2000:]
    assert res["clean"] == 4 and r.returncode == 0
    assert time.perf_counter() - t0 < 300


def test_load_model_refuses_a_checkpoint_from_a_crashed_first_save(tmp_path, cache, monkeypatch):
    """Crash publishing the very first model.safetensors: the folder holds train_state.pt only; readers get a
    one-line QuietError, and --resume works from train_state.pt."""
    out = tmp_path / "run"
    crash_on(monkeypatch, 1, "model.safetensors")
    with pytest.raises(Crash):
        train(cfg(out, cache), progress=False)
    monkeypatch.undo()
    with pytest.raises(QuietError, match=r"not a checkpoint|no model\.safetensors"):
        ckpt.load_model(out)
    s = train(cfg(out, cache), resume=True, progress=False)
    assert s["iters"] == 12


def test_resume_works_when_the_data_was_prepared_in_the_same_process(tmp_path):
    """The synthetic corpus prepared fresh in this process (not read back from meta.json): its meta goes into
    train_state.pt as the checkpoint's extras, and the resume point must still load with weights_only=True
    (the first run of a study prepares in-process, so this is every study's first resume)."""
    out = tmp_path / "run"
    train(cfg(out, tmp_path / "fresh-cache"), progress=False)
    state = ckpt.load_train_state(out)
    assert state["iter"] == 12
