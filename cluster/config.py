"""GangConfig: everything a gang of rank actors needs, frozen, built once from deploy/config.yaml."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GangConfig:
    ckpt_dir: str
    tokenizer_path: str | None  # None -> ckpt_dir/tokenizer.model
    model_parallel_size: int
    max_seq_len: int = 512
    max_batch_size: int = 8  # the engine's slots: sequences decoding at once
    prefill_chunk: int = 64  # prompt tokens run per engine step at most, so decoding never stalls long
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    backend: str | None = None  # None -> nccl on CUDA, gloo on CPU
    seed: int = 1
    cpus_per_rank: float = 1.0
    placement_strategy: str = "PACK"  # Ray placement group strategy for a gang we create ourselves
    placement_timeout_s: float = 300.0  # waiting for the cluster to have room for the gang
    init_timeout_s: float = 600.0  # process-group rendezvous and checkpoint loading
    call_timeout_s: float = 600.0  # one engine step (a collective) longer than this is a hung gang
    request_timeout_s: float | None = None  # a request's deadline in the engine; None: no limit
