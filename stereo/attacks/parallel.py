"""Several processes sharing one job's work: who does which share, averaging, agreeing on a value.

`accelerator` is an `accelerate.Accelerator` or `PartialState` (both say `process_index`,
`num_processes`, `is_main_process` and can `wait_for_everyone`), or None for one process.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def rank_and_world(accelerator) -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def wait_for_everyone(accelerator) -> None:
    if rank_and_world(accelerator)[1] > 1:
        accelerator.wait_for_everyone()


def mean_over_processes(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """`tensor` averaged in place over every process (an all-reduce); unchanged with one process."""
    world = rank_and_world(accelerator)[1]
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world
    return tensor


def process_seed(seed: int, accelerator) -> int:
    """The seed of this process's random stream: `seed` on process 0 (so one process runs as before) and
    a hash of (seed, rank) elsewhere. Not `seed + rank * 2**32`: torch's CPU generator keeps only the
    low 32 bits of a seed, so that would give every process the same stream."""
    rank = rank_and_world(accelerator)[0]
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}".encode()).digest()[:4], "little")


def all_gather(item, accelerator) -> list:
    """[item of process 0, item of process 1, ...] on every process (any picklable object)."""
    world = rank_and_world(accelerator)[1]
    if world == 1:
        return [item]
    gathered = [None] * world
    dist.all_gather_object(gathered, item)
    return gathered


def main_process_value(value):
    """The main process's `value` on every process (any picklable object). For what each process computes on
    its own but must agree on: `${now:...}` in an output folder resolves once per process, and processes that
    start a second apart would otherwise write to different folders."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]
