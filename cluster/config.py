"""GangConfig: everything a gang of rank actors needs, frozen, built once from deploy/config.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GangConfig:
    ckpt_dir: str
    tokenizer_path: str | None  # None -> ckpt_dir/tokenizer.model
    model_parallel_size: int
    max_seq_len: int = 512
    max_batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    backend: str | None = None  # None -> nccl on CUDA, gloo on CPU
    seed: int = 1
    cpus_per_rank: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy for a gang we create ourselves
    placement_timeout_s: float = 300.0  # waiting for the cluster to have room for the gang
    init_timeout_s: float = 600.0  # process-group rendezvous and checkpoint loading
    call_timeout_s: float = 600.0  # one generate call on the gang
