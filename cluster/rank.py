"""RankActor: one model-parallel rank in its own process (a Ray actor).

Each actor joins the gang's process group (nccl on CUDA, gloo on CPU), initialises fairscale's
model parallelism, loads its own slices of the checkpoint and then runs every generate call in
lockstep with the other ranks. Control calls (ping, info) run in their own concurrency group
so they answer while a generate call computes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from cluster.config import GangConfig
from llama.checkpoint import inspect_checkpoint, load_into
from llama.distributed import choose_backend, free_port, init_model_parallel, resolve_device, resolve_dtype
from llama.generate import generate_batch
from llama.model import Transformer
from llama.request import GenerationOutput, GenerationRequest
from llama.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    node_id: str
    node_ip: str
    pid: int
    device: str
    gpu_ids: tuple[str, ...]


@dataclass(frozen=True)
class RankState:
    """What a rank reports once set up."""

    backend: str
    device: str
    dtype: str
    load_s: float


class RankActor:
    def __init__(self, config: GangConfig, rank: int):
        self.config = config
        self.rank = rank
        self.world_size = config.model_parallel_size
        self.model: Transformer | None = None
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")

    # ------------------------------------------------------------------ control
    @ray.method(concurrency_group="control")
    def info(self) -> RankInfo:
        ctx = ray.get_runtime_context()
        device = str(self.model.device) if self.model is not None else "unloaded"
        return RankInfo(self.rank, ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid(), device,
                        tuple(str(g) for g in ray.get_gpu_ids()))

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group="control")
    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's node IP and a free port on it, where every rank meets."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    # ------------------------------------------------------------------ compute
    def setup(self, master_addr: str, master_port: int) -> RankState:
        t0 = time.perf_counter()
        cfg = self.config
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU
            torch.cuda.set_device(device)
        backend = choose_backend(device, cfg.backend)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            world_size=self.world_size,
            rank=self.rank,
            timeout=timedelta(seconds=cfg.init_timeout_s),
        )
        init_model_parallel(self.world_size)
        info = inspect_checkpoint(cfg.ckpt_dir, cfg.tokenizer_path, cfg.max_seq_len, cfg.max_batch_size, self.world_size)
        dtype = resolve_dtype(cfg.dtype, device)
        model = Transformer(info.args, device=device, dtype=dtype)
        load_into(model, info, self.rank, self.world_size)
        torch.manual_seed(cfg.seed)  # unseeded draws stay identical on every rank
        self.tokenizer = Tokenizer(info.tokenizer_path)
        self.cache = model.new_cache(cfg.max_batch_size)
        self.model = model
        load_s = time.perf_counter() - t0
        log.info("joined %s group of %d at %s:%d, loaded on %s (%s) in %.2fs",
                 backend, self.world_size, master_addr, master_port, device, dtype, load_s)
        return RankState(backend=backend, device=str(device), dtype=str(dtype).removeprefix("torch."), load_s=load_s)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput] | None:
        """Run one batch in lockstep with the other ranks. Only rank 0 returns the outputs
        (every rank computes the same ones); the others return None to save the transfer."""
        if self.model is None:
            raise RuntimeError(f"rank {self.rank} is not set up.")
        out = generate_batch(self.model, self.tokenizer, self.cache, requests)
        return out if self.rank == 0 else None

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
