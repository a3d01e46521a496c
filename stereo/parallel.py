"""Several processes sharing one job's work: who does which share, averaging, agreeing on a value.

`accelerator` is an `accelerate.Accelerator` or `PartialState` (both say `process_index`,
`num_processes`, `is_main_process` and can `wait_for_everyone`), or None for one process.

A process must not raise, or decide on its own, in front of a collective the others enter: they would wait
there for `dist_timeout_minutes`. So what only the main process does (`on_main`) and what each process does
to its share (`gather_or_raise`) raise their error on every process, and a decision each process could make
differently (is that cache file there? NFS attribute caching, several nodes) is the main process's
(`on_main(..., share=True)`).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def make_accelerator(cpu: bool, timeout_minutes: int, handlers: list | None = None, **kwargs):
    """An `accelerate.Accelerator` whose collectives wait `timeout_minutes` (training and evaluation alike).

    Main-process-only phases (writing SD 1.4 checkpoints or exports, an LLM call, FID statistics) can outlast
    NCCL's 10-minute default while the other processes wait in a collective. `handlers` and `kwargs` go to
    the Accelerator as they are (mixed precision, DDP settings, trackers).
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))
    return Accelerator(cpu=cpu, kwargs_handlers=[*(handlers or []), timeout], **kwargs)


def release(accelerator) -> None:
    """End a run's accelerator: its trackers, its process group (a gloo group left to the interpreter's exit
    can abort a finished process: "terminate called without an active exception") and accelerate's
    process-wide state, so the next run in this process (a --multirun sweep, a notebook, a test) starts
    afresh and may choose its own mixed precision."""
    from accelerate.state import AcceleratorState

    accelerator.end_training()
    AcceleratorState._reset_state()


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


def _portable(error: Exception) -> Exception:
    """`error` if it survives pickling (to send it to the other processes), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_main(fn: Callable[[], Any], accelerator, *, share: bool = False):
    """`fn()` on the main process only; if it raises, every process raises that error (so none is left in the
    next collective). Returns its result on the main process, and on the others None, or with `share=True`
    the main process's result (for a decision every process must take alike). One process: just `fn()`."""
    if rank_and_world(accelerator)[1] == 1:
        return fn()
    result = error = None
    if is_main(accelerator):
        try:
            result = fn()
        except Exception as caught:
            error = caught
    shared = main_process_value((None if error is None else _portable(error), result if share else None))
    if error is not None:
        raise error
    if shared[0] is not None:
        raise shared[0]  # the main process's error, raised here too
    return shared[1] if share else result


def gather_or_raise(fn: Callable[[], Any], accelerator) -> list:
    """[fn() of process 0, of process 1, ...] on every process, like `all_gather(fn(), ...)`; but if `fn` raised
    on any process, every process raises (its own error, else the lowest rank's) instead of the others
    waiting for it in the gather."""
    if rank_and_world(accelerator)[1] == 1:
        return [fn()]
    item = error = None
    try:
        item = fn()
    except Exception as caught:
        error = caught
    gathered = all_gather((None if error is None else _portable(error), item), accelerator)
    if error is not None:
        raise error
    for rank, (other, _) in enumerate(gathered):
        if other is not None:
            raise other from RuntimeError(f"raised on process {rank}")
    return [item for _, item in gathered]
