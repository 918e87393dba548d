"""The gang's configuration: how ranks are placed and joined (ParallelConfig), and GangConfig,
everything a gang needs, built once where configuration enters and passed whole to every rank.

Each setting has one home and one default: the engine's in llama.engine.config.EngineConfig, the
ranks' here, the HTTP app's in deploy/settings.py. deploy/config.yaml fills all three.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama.checkpoints.info import CheckpointInfo
from llama.checkpoints.load import inspect_checkpoint
from llama.distributed import DTYPES, resolve_dtype
from llama.engine.config import EngineConfig
from llama.engine.kv_memory import pool_blocks
from llama.model.stages import split_layers

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement-group strategies


@dataclass(frozen=True)
class ParallelConfig:
    model_parallel_size: int = 1  # tensor-parallel ranks per stage; the checkpoint is resharded to this
    # Pipeline stages, each of model_parallel_size ranks holding a contiguous run of the layers
    # (llama/model/stages.py): an even split, or pipeline_layers of them each. A gang is
    # pipeline_parallel_size x model_parallel_size ranks; each stage's ranks share one placement
    # bundle, so one machine, and placement_strategy places the stages.
    pipeline_parallel_size: int = 1
    pipeline_layers: list[int] | None = None
    device: str = "auto"  # auto (cuda when the cluster has a GPU per rank) | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    backend: str | None = None  # None: nccl on cuda, gloo on cpu
    # On the CPU, the model's collectives among a gang's ranks that all share one machine go
    # through shared memory (llama/shared_memory_group.py); false: through gloo's sockets.
    shared_memory: bool = True
    cpus_per_rank: float = 1.0  # logical CPUs in each rank's placement bundle
    # Threads each rank's step computes with (its OMP_NUM_THREADS). None: its machine's CPUs (as
    # Ray counts them) shared evenly among the gang's ranks placed there (as vLLM's CPU backend
    # binds its ranks), at least 1. Ray's own default would be the bundle's CPUs rounded down
    # (1 for the demo's 0.5), which leaves cores idle.
    threads_per_rank: int | None = None
    placement_strategy: str = "PACK"  # STRICT_SPREAD puts each rank on its own node
    # False: a gang the cluster's nodes could never hold fails at once, saying why. True (a
    # cluster that adds nodes on demand): it waits placement_timeout_s for them instead.
    autoscaling: bool = False
    # A start goes through stages, each with its own deadline (cluster/start.py); GET /health
    # names the stage until the gang is ready.
    placement_timeout_s: float = 300.0  # the cluster has room for the gang's bundles
    actors_timeout_s: float = 300.0  # every rank's process is up (runtime_env, imports)
    rendezvous_timeout_s: float = 120.0  # every rank has joined the process group at rank 0's address
    collective_timeout_s: float = 60.0  # the first all-reduce and broadcast across the gang
    load_timeout_s: float = 1800.0  # every rank has its slices of the checkpoint
    call_timeout_s: float = 600.0  # one engine step (the warm-up, then any); longer is a hung gang
    # Environment variables every rank process gets (e.g. NCCL_DEBUG: INFO), set on its actor
    # explicitly rather than inherited from whichever shell started each node's Ray.
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", *DTYPES), "backend": (None, "nccl", "gloo"),
                   "placement_strategy": STRATEGIES}
        bad = [f"{k} must be one of {list(v)}, got {getattr(self, k)!r}" for k, v in choices.items()
               if getattr(self, k) not in v]
        for k in ("model_parallel_size", "pipeline_parallel_size"):
            if type(getattr(self, k)) is not int or not 1 <= getattr(self, k) <= 64:  # bool is no count
                bad.append(f"{k} must be an integer from 1 to 64, got {getattr(self, k)!r}")
        if self.pipeline_layers is not None and (
                not isinstance(self.pipeline_layers, (list, tuple)) or len(self.pipeline_layers) != self.pipeline_parallel_size
                or any(type(n) is not int or n < 1 for n in self.pipeline_layers)):
            bad.append(f"pipeline_layers must be a list of one count of layers (at least 1) per pipeline stage "
                       f"({self.pipeline_parallel_size}), or be null for an even split; got {self.pipeline_layers!r}")
        if self.threads_per_rank is not None and (type(self.threads_per_rank) is not int or self.threads_per_rank < 1):
            bad.append(f"threads_per_rank must be an integer >= 1 (or null: the machine's cores shared by its ranks), "
                       f"got {self.threads_per_rank!r}")
        bad += [f"{k} must be true or false, got {getattr(self, k)!r}" for k in ("autoscaling", "shared_memory")
                if not isinstance(getattr(self, k), bool)]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            bad.append(f"env must map names to string values, got {self.env!r}")
        elif "OMP_NUM_THREADS" in self.env:
            bad.append("env must not set OMP_NUM_THREADS: set threads_per_rank instead (null: the machine's CPUs "
                       "shared by the gang's ranks on it)")
        positive = ("cpus_per_rank", "placement_timeout_s", "actors_timeout_s", "rendezvous_timeout_s",
                    "collective_timeout_s", "load_timeout_s", "call_timeout_s")
        bad += [f"{k} must be > 0, got {getattr(self, k)!r}" for k in positive if not getattr(self, k) > 0]
        if bad:
            raise ValueError("parallel settings: " + "; ".join(bad) + ".")

    @property
    def world_size(self) -> int:
        """The gang's ranks: pipeline stages x tensor-parallel ranks, stage-major (rank = stage *
        model_parallel_size + its rank within the stage)."""
        return self.pipeline_parallel_size * self.model_parallel_size

    def stage_layers(self, n_layers: int) -> list[range]:
        """Each pipeline stage's run of a model's n_layers layers (ValueError where they cannot split so)."""
        return split_layers(n_layers, self.pipeline_parallel_size, self.pipeline_layers)

    def bundle_of(self, rank: int) -> int:
        """Which of the gang's rank bundles holds `rank`: its own without a pipeline, its stage's with."""
        return rank if self.pipeline_parallel_size == 1 else rank // self.model_parallel_size

    def threads(self, ranks_here: int, cores: int) -> int:
        """A rank's threads, with ranks_here of its gang on a machine of `cores` CPUs."""
        return self.threads_per_rank if self.threads_per_rank is not None else max(1, cores // max(1, ranks_here))


@dataclass(frozen=True)
class GangConfig:
    checkpoint: CheckpointInfo  # inspected once per start, where configuration enters
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @classmethod
    def inspect(cls, ckpt_dir: str | Path, tokenizer_path: str | Path | None = None,
                parallel: ParallelConfig | None = None, engine: EngineConfig | None = None) -> "GangConfig":
        """Validate the checkpoint for the model-parallel size (raising CheckpointError, a
        ValueError naming the file and the fix) and bundle it with the settings."""
        parallel = parallel or ParallelConfig()
        checkpoint = inspect_checkpoint(ckpt_dir, tokenizer_path, parallel.model_parallel_size)
        try:  # the stages' split, against the model's layers
            parallel.stage_layers(checkpoint.args.n_layers)
        except ValueError as e:
            raise ValueError(f"parallel settings: {e}") from None
        engine = engine or EngineConfig()
        return cls(checkpoint, parallel, engine.for_model(checkpoint.args, _pool_tokens(engine, checkpoint, parallel)))


def _pool_tokens(engine: EngineConfig, checkpoint: CheckpointInfo, parallel: ParallelConfig) -> int | None:
    """Positions each rank's KV pool will hold, where that is known before the ranks start (not
    for CUDA's default, which the ranks measure)."""
    if parallel.device == "auto":
        return None
    element = resolve_dtype(parallel.dtype if parallel.dtype != "auto" or parallel.device == "cpu" else "bfloat16",
                            torch.device(parallel.device)).itemsize
    largest = max(map(len, parallel.stage_layers(checkpoint.args.n_layers)))  # a rank holds one stage's layers
    blocks = pool_blocks(engine, checkpoint.args, parallel.model_parallel_size, element, parallel.device,
                         layers=largest)
    return None if blocks is None else blocks * engine.block_size
