"""torchrun integration: one process per device; gloo on CPU, nccl on GPU.

Without torchrun's environment this is a no-op world of one, so the training loop has a single
code path for one process and many.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> World:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return World(rank, size, local_rank, device)


def barrier(world: World) -> None:
    """Wait for every rank. Runs end with one, so that no rank destroys the process group
    (and exits) while another still talks to it: gloo aborts the process when that happens."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        _store_barrier(world)


def _store_barrier(world: World, poll_s: float = 0.005, timeout_s: float = 300.0) -> None:
    """A second barrier through the rendezvous store rather than gloo's sockets.

    A gloo barrier returns on one rank as soon as that rank has heard from the others, which
    can be before the others have heard from it; if it then destroys the group and exits, the
    rank still inside the barrier can lose its socket and abort ("terminate called without an
    active exception" after a finished run: rare, but seen in the 2-process tests). After this
    wait every rank has left every gloo collective. The counter only grows, so calling this
    again in the same job (a second run) waits correctly.
    """
    store = dist.distributed_c10d._get_default_store()
    arrived = store.add("zenlm/leave", 1)
    target = -(-arrived // world.size) * world.size  # this round's last arrival
    deadline = time.monotonic() + timeout_s
    while store.add("zenlm/leave", 0) < target:
        if time.monotonic() > deadline:  # a rank died between the two barriers: do not hang
            raise RuntimeError(f"rank {world.rank}: the other ranks did not reach the end of the "
                               f"run within {timeout_s:.0f} s of this one")
        time.sleep(poll_s)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        gc.collect()  # free a DDP wrapper caught in a reference cycle while its group still lives
        dist.destroy_process_group()


def mean_across(world: World, value: float) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t) / world.size


def gather_objects(world: World, obj):
    """A list with every rank's ``obj`` (on every rank)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
