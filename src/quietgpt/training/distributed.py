"""DDP plumbing: torchrun's environment -> a process group, the few collectives training uses, and leaving
together. With one process every function here is a no-op, so the loop reads the same either way."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quietgpt.config import TrainConfig

__all__ = ["Dist", "all_max", "all_mean", "rank0_first", "setup_distributed", "teardown_distributed"]


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    owns_group: bool = False  # we initialised the process group (and so destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        """Rank 0: the one process that evaluates, writes files and prints."""
        return self.rank == 0


def setup_distributed(tc: TrainConfig, device: torch.device) -> tuple[Dist, torch.device]:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK -> an initialised process group (gloo on CPU, NCCL on CUDA,
    or train.backend) and this rank's device (cuda:LOCAL_RANK on CUDA). Without torchrun: (Dist(), device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = tc.backend if tc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return Dist(rank, local, world, owns), device


def teardown_distributed(d: Dist, *, finished: bool) -> None:
    """Destroy the process group if setup_distributed made it; after a finished run, all ranks leave together."""
    if not d.owns_group:
        return
    # DDP's reducer keeps work on the process group; collect it (it sits in reference cycles) before the
    # group goes, and leave together: rank 0 still evaluates and saves after the last step, and tearing
    # gloo down under a connected peer aborts the process ("terminate called without an active exception").
    import gc

    import torch.distributed as dist

    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def rank0_first(d: Dist) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. tokenising into a shared cache, so that
    ranks never race on its files). If the body raises on rank 0, the others wait until torchrun, seeing
    rank 0 fail, stops them."""
    if d.enabled and not d.master:
        import torch.distributed as dist

        dist.barrier()
    yield
    if d.enabled and d.master:
        import torch.distributed as dist

        dist.barrier()


def all_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The elementwise max of `t` over ranks, in place (`t` itself with one process)."""
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of `t` over ranks (`t` itself with one process; `t` is summed into in place)."""
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / d.world
    return t
