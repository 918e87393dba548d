"""How many KV blocks a rank's pool holds: EngineConfig.kv_cache_memory_gb, or its default.

Set: that many GiB per rank. Null on CUDA: 90% of the memory free once the weights are loaded,
less 2 GiB kept for activations and the decode's CUDA graphs (which are captured after the
pool is made). Null on the CPU: 4 GiB (vLLM's CPU default), or less when max_batch_size
sequences of max_seq_len need less, as a test's tiny model does. The ranks of a gang each
compute it and take the smallest (cluster/rank.py), so they all hold the same pool. In a
pipeline a rank holds only its stage's layers, so a pool is sized by the layers of the largest
stage (`layers`), the same on every rank.
"""
from __future__ import annotations

import torch

from llama.engine.config import EngineConfig
from llama.model.args import ModelArgs

GIB = 2**30
CPU_DEFAULT_GB = 4.0
CUDA_FREE_FRACTION = 0.9
CUDA_MARGIN_GB = 2.0


def token_nbytes(args: ModelArgs, model_parallel_size: int, element_size: int, layers: int | None = None) -> int:
    """Bytes of keys and values one position takes on one rank, over every layer it holds
    (`layers`; None: all of the model's)."""
    return 2 * (layers or args.n_layers) * (args.n_kv_heads // model_parallel_size) * args.head_dim * element_size


def pool_blocks(config: EngineConfig, args: ModelArgs, model_parallel_size: int, element_size: int,
                device_type: str, free_bytes: int | None = None, layers: int | None = None) -> int | None:
    """Blocks in each rank's pool, of `layers` layers (a pipeline's largest stage; None: the
    whole model); None on CUDA with the default when free_bytes is not known (before the
    weights are loaded)."""
    per_block = config.block_size * token_nbytes(args, model_parallel_size, element_size, layers)
    if config.kv_cache_memory_gb is not None:
        nbytes = config.kv_cache_memory_gb * GIB
    elif device_type == "cuda":
        if free_bytes is None:
            return None
        nbytes = CUDA_FREE_FRACTION * free_bytes - CUDA_MARGIN_GB * GIB
    else:
        longest = config.max_seq_len or args.context_length
        nbytes = min(CPU_DEFAULT_GB * GIB, config.max_batch_size * -(-longest // config.block_size) * per_block)
    return max(int(nbytes // per_block), 0)


def free_device_bytes(device: torch.device) -> int | None:
    """What the device has free now (CUDA), else None: the driver's free memory and what torch's
    caching allocator holds without using it."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
