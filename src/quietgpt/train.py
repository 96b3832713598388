"""Training: karpathy/nanoGPT's train.py as a function, with exact resume, DDP and honest throughput.

Semantics follow nanoGPT: random contiguous windows of the token memmap, AdamW (fused where available)
with decay/no-decay groups, linear warmup then cosine decay to min_lr, gradient accumulation, gradient
clipping, an eval of train and val loss over eval_iters batches every eval_interval iterations, AMP on
CUDA (bf16, or fp16 with a GradScaler), TF32 float32 matmuls on CUDA, optional torch.compile.
Differences, each for a reason:

* Randomness lives in explicit generators. The training windows come from one CPU torch.Generator
  (its state *is* the data position, saved in checkpoints); eval batches come from generators re-seeded
  at every eval, so an eval never moves the training stream and every eval (and every variant at the
  same seed) scores the same batches. On CPU a run is a pure function of its config: resume is exact.
* DDP: every rank walks the same global stream of grad_accum micro-batches and keeps its own
  consecutive share, so N ranks compute exactly the update one process computes with the same global
  batch (nanoGPT gives each rank its own seed, which makes the two incomparable).
* Iteration i (0-based) is the i-th optimizer step; evals happen on the state after i steps when
  i % eval_interval == 0, and after the last step. max_iters = 2000 means 2000 steps.
* No per-step host sync on accelerators: losses stay on the device and are read at log intervals.
  On CPU every step checks for non-finite values (free there: CPU work is synchronous).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .atomic import atomic_write_json, atomic_write_text
from .config import RunConfig, TrainConfig, apply_overrides
from .data import Dataset, check_length, get_batch, prepare
from .errors import QuietError
from .model import GPT

__all__ = ["NonFiniteError", "RunLock", "derive_seed", "get_lr", "train"]


class NonFiniteError(QuietError):
    """Training produced a non-finite loss or gradient (train.nonfinite = "stop", or too many skips)."""


# ----------------------------------------------------------------------------- small pure pieces


def get_lr(it: int, tc: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters,
    min_lr after that. `it` is the 0-based step index."""
    if not tc.decay_lr:
        return tc.learning_rate
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
    if it > tc.lr_decay_iters or tc.lr_decay_iters <= tc.warmup_iters:
        return tc.min_lr
    decay_ratio = (it - tc.warmup_iters) / (tc.lr_decay_iters - tc.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # runs 1 -> 0
    return tc.min_lr + coeff * (tc.learning_rate - tc.min_lr)


def derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for `stream` (model init, data, eval, dropout per rank) from the run seed."""
    state = np.random.SeedSequence(entropy=seed % 2**63, spawn_key=(stream,)).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# stream ids for derive_seed
DATA_STREAM, EVAL_STREAM, DROPOUT_STREAM = 1, 100, 1000


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- the run folder


class RunLock:
    """An exclusive lock on a run folder: `<dir>/.lock` holds the owner's pid and host.

    POSIX: an flock on the file, which the kernel drops when the owner dies, so a killed run never leaves
    the folder locked (its stale file is simply taken over); a clean exit removes the file. Elsewhere:
    O_EXCL creation plus a liveness check of the recorded pid. Raises QuietError when another live run
    holds the folder or the folder is not writable.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd: int | None = None
        self._made_folder = False

    def _owner(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> RunLock:
        self._made_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QuietError(f"output folder {self.folder} is not writable ({e.strerror or e}); "
                             "choose another --out") from None
        for _ in range(10):
            fd = self._lock_once()
            if fd is not None:
                break
        else:
            raise QuietError(f"cannot lock {self.path}; remove it if no run uses {self.folder}")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise QuietError(f"output folder {self.folder} is not writable ({e.strerror or e}); "
                             "choose another --out") from None
        self._fd = fd
        self._remove_stale_temporaries()
        return self

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files that a killed writer left (quietgpt.atomic's `.<name>.*.tmp`): with the
        lock held, no live writer can own one."""
        for sub in (self.folder, self.folder / "best"):
            for tmp in sub.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _lock_once(self) -> int | None:
        """An fd holding the lock, or None when the file was replaced under us (try again)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QuietError(f"output folder {self.folder} is not writable ({e.strerror or e}); "
                             "choose another --out") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            os.close(fd)
            return self._acquire_pidfile()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuietError(f"output folder {self.folder} is in use by another quietgpt run "
                             f"(pid/host {self._owner()}); wait for it to finish or choose another --out") from None
        try:  # the previous owner may have unlinked the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def _acquire_pidfile(self) -> int:  # pragma: no cover - non-POSIX fallback
        for _ in range(2):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = int((self._owner().split() or ["0"])[0] or 0)
                try:
                    os.kill(pid, 0)
                    alive = pid > 0
                except ProcessLookupError:
                    alive = False
                except OSError:
                    alive = True
                if alive:
                    raise QuietError(f"output folder {self.folder} is in use by another quietgpt run "
                                     f"(pid {pid}); wait for it or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is dead
        raise QuietError(f"cannot lock {self.path}; remove it if no run uses {self.folder}")

    def release(self) -> None:
        """Remove the lock file (and the folder, if acquire() made it and nothing else was written)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # still holding the flock: a waiter re-checks the inode (see _lock_once)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            if self._made_folder:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # fails, as it should, unless the folder is empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as rows come. On resume from the
    checkpoint after N steps, rows written after it (by a run that then died) are dropped first: all rows
    with iter > N, and the step rows with iter == N (eval rows at N came before the checkpoint). So the
    file reads as if the run had never stopped."""

    def __init__(self, path: Path, *, resume_from: int | None, enabled: bool):
        self.path, self.enabled, self._f = path, enabled, None
        if not enabled:
            return
        kept = []
        if resume_from is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if not (isinstance(row, dict) and isinstance(row.get("iter"), int)):
                    continue
                if row["iter"] < resume_from or (row["iter"] == resume_from and "val_loss" in row):
                    kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self._f = open(path, "a", encoding="utf-8")  # closed by close(): lives as long as the run

    def write(self, row: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(row, sort_keys=True) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Progress:
    """A tqdm bar (iteration, loss, tokens/s, ETA) on a terminal, plain lines otherwise, nothing when off."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        self.total = total
        self.t0, self.i0 = time.perf_counter(), initial
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True,
                            file=sys.stderr)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, it: int, loss: float, tok_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
        elif self.enabled:
            done = it + 1 - self.i0
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - it - 1) / rate if rate > 0 else float("nan")
            print(f"iter {it}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tok/s, "
                  f"eta {eta:,.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Trackers:
    """Optional TensorBoard / Weights & Biases mirrors of metrics.jsonl (only when installed and asked for)."""

    def __init__(self, cfg: RunConfig, out_dir: Path, enabled: bool):
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QuietError("train.tensorboard needs the tensorboard package; pip install tensorboard, "
                                 "or set train.tensorboard=false") from None
            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if cfg.train.wandb:
            try:
                import wandb
            except ImportError:
                raise QuietError("train.wandb needs the wandb package; pip install wandb, or set "
                                 "train.wandb=false") from None
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=out_dir.name, config=cfg.to_dict())

    def log(self, row: dict) -> None:
        it = row["iter"]
        scalars = {k: v for k, v in row.items() if k != "iter" and isinstance(v, int | float)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, it)
        if self.wandb is not None:
            self.wandb.log(scalars, step=it)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    owns_group: bool = False  # we initialised the process group (and so destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def _dist_setup(tc: TrainConfig, device: torch.device) -> tuple[_Dist, torch.device]:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK -> an initialised process group (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = tc.backend if tc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return _Dist(rank, local, world, owns), device


def _all_max(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _all_mean(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / d.world
    return t


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, dataset: Dataset, tc: TrainConfig, block_size: int,
                  device: torch.device, amp: contextlib.AbstractContextManager) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split, {"train": .., "val": ..}. The batches come from
    generators seeded by (seed, split) alone: every eval of a run, and every run with this seed, scores
    the same windows, and the training stream is never touched."""
    was_training = model.training
    model.eval()
    out = {}
    for i, split in enumerate(("train", "val")):
        gen = _generator(derive_seed(tc.seed, EVAL_STREAM + i))
        tokens = getattr(dataset, split)
        total = torch.zeros((), device=device)
        for _ in range(tc.eval_iters):
            x, y = get_batch(tokens, tc.batch_size, block_size, gen, device)
            with amp:
                _, loss = model(x, y)
            total += loss.float()
        out[split] = total.item() / tc.eval_iters
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the loop


def _amp(tc: TrainConfig, device: torch.device) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """(compute dtype, autocast context). auto: bf16 on CUDA that supports it, else float32."""
    name = tc.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "float16" and device.type != "cuda":
        raise QuietError(f"train.dtype float16 needs a CUDA device (this run is on {device.type}); "
                         "use float32 or bfloat16")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float32:
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_every_step(device: torch.device, tc: TrainConfig) -> bool:
    """Check for non-finite values after every step (a host sync), or only at log intervals and before
    evals/saves? Every step on CPU (syncs cost nothing there) and when skipping (the decision must precede
    optimizer.step()); otherwise deferred, with the first bad iteration tracked on the device."""
    return device.type == "cpu" or tc.nonfinite == "skip"


def _model_vocab(dataset: Dataset) -> int:
    """The data's vocabulary size; GPT-2 BPE's 50257 is padded to a multiple of 64 (50304) for speed."""
    v = int(dataset.vocab_size)
    return -(-v // 64) * 64 if dataset.tokenizer.name == "gpt2" else v


def _has_checkpoint(out: Path) -> bool:
    return (out / ckpt.STATE).exists() or (out / ckpt.WEIGHTS).exists()


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg's model on cfg's data into cfg.train.out_dir and return the summary (== summary.json).

    resume=True continues from out_dir/train_state.pt exactly where it stopped (same config architecture
    and data required; max_iters and other train settings may change). Raises QuietError (one line) on
    bad input before anything in out_dir is touched, NonFiniteError when training diverges.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    device = ckpt.resolve_device(tc.device)
    d, device = _dist_setup(tc, device)
    if device.type == "cuda":
        # As nanoGPT: float32 matmuls and convolutions may use TF32 (a 10-bit mantissa product, fp32
        # accumulation); under bf16/fp16 autocast this touches only the few ops kept in fp32.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    lock = RunLock(tc.out_dir)
    finished = False
    try:
        if d.master:
            lock.acquire()
        summary = _train(cfg, device, d, resume=resume, progress=progress and d.master, t_start=t_start)
        finished = True
        return summary
    finally:
        lock.release()
        if d.owns_group:
            # DDP's reducer keeps work on the process group; collect it (it sits in reference cycles)
            # before the group goes, and leave together: rank 0 still evaluates and saves after the last
            # step, and tearing gloo down under a connected peer aborts the process ("terminate called
            # without an active exception").
            import gc

            import torch.distributed as dist

            gc.collect()
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _train(cfg: RunConfig, device: torch.device, d: _Dist, *, resume: bool, progress: bool,
           t_start: float) -> dict:
    tc = cfg.train
    out = Path(tc.out_dir)
    if tc.gradient_accumulation_steps % d.world:
        raise QuietError(f"train.gradient_accumulation_steps ({tc.gradient_accumulation_steps}) must be a "
                         f"multiple of the number of processes ({d.world}); the global batch is "
                         "batch_size x gradient_accumulation_steps")
    accum = tc.gradient_accumulation_steps // d.world  # micro-steps on this rank
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)

    # Check the resume point (or that we are not about to overwrite one) before any work.
    state = None
    best_sid: list[str | None] = [None]  # step_id of the save that wrote best/ (kept in train_state)
    if resume:
        state = ckpt.load_train_state(out)
    elif d.master and _has_checkpoint(out):
        raise QuietError(f"{out} already holds a checkpoint; pass --resume to continue it, or choose another "
                         "--out (or delete the folder) to start over")
    _amp_dtype, amp = _amp(tc, device)

    # Data: rank 0 prepares (tokenises into the cache) first, so ranks never race on the cache files.
    if d.enabled and not d.master:
        import torch.distributed as dist

        dist.barrier()
    dataset = prepare(cfg.data)
    if d.enabled and d.master:
        import torch.distributed as dist

        dist.barrier()
    cfg = apply_overrides(cfg, {"model.vocab_size": _model_vocab(dataset)})
    check_length(dataset, cfg.model.block_size)
    block = cfg.model.block_size
    extras = {"tokenizer": dataset.tokenizer.to_meta(), "dataset": dataset.meta}
    if state is not None:
        ckpt.check_compatible(state["config"], cfg, out)
        saved_tok = state.get("extras", {}).get("tokenizer")
        if saved_tok is not None and json.dumps(saved_tok, sort_keys=True) != json.dumps(
                extras["tokenizer"], sort_keys=True):
            raise QuietError(f"checkpoint in {out} was trained with another tokenizer/vocabulary than "
                             f"{cfg.data.source!r} gives; resume with the same data, or choose another --out")

    # Model: the same init on every rank (DDP also broadcasts rank 0's); then per-rank dropout streams.
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model)
    torch.manual_seed(derive_seed(tc.seed, DROPOUT_STREAM + d.rank))
    if state is not None:
        ckpt.load_state_into(model, state, out)
        best_sid[0] = state.get("best_step_id")
        if d.master:
            ckpt.republish(out, model, cfg, state, extras=extras)
    model.to(device)
    base_model = model
    optimizer = model.configure_optimizers(tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type) if _amp_dtype == torch.float16 else None
    data_gen = _generator(derive_seed(tc.seed, DATA_STREAM))  # the same global stream on every rank

    start_iter, best_val, skips, last_losses = 0, float("inf"), 0, {}
    tokens_done, train_time, prior_wall = 0, 0.0, 0.0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            data_gen.set_state(state["rng"]["data"])
            if d.master:
                torch.set_rng_state(state["rng"]["torch"])
                cuda_rng = state["rng"].get("cuda")
                if device.type == "cuda" and cuda_rng is not None and cuda_rng.numel() > 0:
                    torch.cuda.set_rng_state(cuda_rng, device)  # absent when the checkpoint came from a CPU run
            else:  # other ranks' dropout streams are not saved: re-derive them from the resume point
                torch.manual_seed(derive_seed(tc.seed, DROPOUT_STREAM + d.rank) + int(state["iter"]))
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise QuietError(f"{out}/{ckpt.STATE} does not fit this run ({' '.join(str(e).split())[:120]}); "
                             "resume with the same settings or choose another --out") from None
        start_iter, best_val = int(state["iter"]), float(state["best_val_loss"])
        last_losses = dict(state.get("last_losses") or {})
        if start_iter > tc.max_iters:
            raise QuietError(f"the checkpoint in {out} is at iteration {start_iter}, past train.max_iters "
                             f"({tc.max_iters}); pass --max-iters {start_iter} or more")
        skips, tokens_done = int(state.get("nonfinite_skips", 0)), int(state.get("tokens", 0))
        train_time, prior_wall = float(state.get("train_time_s", 0.0)), float(state.get("wall_s", 0.0))
        del state  # the weights copy in it is no longer needed

    if tc.compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = model.module if d.enabled else model

    trackers = _Trackers(cfg, out, enabled=d.master)  # first: a missing optional package fails before any write
    metrics = MetricsLog(out / "metrics.jsonl", resume_from=start_iter if resume else None, enabled=d.master)
    bar = Progress(tc.max_iters, start_iter, enabled=progress)
    tokens_per_iter = tc.batch_size * block * tc.gradient_accumulation_steps  # global, all ranks
    # Per-step host syncs are free on CPU; on accelerators read non-finite flags only at log intervals
    # (or every step when skipping, which must decide before optimizer.step()).
    check_every_step = _check_every_step(device, tc)
    params = [p for p in base_model.parameters() if p.requires_grad]
    last_good_iter = start_iter if resume else None
    n_params = base_model.num_params()
    if progress:
        bar.note(f"quietgpt train: {n_params / 1e6:.2f}M parameters, attention {cfg.model.attention}, "
                 f"{d.world} process(es) on {device}, {tokens_per_iter:,} tokens/iter, out {out}")

    def save(it: int, *, best: bool) -> None:
        nonlocal last_good_iter
        if not d.master:
            return
        st = {
            "iter": it, "best_val_loss": best_val, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0)},
            "nonfinite_skips": skips, "tokens": tokens_done, "train_time_s": train_time,
            "wall_s": prior_wall + time.perf_counter() - t_loop, "world_size": d.world, "seed": tc.seed,
            "last_losses": dict(losses),
        }
        # train_state.pt first, then the published weights/config, then best/. A crash after the state
        # landed leaves the others behind; resuming repairs them from the state (ckpt.republish), which
        # knows whether this save was also the best.
        sid = uuid.uuid4().hex
        if best:
            best_sid[0] = sid
        st.update(step_id=sid, best_step_id=best_sid[0])
        ckpt.save_checkpoint(out, base_model, cfg, st, extras=extras)
        if best:
            ckpt.save_checkpoint(out, base_model, cfg, {"iter": it, "step_id": sid}, best=True, extras=extras)
        last_good_iter = it

    def nonfinite(it: int, what: str, detail: str = "") -> NonFiniteError:
        kept = (f"the last good checkpoint (iteration {last_good_iter}) in {out} is kept"
                if last_good_iter is not None else "no checkpoint was written yet")
        return NonFiniteError(f"non-finite {what} at iteration {it}{detail}; {kept}; lower train.learning_rate, "
                              "or set train.nonfinite=skip")

    def evaluate(it: int) -> dict[str, float]:
        losses = estimate_loss(eval_model, dataset, tc, block, device, amp) if d.master else {}
        if d.master:
            row = {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
            metrics.write(row)
            trackers.log(row)
            bar.note(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        return losses

    t_loop = time.perf_counter()
    bad_flag = torch.zeros((), device=device)  # accumulated non-finite flag (deferred checking)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    losses: dict[str, float] = last_losses  # the latest eval (the checkpoint's, on resume)
    t_mark, iters_since = time.perf_counter(), 0
    lr = get_lr(start_iter, tc)

    def check_deferred() -> None:
        if not check_every_step and _all_max(bad_flag.clone(), d).item() > 0:
            raise nonfinite(int(first_bad.item()), "loss or gradient")

    try:
        for it in range(start_iter, tc.max_iters):
            # ---- eval and checkpoint on the state after `it` steps (skipped at the resume point: that
            # checkpoint already exists and nothing changed since).
            if it % tc.eval_interval == 0 and not (resume and it == start_iter and it > 0):
                check_deferred()
                _sync(device)
                train_time += time.perf_counter() - t_mark
                losses = evaluate(it)
                if it > 0 and d.master:
                    improved = losses["val"] < best_val
                    best_val = min(best_val, losses["val"])
                    if improved or tc.always_save_checkpoint:
                        save(it, best=improved)
                t_mark, iters_since = time.perf_counter(), 0

            # ---- one optimizer step over `accum` micro-batches (this rank's share of the global batch)
            lr = get_lr(it, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = []
            for k in range(tc.gradient_accumulation_steps):
                mine = d.rank * accum <= k < (d.rank + 1) * accum
                x, y = get_batch(dataset.train, tc.batch_size, block, data_gen, device if mine else "cpu")
                if mine:
                    batches.append((x, y))
            loss_sum.zero_()
            for k, (x, y) in enumerate(batches):
                sync_ctx = model.no_sync() if d.enabled and k < accum - 1 else contextlib.nullcontext()
                with sync_ctx:
                    with amp:
                        _, loss = model(x, y)
                    loss_sum += loss.detach().float()
                    loss = loss / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if tc.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # fp16: inf gradients are the GradScaler's business (it skips and rescales); judge the loss only
            bad = ~torch.isfinite(loss_sum) if scaler is not None else ~(torch.isfinite(loss_sum) &
                                                                         torch.isfinite(grad_norm))
            if check_every_step:
                if _all_max(bad.float(), d).item() > 0:
                    if tc.nonfinite == "stop":
                        if math.isfinite(loss_sum.item()):
                            raise nonfinite(it, "gradient", f" (grad norm {grad_norm.item():g})")
                        raise nonfinite(it, "loss", f" (loss {loss_sum.item() / accum:g})")
                    skips += 1
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.update()
                    metrics.write({"iter": it, "nonfinite_skip": skips})
                    if skips > tc.max_nonfinite_skips:
                        raise nonfinite(it, "loss or gradient", f", skip {skips} of at most "
                                        f"train.max_nonfinite_skips={tc.max_nonfinite_skips}")
                    bar.step()
                    continue
            else:
                first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, it), first_bad)
                bad_flag = torch.maximum(bad_flag, bad.float())
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_done += tokens_per_iter
            iters_since += 1
            bar.step()

            # ---- log (the only place the host waits for the device)
            if it % tc.log_interval == 0 or it == tc.max_iters - 1:
                mean_loss = _all_mean(loss_sum / accum, d).item()
                check_deferred()
                now = time.perf_counter()
                tok_s = tokens_per_iter * iters_since / max(now - t_mark, 1e-9)
                train_time += now - t_mark
                t_mark, iters_since = now, 0
                if d.master:
                    row = {"iter": it, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
                           "tokens_per_s": tok_s}
                    metrics.write(row)
                    trackers.log(row)
                    bar.log(it, mean_loss, tok_s, lr)
        # ---- final eval and checkpoint on the state after max_iters steps (nothing to do when a
        # resumed run was already there)
        check_deferred()
        _sync(device)
        train_time += time.perf_counter() - t_mark
        if not (resume and start_iter == tc.max_iters and losses):
            losses = evaluate(tc.max_iters)
            if d.master:
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                save(tc.max_iters, best=improved)
    finally:
        bar.close()
        metrics.close()
        trackers.close()

    wall = prior_wall + time.perf_counter() - t_loop
    summary = {
        "train_loss": losses.get("train"), "val_loss": losses.get("val"),
        "best_val_loss": best_val if math.isfinite(best_val) else None,
        "iters": tc.max_iters, "tokens": tokens_done,
        "tokens_per_s": tokens_done / train_time if train_time > 0 else None,  # training steps only
        "tokens_per_s_wall": tokens_done / wall if wall > 0 else None,  # evals and checkpoints included
        "wall_s": wall, "prepare_s": t_loop - t_start,
        "attention": cfg.model.attention, "seed": tc.seed, "n_params": n_params, "device": str(device),
        "world_size": d.world, "nonfinite_skips": skips, "data": cfg.data.source,
        "vocab_size": cfg.model.vocab_size, "out_dir": str(out),
    }
    if dataset.meta.get("irreducible_loss") is not None:
        summary["irreducible_loss"] = dataset.meta["irreducible_loss"]
    if d.master:
        atomic_write_json(out / "summary.json", summary)
        bar.note(f"done: val loss {summary['val_loss']:.4f}, {summary['tokens_per_s'] or 0:,.0f} tok/s, "
                 f"{wall:.1f}s; wrote {out}")
    return summary
