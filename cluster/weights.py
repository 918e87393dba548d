"""Weights for a rank whose machine lacks the checkpoint: its slices, read on a machine that has
the files and sent through Ray's object store, one tensor at a time.

A streaming task on the holder memory-maps the shards and yields (name, slice) pairs for that
rank alone; the rank copies each into its parameters as it arrives, so neither side ever holds
a whole shard, and no rank receives another's slices.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llama.checkpoints.info import CheckpointInfo
from llama.checkpoints.load import load_rank_state, missing_files
from llama.model.stages import Stage

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
def _has_checkpoint(info: CheckpointInfo) -> bool:
    return not missing_files(info)


@ray.remote(num_cpus=0)
def _read_slices(info: CheckpointInfo, rank: int, world_size: int,
                 stage: Stage | None) -> Iterator[tuple[str, torch.Tensor]]:
    for key, view in load_rank_state(info, rank, world_size, stage).items():
        yield key, view.contiguous()  # a copy of this slice only, out of the memory-mapped file


def find_holder(info: CheckpointInfo, timeout_s: float = 60.0) -> str:
    """The id of an alive node that has every checkpoint file; CheckpointError-like ValueError
    when none has."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    asks = {n["NodeID"]: _has_checkpoint.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(info) for n in nodes}
    for node_id, ref in asks.items():
        if ray.get(ref, timeout=timeout_s):
            return node_id
    raise ValueError(f"no machine of the cluster has the checkpoint at {info.ckpt_dir} (and {info.tokenizer_path}): "
                     f"copy it to that path on at least one machine; the others receive their slices from it.")


def slices_from(holder: str, info: CheckpointInfo, rank: int, world_size: int,
                stage: Stage | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensor-parallel rank `rank`'s (name, slice) pairs (of `stage`'s tensors only, in a
    pipeline), read on node `holder`, as they arrive."""
    stream = _read_slices.options(num_returns="streaming",
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(holder, soft=False)
                                  ).remote(info, rank, world_size, stage)
    for ref in stream:
        yield ray.get(ref)
