"""Data-parallel training: ``torchrun --nproc-per-node N -m monquant train ...``.

Each of the ``N`` processes (ranks) holds the whole model and solves the equilibria of its shard
of every global batch: the batches are drawn from the same seeded permutation on every rank, and
rank ``r`` takes samples ``r, r + N, r + 2N, ...`` of each. The model is wrapped in
``DistributedDataParallel``, so the gradients (those of the implicit backward included: Theorem 5's
adjoint solve runs on each rank for its own samples) are all-reduced once per step. Each rank's loss
is scaled so that the averaged gradient is the gradient of the *global* batch's mean loss: the run
follows the single-process run with the same global batch, up to the rounding of the reductions.
Backend: gloo on CPU, NCCL on CUDA. Only rank 0 writes checkpoints, logs and the final model
(atomically, as always); every rank reads the checkpoint on ``--resume``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "all_reduce_sum",
    "barrier",
    "init_from_env",
    "is_main",
    "launched",
    "shard",
    "world",
]


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or any launcher setting ``WORLD_SIZE``)
    with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL
    when the default device is CUDA); returns whether this is a multi-process run."""
    import torch.distributed as dist

    if not launched():
        return False
    if not dist.is_initialized():
        cuda = torch.get_default_device().type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def world() -> tuple[int, int]:
    """``(rank, size)`` of the process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and prints."""
    return world()[0] == 0


def shard(idx: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s samples of one global batch ``idx``."""
    return idx[rank::size] if size > 1 else idx


def all_reduce_sum(*values: float) -> tuple[float, ...]:
    """The sums over ranks of plain numbers (themselves without a process group)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if torch.get_default_device().type == "cuda":
        t = t.cuda()
    dist.all_reduce(t)
    return tuple(float(v) for v in t.cpu())


def barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def wrap(model: torch.nn.Module) -> Any:
    """``model`` in ``DistributedDataParallel`` when there is a process group, else itself."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)
