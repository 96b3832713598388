"""Ctrl-C on a study: the first stops scheduling and the running runs, says how to resume, exits 130 in
seconds, with no tracebacks (also while the workers are still starting) and no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A 4-run study with 2 jobs whose runs would train for many minutes, in its own process group."""
    out, err = tmp_path / "s", tmp_path / "stderr.txt"
    sets = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
            "train.batch_size": 4, "train.max_iters": 100000, "train.lr_decay_iters": 100000,
            "train.warmup_iters": 1, "train.eval_interval": 50, "train.eval_iters": 2, "train.log_interval": 1,
            "data.synthetic_tokens": 20000, "data.cache_dir": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "quietgpt", "study", "--out", str(out), "--variants", "softmax,softmax1",
           "--seeds", "2", "--jobs", "2", "--quant", "", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive
    # shell inherits it ignored (POSIX), and an ignored SIGINT stays ignored in the study it starts
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, out, err


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _interrupt_and_check(proc: subprocess.Popen, out: Path, err: Path) -> None:
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    text = err.read_text()
    assert rc == 130, text
    assert elapsed < 10, f"took {elapsed:.1f}s to stop"
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    last = [ln for ln in text.splitlines() if "interrupted" in ln]
    assert len(last) == 1 and "rerun the same command to resume" in last[0], text

    def group_gone() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return False
        except ProcessLookupError:
            return True

    _wait(group_gone, 10, "the workers to end")
    # queued runs were never started (seed-major order: seed 0's runs ran first)
    assert not (out / "runs" / "softmax-s1").exists() and not (out / "runs" / "softmax1-s1").exists()
    for p in out.rglob("*.json"):  # whatever was written is whole
        json.loads(p.read_text())


def test_ctrl_c_while_runs_train(tmp_path):
    proc, out, err = _start(tmp_path)
    try:
        def training() -> bool:
            logs = [out / "runs" / n / "metrics.jsonl" for n in ("softmax-s0", "softmax1-s0")]
            return all(p.is_file() and p.stat().st_size > 0 for p in logs)

        _wait(training, 180, "both runs to train")
        _interrupt_and_check(proc, out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_while_workers_start(tmp_path):
    proc, out, err = _start(tmp_path)
    try:
        _wait(lambda: len(_children(proc.pid)) >= 2, 120, "the workers to be spawned")
        _interrupt_and_check(proc, out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
