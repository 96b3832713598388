"""`quietgpt train` / `sample` / `presets` through the CLI: the contract other tools rely on, and every bad
input of issue 4 as a one-line message + exit code 2, no traceback, nothing already on disk changed."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietgpt.cli import main
from quietgpt.nn.model import GPT

TINY = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=16",
        "--set", "model.block_size=16", "--set", "train.batch_size=4", "--set", "train.eval_interval=2",
        "--set", "train.eval_iters=2", "--set", "train.log_interval=1", "--set", "train.warmup_iters=1",
        "--set", "train.threads=1", "--set", "data.tokenizer=char"]



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with a text corpus, a data cache and one finished run (the files bad inputs must not touch)."""
    root = tmp_path_factory.mktemp("cli")
    text = "".join(f"line {i}: the cat sat on the mat and looked at {i % 7} birds.\n" for i in range(600))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    rc = main(["train", "--preset", "default", "--data", str(root / "corpus.txt"), "--attention", "softmax1",
               "--seed", "3", "--max-iters", "4", "--device", "cpu", "--out", str(root / "run"),
               "--set", f"data.cache_dir={root / 'cache'}", *TINY])
    assert rc == 0
    return root


def args_for(world: Path, out: str = "new", data: str | None = None, extra=()) -> list[str]:
    return ["train", "--preset", "default", "--data", data or str(world / "corpus.txt"), "--seed", "3",
            "--max-iters", "4", "--device", "cpu", "--out", str(world / out),
            "--set", f"data.cache_dir={world / 'cache'}", *TINY, *extra]


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


def test_train_contract_writes_the_run_folder(world):
    run = world / "run"
    for name in ("model.safetensors", "config.json", "train_state.pt", "metrics.jsonl", "summary.json",
                 "best/model.safetensors", "best/config.json"):
        assert (run / name).is_file(), name
    assert not (run / ".lock").exists()  # released at exit
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["attention"], summary["seed"], summary["iters"]) == ("softmax1", 3, 4)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["attention"] == "softmax1" and config["model"]["n_embd"] == 16


def test_resume_continues_with_the_checkpoints_own_config(world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    # no --preset: the run's own config (tiny model, its data) is used, only --max-iters changes
    assert main(["train", "--out", str(run), "--resume", "--max-iters", "6"]) == 0
    assert json.loads((run / "summary.json").read_text())["iters"] == 6
    assert "val loss" in capsys.readouterr().out


def test_sample_prints_text(world, capsys):
    assert main(["sample", "--checkpoint", str(world / "run"), "--prompt", "the cat", "--max-new-tokens", "20",
                 "--seed", "1", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    samples = out.split("---------------\n")
    assert samples[0].startswith("the cat") and len(samples[0].rstrip("\n")) == len("the cat") + 20
    # the same seed gives the same text
    assert main(["sample", "--checkpoint", str(world / "run"), "--prompt", "the cat", "--max-new-tokens", "20",
                 "--seed", "1", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == out


def _bad(world: Path, name: str, monkeypatch) -> list[str]:
    """The argv for bad input `name` (some set up files or patch the environment first)."""
    if name == "missing data file":
        return args_for(world, data=str(world / "nope.txt"))
    if name == "empty data file":
        (world / "empty.txt").write_text("")
        return args_for(world, data=str(world / "empty.txt"))
    if name == "binary data file":
        (world / "blob.txt").write_bytes(bytes(range(256)) * 40)
        return args_for(world, data=str(world / "blob.txt"))
    if name == "text shorter than block_size + 1":
        (world / "short.txt").write_text("a tiny text\n" * 2, encoding="utf-8")
        return args_for(world, data=str(world / "short.txt"))
    if name == "unknown preset":
        return ["train", "--preset", "no-such-preset", "--out", str(world / "new")]
    if name == "unknown variant":
        return args_for(world, extra=["--attention", "softmax2"])
    if name == "unknown device":
        return args_for(world, extra=["--device", "tpu"])
    if name == "unavailable device":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return args_for(world, extra=["--device", "cuda"])
    if name == "zero iterations":
        return args_for(world, extra=["--max-iters", "0"])
    if name == "negative batch size":
        return args_for(world, extra=["--set", "train.batch_size=-2"])
    if name == "unknown config key":
        return args_for(world, extra=["--set", "train.learnig_rate=1e-3"])
    if name == "wrong config type":
        return args_for(world, extra=["--set", "train.eval_iters=lots"])
    if name == "output folder not writable":
        (world / "a_file").write_text("x")
        return args_for(world, out="a_file/run")
    if name == "fresh run over an existing checkpoint":
        return args_for(world, out="run")
    if name == "resume from missing checkpoint":
        return args_for(world, out="nothing_here", extra=["--resume"])
    if name == "resume from truncated checkpoint":
        import shutil

        shutil.copytree(world / "run", world / "truncated", dirs_exist_ok=True)
        data = (world / "truncated" / "train_state.pt").read_bytes()
        (world / "truncated" / "train_state.pt").write_bytes(data[: len(data) // 2])
        return args_for(world, out="truncated", extra=["--resume", "--attention", "softmax1"])
    if name == "resume with another architecture":
        return args_for(world, out="run", extra=["--resume", "--attention", "softmax1", "--set", "model.n_embd=32"])
    if name == "resume with another data vocabulary":
        (world / "other.txt").write_text("xyz xzy zyx\n" * 300, encoding="utf-8")
        return args_for(world, out="run", data=str(world / "other.txt"), extra=["--resume", "--attention", "softmax1"])
    if name == "full disk while saving":
        real = os.replace

        def full(src, dst):
            if str(dst).endswith("train_state.pt"):
                raise OSError(28, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", full)
        return args_for(world, out="full")
    if name == "non-finite loss":
        real = GPT.forward

        def nan_forward(self, idx, targets=None, **kw):
            logits, loss = real(self, idx, targets, **kw)
            return logits, (loss * float("nan") if self.training and loss is not None else loss)

        monkeypatch.setattr(GPT, "forward", nan_forward)
        return args_for(world, out="nan")
    if name == "sample from a missing checkpoint":
        return ["sample", "--checkpoint", str(world / "nothing_here")]
    if name == "sample with a prompt outside the vocabulary":
        return ["sample", "--checkpoint", str(world / "run"), "--prompt", "\u2603"]
    if name == "sample with zero tokens":
        return ["sample", "--checkpoint", str(world / "run"), "--max-new-tokens", "0"]
    raise AssertionError(name)


BAD = ["missing data file", "empty data file", "binary data file", "text shorter than block_size + 1",
       "unknown preset", "unknown variant", "unknown device", "unavailable device", "zero iterations",
       "negative batch size", "unknown config key", "wrong config type", "output folder not writable",
       "fresh run over an existing checkpoint", "resume from missing checkpoint", "resume from truncated checkpoint",
       "resume with another architecture", "resume with another data vocabulary", "full disk while saving",
       "non-finite loss", "sample from a missing checkpoint", "sample with a prompt outside the vocabulary",
       "sample with zero tokens"]
NEEDLES = {"unknown preset": "no-such-preset", "unknown variant": "softmax2", "unknown device": "tpu",
           "unavailable device": "not available", "zero iterations": "train.max_iters",
           "negative batch size": "train.batch_size", "unknown config key": "train.learnig_rate",
           "wrong config type": "train.eval_iters", "output folder not writable": "not writable",
           "fresh run over an existing checkpoint": "--resume", "resume from missing checkpoint": "nothing to resume",
           "resume from truncated checkpoint": "truncated", "resume with another architecture": "model.n_embd",
           "resume with another data vocabulary": "vocab", "full disk while saving": "No space left",
           "non-finite loss": "non-finite loss at iteration 0", "text shorter than block_size + 1": "block_size"}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_one_line_exit_2_nothing_damaged(world, name, monkeypatch, capsys):
    argv = _bad(world, name, monkeypatch)
    before = digest(world)
    capsys.readouterr()
    rc = main(argv)
    monkeypatch.undo()
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, err)
    # the error is one line, and the last (runs that fail mid-training print progress lines before it)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"quietgpt {argv[0]}: error: ")
    err = errors[0]
    if name in NEEDLES:
        assert NEEDLES[name] in err, err
    after = digest(world)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, changed  # nothing that existed was modified or removed
    for folder in ("new", "nothing_here"):  # and a failed run leaves no half-made folder behind
        assert not (world / folder).exists() or any((world / folder).iterdir())


@pytest.mark.slow
def test_bad_input_through_a_real_process(world):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "quietgpt", *args_for(world, data=str(world / "missing.txt"))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quietgpt train: error:") and "missing.txt" in lines[0]
    proc = subprocess.run([sys.executable, "-m", "quietgpt", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--resume" in proc.stdout
