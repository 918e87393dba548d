"""The model's collectives across its model-parallel ranks: fairscale's mappings over the process
group (NCCL, gloo), or, once `use_shared_memory` has been called where every rank is on one CPU
machine, shared memory (llama/model/shared_memory_group.py).

Shared memory serves inference only: under autograd (a gradient to the input) fairscale's
mappings run, as they carry the backward.
"""
from __future__ import annotations

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region

from llama.model.shared_memory_group import SharedMemoryGroup, shared_memory_supported

_shared_memory: SharedMemoryGroup | None = None


def use_shared_memory(slot_bytes: int, timeout_s: float) -> bool:
    """From now on the model's collectives run through shared memory, with fairscale's
    model-parallel group as the fallback for tensors past slot_bytes. Collective: every rank of
    the group calls it, and only where all of them are on this machine's CPU. False (on every
    rank) where this machine cannot (not x86-64) or no shared file could be made."""
    global _shared_memory
    if not shared_memory_supported():
        return False
    _shared_memory = SharedMemoryGroup.create(fs_init.get_model_parallel_group(), slot_bytes, timeout_s)
    return _shared_memory is not None


def shared_memory_group() -> SharedMemoryGroup | None:
    return _shared_memory


def _shared(x: torch.Tensor) -> SharedMemoryGroup | None:
    group = _shared_memory
    if group is None or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return group


def reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the model-parallel ranks (in place where it can be)."""
    group = _shared(x)
    return reduce_from_model_parallel_region(x) if group is None else group.all_reduce_(x)


def gather_last(x: torch.Tensor) -> torch.Tensor:
    """Every model-parallel rank's x, concatenated along the last dimension in rank order."""
    group = _shared(x)
    return gather_from_model_parallel_region(x) if group is None else group.all_gather_last(x)


def broadcast_(x: torch.Tensor) -> torch.Tensor:
    """The model-parallel group's first rank's x into every rank's x, in place."""
    group = _shared(x)
    if group is None:
        dist.broadcast(x, src=fs_init.get_model_parallel_src_rank(), group=fs_init.get_model_parallel_group())
        return x
    return group.broadcast_(x, src=0)
