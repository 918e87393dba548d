"""Reading checkpoints, the front door: validate first (`inspect_checkpoint`, which recognises
the layout from a folder's files), then load one rank's slices into its model. Two layouts:
Meta's (llama/checkpoints/meta.py) and Hugging Face's (llama/checkpoints/hf.py), both read
under Meta's tensor names and cut as this project's ranks hold them.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from llama.checkpoints.errors import CheckpointError
from llama.checkpoints.hf import inspect_hf, load_hf_rank_state
from llama.checkpoints.info import CheckpointInfo
from llama.checkpoints.layout import full_shapes, rank_dim
from llama.checkpoints.load_progress import LoadProgress
from llama.checkpoints.meta import inspect_meta, load_meta_rank_state
from llama.model.stages import Stage

log = logging.getLogger(__name__)


def inspect_checkpoint(
    ckpt_dir: str | Path, tokenizer_path: str | Path | None = None, model_parallel_size: int = 1
) -> CheckpointInfo:
    """Validate a checkpoint directory before anything is allocated; raise CheckpointError.
    Done once per start (where configuration enters); the result is passed to every rank."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist (ckpt_dir).")
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file() and (ckpt_dir / "config.json").is_file():
        return inspect_hf(ckpt_dir, tokenizer_path, model_parallel_size)
    if not params_path.is_file():
        raise CheckpointError(
            f"{params_path} is missing: a checkpoint directory holds params.json and consolidated.NN.pth files "
            f"(Meta's layout; for Llama 3 from Hugging Face, its original/ folder) or config.json and "
            f"*.safetensors (Hugging Face's)."
        )
    return inspect_meta(ckpt_dir, tokenizer_path, model_parallel_size)


def load_rank_state(info: CheckpointInfo, rank: int, world_size: int,
                    stage: Stage | None = None) -> dict[str, torch.Tensor]:
    """The tensors tensor-parallel rank `rank` of `world_size` needs, cut from the N source
    shards; in a pipeline, only those of `stage`, under the stage's own names (its layers
    numbered from 0: llama/model/stages.py), and no other tensor is read.

    Returned tensors are views into the memory-mapped files where one source shard covers the
    slice (no copy), else a concatenation of just the overlapping pieces."""
    keys = None if stage is None else {k for k in full_shapes(info.args) if stage.local_name(k) is not None}
    if info.layout == "hf":
        files = {key: info.ckpt_dir / name for key, name in info.weight_map.items()}
        state = load_hf_rank_state(files, info.args, rank, world_size, info.tied, keys)
    else:
        state = load_meta_rank_state(info, rank, world_size, keys)
    return state if stage is None else {stage.local_name(k): v for k, v in state.items()}


def rank_nbytes(info: CheckpointInfo, rank: int, world_size: int, stage: Stage | None = None) -> int:
    """The bytes of rank's slices (of `stage`'s tensors, in a pipeline) in the files, known
    before any is read (for LoadProgress)."""
    total = 0
    for key, full in full_shapes(info.args).items():  # a cut tensor: an equal 1/world_size of it
        if stage is None or stage.local_name(key) is not None:
            total += math.prod(full) // (world_size if rank_dim(key) is not None else 1)
    return total * info.itemsize


def missing_files(info: CheckpointInfo) -> list[Path]:
    """The checkpoint's weight files that this machine does not have (at the inspected paths)."""
    return [p for p in info.shard_paths if not p.is_file()]


def copy_into(model: torch.nn.Module, slices: Iterable[tuple[str, torch.Tensor]],
              progress: LoadProgress | None = None) -> int:
    """Copy (name, tensor) slices into `model`'s parameters (any device/dtype), one at a time, so
    only one slice need be in memory; every parameter must come exactly once. Returns the bytes,
    also counted into `progress` as each slice lands."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    nbytes = 0
    with torch.no_grad():
        for key, src in slices:
            p = params.get(key)
            if p is None or key in seen:
                raise CheckpointError(f"the checkpoint gave {key!r}, which the model {'has already' if p is not None else 'does not have'}.")
            if tuple(src.shape) != tuple(p.shape):
                raise CheckpointError(f"{key}: slice shape {list(src.shape)} does not fit parameter {list(p.shape)}.")
            p.copy_(src)
            seen.add(key)
            nbytes += src.numel() * src.element_size()
            if progress is not None:
                progress.add(src.numel() * src.element_size())
    if seen != set(params):
        raise CheckpointError(f"the checkpoint lacks parameters the model has, e.g. {sorted(set(params) - seen)[:3]}.")
    return nbytes


def load_into(model: torch.nn.Module, info: CheckpointInfo, rank: int, world_size: int,
              progress: LoadProgress | None = None) -> None:
    """Copy tensor-parallel rank `rank`'s slices, read from this machine's files, into `model`'s
    parameters (a pipeline stage's model: its stage's only)."""
    t0 = time.perf_counter()
    stage = getattr(model, "stage", None)
    stage = stage if stage is not None and stage.count > 1 else None
    nbytes = copy_into(model, load_rank_state(info, rank, world_size, stage).items(), progress)
    log.info("rank %d/%d: loaded %.1f MB from %d shard(s) in %.2fs", rank, world_size, nbytes / 1e6,
             len(info.shard_paths), time.perf_counter() - t0)
