"""Where a study's runs execute: here one after another, a local process pool, or a SLURM job array.

Runs are independent, so they fan out: jobs=1 runs them here (each run's training bar under the study's
bar); jobs=N a local process pool (each worker gets cores // N torch threads, or its own GPU when there
are several); launcher "slurm" submits a job array through submitit ("submitit-local": submitit's local
executor, the SLURM code path without a cluster). Every launcher reports each finished run's row to
`on_done`; a worker that dies becomes a failed row, never a lost one. StudyProgress shows runs done of
total with an ETA on the one progress printer (utils/progress.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Sequence

from quietgpt.errors import QuietError
from quietgpt.study.run import execute_ensemble, execute_run, failed_row, run_name
from quietgpt.study.spec import StudySpec
from quietgpt.utils.progress import Progress

OnDone = Callable[[dict], None]
_WORKER_THREADS = 0


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the study: nothing more is scheduled and the running runs were stopped; the message
    says how many runs had finished and how to resume (the CLI prints it as its one line, exit 130)."""


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the study process dies (killed, preempted), so no
    orphan keeps training into a run folder that the restarted study is about to redo."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the study died while this worker was still starting up
        os._exit(1)


def _init_worker(threads: int, gpu_queue, parent: int) -> None:
    """Pool worker start: its share of CPU threads, and its own GPU when there are several."""
    global _WORKER_THREADS
    _WORKER_THREADS = threads
    _die_with_parent(parent)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())


def _pool_run(spec, variant, seed, study_dir):
    """One task in a worker: a run (seed an int), or an arm's seeds as one ensemble (seed a list): its rows."""
    if isinstance(seed, list):
        return execute_ensemble(spec, variant, seed, study_dir, threads=_WORKER_THREADS, progress=False)
    return [execute_run(spec, variant, seed, study_dir, threads=_WORKER_THREADS, progress=False)]


def tasks(spec: StudySpec, todo: Sequence[tuple[str, int]]) -> list[tuple[str, int | list[int]]]:
    """What the launcher schedules: each (arm, seed) on its own, or with study.ensemble each arm's seeds as one
    task (arm, [seeds]) in the order the arms first appear."""
    if not spec.ensemble:
        return list(todo)
    groups: dict[str, list[int]] = {}
    for v, s in todo:
        groups.setdefault(v, []).append(s)
    return list(groups.items())


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def auto_jobs(device: str) -> int:
    """Runs at a time when --jobs is not given: one per CPU core on CPU (small models use cores far better
    side by side than through intra-op threads), one per GPU on CUDA, 1 on MPS."""
    from quietgpt.utils.device import resolve_device

    kind = resolve_device(device).type
    if kind == "cuda":
        return max(1, gpu_count())
    if kind == "cpu":
        return max(1, os.cpu_count() or 1)
    return 1


def run_here(spec: StudySpec, todo: Sequence[tuple[str, int]], study_dir: str, on_start: Callable[[str], None],
             on_done: OnDone, progress: bool) -> None:
    """One run (or, with study.ensemble, one arm's ensemble) after another in this process."""
    for v, s in tasks(spec, todo):
        if isinstance(s, list):
            on_start(f"{v} x {len(s)} seeds (one ensemble)")
            for row in execute_ensemble(spec, v, s, study_dir, progress=progress):
                on_done(row)
        else:
            on_start(run_name(v, s))
            on_done(execute_run(spec, v, s, study_dir, progress=progress))


def run_pool(spec: StudySpec, todo: Sequence[tuple[str, int]], study_dir: str, jobs: int, on_done: OnDone) -> None:
    """`jobs` runs at a time in spawned worker processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    threads = max(1, (os.cpu_count() or 1) // jobs)
    gpu_queue = None
    n_gpu = gpu_count() if spec.device != "cpu" else 0
    if n_gpu > 1:
        gpu_queue = ctx.Manager().Queue()
        for i in range(jobs):
            gpu_queue.put(i % n_gpu)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(threads, gpu_queue, os.getpid()))
    try:
        with _sigint_blocked():  # workers spawned now inherit it: Ctrl-C reaches only this process
            futs = {pool.submit(_pool_run, spec, v, s, study_dir): (v, s) for v, s in tasks(spec, todo)}
        for fut in as_completed(futs):
            v, s = futs[fut]
            try:
                rows = fut.result()
            except Exception as e:  # the worker died (killed, out of memory) before writing its rows
                rows = [failed_row(v, x, f"runs/{run_name(v, x)}", f"worker died: {type(e).__name__}: {e}")
                        for x in (s if isinstance(s, list) else [s])]
            for row in rows:
                on_done(row)
    except KeyboardInterrupt:
        # Stop at once: nothing queued starts, running runs are killed. Their folders hold only atomically
        # written files (and stale temporaries the next run's lock removes), so a rerun resumes them.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, AttributeError):
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _sigint_blocked():
    """Spawn workers with Ctrl-C held back. Children inherit the blocked SIGINT mask across fork and exec
    and keep it (Python never unblocks it), so a Ctrl-C during their start-up prints no tracebacks from
    them. In this process a Ctrl-C that arrives meanwhile (the kernel may hand it to any thread, e.g. a
    torch worker, and Python then runs its handler in the main thread) is only recorded, so it never cuts a
    child's launch in half (a child left without its start-up data dies with an EOFError traceback); it is
    raised as KeyboardInterrupt as soon as the block ends, so none is lost."""
    import signal

    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one runs the recorder now
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


def run_submitit(spec: StudySpec, todo: Sequence[tuple[str, int]], study_dir: str, jobs: int, on_done: OnDone,
                 local: bool) -> None:
    """A submitit job array (SLURM, or submitit's local executor when `local`), at most `jobs` at once."""
    from pathlib import Path

    try:
        import submitit
    except ImportError:
        raise QuietError("--launcher slurm needs submitit: pip install 'quietgpt[slurm]'") from None
    folder = Path(study_dir) / "slurm" / "%j"
    if local:  # submitit's local executor: the SLURM code path without a cluster (tests)
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=24 * 60)
    else:
        if shutil.which("sbatch") is None:
            raise QuietError("--launcher slurm needs a SLURM cluster (no sbatch on PATH); use --launcher local")
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        gpu = spec.device != "cpu"
        ex.update_parameters(name="quietgpt-study", timeout_min=24 * 60, slurm_array_parallelism=jobs,
                             gpus_per_node=1 if gpu else 0, cpus_per_task=8 if gpu else 4)
    n = len(todo)
    submitted: list = []
    try:
        with _sigint_blocked():  # local executor's processes, as in run_pool
            submitted = ex.map_array(execute_run, [spec] * n, [v for v, _ in todo], [s for _, s in todo],
                                     [study_dir] * n)
        for job, (v, s) in zip(submitted, todo, strict=True):
            try:
                row = job.result()
            except Exception as e:
                row = failed_row(v, s, f"runs/{run_name(v, s)}", f"job {job.job_id} died: {type(e).__name__}: {e}")
            on_done(row)
    except KeyboardInterrupt:
        for job in submitted:  # scancel on SLURM; a kill for the local executor
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        raise


class StudyProgress(Progress):
    """A Progress over runs ("study", unit "run") that knows what a run's start and row look like."""

    def __init__(self, total: int, initial: int, enabled: bool):
        super().__init__(total, initial, enabled=enabled, desc="study", unit="run", prefix="quietgpt study: ",
                         position=0)
        if initial:
            self.line(f"{initial} of {total} runs already finished; skipping them")

    def start(self, name: str) -> None:
        self.postfix(f"{name} running")

    def done(self, row: dict) -> None:
        ok = row["status"] == "ok"
        name = run_name(row["variant"], row["seed"])
        self.postfix(f"{name} {'ok' if ok else 'FAILED'}")
        self.advance()
        status = "ok" if ok else f"FAILED ({row.get('error')})"
        self.line(f"[{self.n}/{self.total}] {name} {status} in {row.get('wall_s') or 0:.0f}s; eta {self.eta():.0f}s")
