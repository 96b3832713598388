"""Kill training runs and a study at random moments, resume them, and check that nothing was lost.

    python benchmarks/faults.py --trials 20 --json faults.json [--seed 0] [--keep DIR]

Every trial starts `python -m quietgpt train` (a tiny model on a small synthetic corpus, a checkpoint every
few iterations) or `python -m quietgpt study` (2 variants x 2 seeds of the same tiny model) in a
subprocess and SIGKILLs it, once or twice, either at a random moment or in the middle of a checkpoint
write (QUIETGPT_TEST_SLOW_WRITE makes quietgpt.utils.atomic sleep between writing a temporary file and renaming
it; the trial waits for a temporary file to appear, then kills). After each kill every file a reader
would load is checked (train_state.pt with torch.load(weights_only=True), *.safetensors with safetensors,
*.json with json). Then the run is resumed (`train --resume`, or the same study command again) until it
finishes, and compared with an uninterrupted run of the same seed:

* train: final model.safetensors and best/model.safetensors tensors equal (torch.equal, bit for bit on
  CPU) and metrics.jsonl's losses equal at every iteration (eval rows' train_loss/val_loss, log rows' loss);
* study: results.json holds every (variant, seed) exactly once, all "ok", and each row's numeric fields
  equal the uninterrupted study's (wall times, tokens/s and paths excepted).

A trial is clean when no checked file was corrupt, every resume exited 0, and the result matched.
Writes {trials, clean, corrupt_checkpoints, failed_resumes, mismatched, leftover_tmp_files, wall_s,
details: [...]} to --json; exit code 0 only when every trial was clean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from quietgpt.utils.atomic import atomic_write_text

# The tiny run: ~1.5 s of training per 60 iterations on a loaded 2-core machine, a checkpoint every 10.
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.batch_size=4",
        "train.eval_iters=2", "train.log_interval=5", "train.warmup_iters=5", "train.threads=1",
        "data.synthetic_tokens=20000"]
STUDY_QUANT = "w8a8"
IGNORED_ROW_KEYS = {"wall_s", "train_wall_s", "tokens_per_s", "dir", "error", "started_at"}


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


class Bench:
    def __init__(self, root: Path, iters: int, eval_interval: int):
        self.root, self.iters, self.eval_interval = root, iters, eval_interval
        self.cache = root / "cache"
        self.overrides = TINY + [f"data.cache_dir={self.cache}", f"train.max_iters={iters}",
                                 f"train.lr_decay_iters={iters}", f"train.eval_interval={eval_interval}"]
        # one thread everywhere: a CPU run is bit-exact only against a run with the same thread count
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop(SLOW, None)

    # ---- commands
    def train_cmd(self, out: Path, seed: int, resume: bool) -> list[str]:
        cmd = [sys.executable, "-m", "quietgpt", "train", "--out", str(out)]
        if resume:
            return cmd + ["--resume"]  # the run's own config from its checkpoint
        return cmd + ["--seed", str(seed), *_sets(self.overrides)]

    def ensemble_cmd(self, out: Path, seed: int, resume: bool) -> list[str]:
        """Three seeds as one ensemble (training/ensemble.py), each member in out/s<seed>."""
        cmd = [sys.executable, "-m", "quietgpt", "train", "--out", str(out), "--seeds", f"{seed}-{seed + 2}",
               *_sets(self.overrides)]
        return cmd + (["--resume"] if resume else [])

    def study_cmd(self, out: Path) -> list[str]:
        study = [s for s in self.overrides if not s.startswith("train.max_iters")]
        study = [s for s in study if not s.startswith("train.lr_decay_iters")]
        n = max(self.iters // 2, 2 * self.eval_interval)  # four runs: keep each short
        study += [f"train.max_iters={n}", f"train.lr_decay_iters={n}"]
        return [sys.executable, "-m", "quietgpt", "study", "--out", str(out), "--variants", "softmax,softmax1",
                "--seeds", "2", "--quant", STUDY_QUANT, *_sets(study)]

    def run(self, cmd: list[str], slow: float = 0.0, timeout: float = 600) -> tuple[int, str, float]:
        env = dict(self.env)
        if slow > 0:
            env[SLOW] = str(slow)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stderr, time.perf_counter() - t0

    def run_and_kill(self, cmd: list[str], folder: Path, *, at: float | None, slow: float,
                     nth_write: int = 1) -> dict:
        """Start cmd, SIGKILL it after `at` seconds, or (at=None) when the nth temporary file of an atomic
        write appears under `folder`. Returns what happened."""
        env = dict(self.env)
        if slow > 0:
            env[SLOW] = str(slow)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        seen: set[str] = set()
        killed_in_write = False
        while p.poll() is None:
            el = time.perf_counter() - t0
            if at is not None and el >= at:
                break
            if at is None:
                tmps = {str(t) for t in folder.rglob("*.tmp")} if folder.exists() else set()
                seen |= tmps
                if tmps and len(seen) >= nth_write:
                    killed_in_write = True
                    break
            if el > 600:
                break
            time.sleep(0.01)
        finished = p.poll() is not None
        if not finished:
            p.send_signal(signal.SIGKILL)
        p.wait()
        return {"killed": not finished, "after_s": round(time.perf_counter() - t0, 3),
                "in_write": killed_in_write, "rc": p.returncode}


SLOW = "QUIETGPT_TEST_SLOW_WRITE"


# ----------------------------------------------------------------------------- checks


def check_files(folder: Path) -> list[str]:
    """Every file a reader would load under folder, loaded; returns the ones that fail."""
    bad = []
    if not folder.exists():
        return bad
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.endswith(".tmp"):
            continue
        try:
            if f.suffix == ".pt":
                torch.load(f, map_location="cpu", weights_only=True)
            elif f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".npz":
                import numpy as np

                with np.load(f) as z:
                    [z[k] for k in z.files]
        except Exception as e:
            bad.append(f"{f.relative_to(folder)}: {type(e).__name__}: {' '.join(str(e).split())[:100]}")
    return bad


def n_writes(ref: Path) -> int:
    """How many atomic writes an uninterrupted run makes: metrics.jsonl at the start, per checkpoint
    train_state.pt + model.safetensors + config.json (+ best/'s two files when val loss improved), and
    summary.json at the end."""
    evals = [json.loads(x) for x in (ref / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    n, best = 2, math.inf
    for r in evals:
        if r["iter"] > 0:
            n += 3 + 2 * (r["val_loss"] < best)
        best = min(best, r["val_loss"])
    return n


def tmp_files(folder: Path) -> list[str]:
    return sorted(str(t.relative_to(folder)) for t in folder.rglob("*.tmp")) if folder.exists() else []


def losses(run: Path) -> dict:
    """{(iter, key): value} for the loss entries of metrics.jsonl (train_loss/val_loss on eval rows, loss on
    log rows), and an error entry when a row is duplicated."""
    out: dict = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for k in ("train_loss", "val_loss", "loss"):
            if k in row:
                key = (row["iter"], k)
                if key in out:
                    out[("duplicate", str(key))] = True
                out[key] = row[k]
    return out


def compare_train(run: Path, ref: Path) -> list[str]:
    diffs = []
    for rel in ("model.safetensors", "best/model.safetensors"):
        try:
            a, b = load_file(str(run / rel)), load_file(str(ref / rel))
        except Exception as e:
            diffs.append(f"{rel}: {type(e).__name__}: {e}")
            continue
        if set(a) != set(b):
            diffs.append(f"{rel}: tensor names differ")
        else:
            n = [k for k in a if not torch.equal(a[k], b[k])]
            if n:
                diffs.append(f"{rel}: {len(n)} tensor(s) differ, e.g. {n[0]}")
    try:
        la, lb = losses(run), losses(ref)
        if la != lb:
            keys = sorted((set(la) ^ set(lb)) | {k for k in set(la) & set(lb) if la[k] != lb[k]}, key=str)
            diffs.append(f"metrics.jsonl losses differ at {len(keys)} entries, e.g. {keys[:3]}")
    except Exception as e:
        diffs.append(f"metrics.jsonl: {type(e).__name__}: {e}")
    return diffs


def _same_number(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare_study(study: Path, ref: Path) -> list[str]:
    try:
        a = json.loads((study / "results.json").read_text(encoding="utf-8"))
        b = json.loads((ref / "results.json").read_text(encoding="utf-8"))
    except Exception as e:
        return [f"results.json: {type(e).__name__}: {e}"]
    diffs = []
    keys_a = [(r["variant"], r["seed"]) for r in a["runs"]]
    keys_b = [(r["variant"], r["seed"]) for r in b["runs"]]
    if len(set(keys_a)) != len(keys_a):
        diffs.append(f"duplicated runs in results.json: {keys_a}")
    if sorted(set(keys_a)) != sorted(keys_b):
        diffs.append(f"runs differ: {sorted(set(keys_a))} vs {sorted(keys_b)}")
    rows_b = {(r["variant"], r["seed"]): r for r in b["runs"]}
    for r in a["runs"]:
        k = (r["variant"], r["seed"])
        if r.get("status") != "ok":
            diffs.append(f"{k}: status {r.get('status')} ({r.get('error')})")
            continue
        other = rows_b.get(k, {})
        for f in sorted((set(r) | set(other)) - IGNORED_ROW_KEYS):
            if not _same_number(r.get(f), other.get(f)):
                diffs.append(f"{k}.{f}: {r.get(f)!r} != {other.get(f)!r}")
    if a.get("config") != b.get("config"):
        diffs.append("results.json config differs")
    return diffs


# ----------------------------------------------------------------------------- trials


def train_trial(bench: Bench, i: int, rng: random.Random, ref: Path, ref_wall: float, seed: int) -> dict:
    run = bench.root / f"trial{i:02d}"
    d = {"trial": i, "kind": "train", "kills": [], "corrupt": [], "resumes": [], "ok": True}
    n_kills = rng.choice((1, 1, 2))
    for _k in range(n_kills):
        in_write = rng.random() < 0.5
        slow = rng.choice((0.05, 0.2, 0.5)) if in_write or rng.random() < 0.3 else 0.0
        resume = (run / "train_state.pt").exists()
        cmd = bench.train_cmd(run, seed, resume=resume)
        if in_write:  # any one of the atomic writes an uninterrupted run makes, the final save's included
            ev = bench.run_and_kill(cmd, run, at=None, slow=slow, nth_write=rng.randint(1, n_writes(ref)))
        else:
            ev = bench.run_and_kill(cmd, run, at=rng.uniform(0.3, ref_wall * 1.1), slow=slow)
        ev.update(resume=resume, slow=slow, mode="in_write" if in_write else "random")
        d["kills"].append(ev)
        bad = check_files(run)
        d["corrupt"] += bad
    # resume (or start, when the kill came before the first checkpoint) until done
    resume = (run / "train_state.pt").exists()
    rc, err, wall = bench.run(bench.train_cmd(run, seed, resume=resume))
    return _judge(d, {"resume": resume}, rc, err, wall, run, lambda: compare_train(run, ref))


def ensemble_trial(bench: Bench, i: int, rng: random.Random, ref: Path, ref_wall: float, seed: int) -> dict:
    """SIGKILL an ensemble of three seeds (at a random moment or in one of its atomic writes), resume it with
    its command until done; every member must equal the uninterrupted ensemble's member bit for bit."""
    out = bench.root / f"trial{i:02d}-ensemble"
    d = {"trial": i, "kind": "ensemble", "kills": [], "corrupt": [], "resumes": [], "ok": True}
    for _k in range(rng.choice((1, 2))):
        in_write = rng.random() < 0.5
        slow = rng.choice((0.05, 0.2)) if in_write else 0.0
        resume = any((m / "train_state.pt").exists() for m in out.glob("s*"))
        cmd = bench.ensemble_cmd(out, seed, resume=resume)
        if in_write:
            nth = rng.randint(1, 3 * n_writes(ref / f"s{seed}"))
            ev = bench.run_and_kill(cmd, out, at=None, slow=slow, nth_write=nth)
        else:
            ev = bench.run_and_kill(cmd, out, at=rng.uniform(0.3, ref_wall * 1.1), slow=slow)
        ev.update(resume=resume, slow=slow, mode="in_write" if in_write else "random")
        d["kills"].append(ev)
        d["corrupt"] += check_files(out)
    rc, err, wall = bench.run(bench.ensemble_cmd(out, seed, resume=True))
    return _judge(d, {"resume": True}, rc, err, wall, out,
                  lambda: [f"s{seed + k}: {x}" for k in range(3)
                           for x in compare_train(out / f"s{seed + k}", ref / f"s{seed + k}")])


def _judge(d: dict, info: dict, rc: int, err: str, wall: float, folder: Path, compare) -> dict:
    """Record the final (resuming) run of a trial and decide whether the trial is clean."""
    d["resumes"].append({**info, "rc": rc, "wall_s": round(wall, 2),
                         "stderr_tail": err.strip().splitlines()[-1:] if rc else []})
    if rc != 0:
        d["failed_resume"] = True
    else:
        d["corrupt"] += check_files(folder)
        d["diffs"] = compare()
    d["leftover_tmp"] = tmp_files(folder)
    d["ok"] = not d["corrupt"] and rc == 0 and not d.get("diffs")
    return d


def study_trial(bench: Bench, i: int, rng: random.Random, ref: Path, ref_wall: float) -> dict:
    out = bench.root / f"trial{i:02d}-study"
    d = {"trial": i, "kind": "study", "kills": [], "corrupt": [], "resumes": [], "ok": True}
    cmd = bench.study_cmd(out)
    for _k in range(rng.choice((1, 2))):
        in_write = rng.random() < 0.5
        slow = rng.choice((0.05, 0.2)) if in_write else 0.0
        if in_write:
            ev = bench.run_and_kill(cmd, out, at=None, slow=slow, nth_write=rng.randint(1, 40))
        else:
            ev = bench.run_and_kill(cmd, out, at=rng.uniform(1.0, ref_wall), slow=slow)
        ev.update(slow=slow, mode="in_write" if in_write else "random")
        d["kills"].append(ev)
        d["corrupt"] += check_files(out)
    rc, err, wall = bench.run(cmd)
    return _judge(d, {}, rc, err, wall, out, lambda: compare_study(out, ref))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--json", required=True, help="where to write the counts and per-trial details")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments and modes")
    ap.add_argument("--iters", type=int, default=60, help="training iterations of each train trial")
    ap.add_argument("--eval-interval", type=int, default=10, help="a checkpoint every this many iterations")
    ap.add_argument("--study-every", type=int, default=3, help="every n-th trial kills a study (0: none)")
    ap.add_argument("--ensemble-every", type=int, default=4, help="every n-th trial kills an ensemble of three "
                    "seeds (train --seeds; 0: none); a trial that is both is a study")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.trials < 1 or args.iters < 1 or args.eval_interval < 1:
        print("faults.py: --trials, --iters and --eval-interval must be positive", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        bench = Bench(root, args.iters, args.eval_interval)
        run_seed = 1000 + args.seed
        # the data once, so that every trial only reads the cache
        rc, err, _ = bench.run([sys.executable, "-m", "quietgpt", "prepare", *_sets(bench.overrides)])
        if rc:
            print(f"faults.py: prepare failed: {err.strip()[-500:]}", file=sys.stderr)
            return 1
        kinds = ["study" if args.study_every and i % args.study_every == args.study_every - 1 else
                 "ensemble" if args.ensemble_every and i % args.ensemble_every == args.ensemble_every - 1 else "train"
                 for i in range(args.trials)]
        refs = {}
        rc, err, ref_wall = bench.run(bench.train_cmd(root / "ref-train", run_seed, resume=False))
        if rc:
            print(f"faults.py: the uninterrupted run failed: {err.strip()[-500:]}", file=sys.stderr)
            return 1
        refs["train"] = (root / "ref-train", ref_wall)
        if "study" in kinds:
            rc, err, wall = bench.run(bench.study_cmd(root / "ref-study"))
            if rc:
                print(f"faults.py: the uninterrupted study failed: {err.strip()[-500:]}", file=sys.stderr)
                return 1
            refs["study"] = (root / "ref-study", wall)
        if "ensemble" in kinds:
            rc, err, wall = bench.run(bench.ensemble_cmd(root / "ref-ensemble", run_seed, resume=False))
            if rc:
                print(f"faults.py: the uninterrupted ensemble failed: {err.strip()[-500:]}", file=sys.stderr)
                return 1
            refs["ensemble"] = (root / "ref-ensemble", wall)
        details = []
        for i, kind in enumerate(kinds):
            if kind == "train":
                d = train_trial(bench, i, rng, *refs["train"], seed=run_seed)
            elif kind == "ensemble":
                d = ensemble_trial(bench, i, rng, *refs["ensemble"], seed=run_seed)
            else:
                d = study_trial(bench, i, rng, *refs["study"])
            details.append(d)
            print(f"trial {i} ({kind}): {'clean' if d['ok'] else 'NOT CLEAN'}; kills "
                  + ", ".join(f"{k['mode']}@{k['after_s']}s{'(in write)' if k['in_write'] else ''}"
                              for k in d["kills"]), file=sys.stderr, flush=True)
    summary = {
        "trials": args.trials,
        "clean": sum(d["ok"] for d in details),
        "corrupt_checkpoints": sum(len(d["corrupt"]) for d in details),
        "failed_resumes": sum(bool(d.get("failed_resume")) for d in details),
        "mismatched": sum(bool(d.get("diffs")) for d in details),
        "kills": sum(k["killed"] for d in details for k in d["kills"]),
        "kills_in_write": sum(k["in_write"] for d in details for k in d["kills"]),
        "leftover_tmp_files": sum(len(d["leftover_tmp"]) for d in details),
        "study_trials": kinds.count("study"),
        "ensemble_trials": kinds.count("ensemble"),
        "reference_wall_s": {k: round(v[1], 2) for k, v in refs.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "seed": args.seed,
        "details": details,
    }
    atomic_write_text(args.json, json.dumps(summary, indent=2, default=str) + "\n")
    print(f"{summary['clean']}/{summary['trials']} trials clean; corrupt {summary['corrupt_checkpoints']}, "
          f"failed resumes {summary['failed_resumes']}, mismatched {summary['mismatched']}, "
          f"{summary['kills']} kills ({summary['kills_in_write']} in a write), "
          f"{summary['leftover_tmp_files']} leftover temp files; {summary['wall_s']} s", file=sys.stderr)
    return 0 if summary["clean"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
