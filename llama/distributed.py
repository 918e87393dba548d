"""Device, dtype and collective-backend choices, and fairscale's model-parallel state.

Everything here acts on a process group someone else created, except
`init_single_process_group`, which `Llama.build` uses when a user runs a plain script.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import logging
import socket

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class BackendUnavailableError(RuntimeError):
    """The asked-for collective backend is not built into this torch."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda when there is one, else cpu. 'cuda' without CUDA is an error."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was asked for but this torch sees no CUDA device "
                f"(torch {torch.__version__}). Use device: auto or cpu, or install a CUDA build of torch."
            )
        if dev.index is None:  # an explicit index: torch.cuda.set_device and NCCL need one
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto'/None -> bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}.") from None


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    """nccl for CUDA ranks, gloo for CPU ranks; a forced choice is checked against this build."""
    backend = requested or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise BackendUnavailableError(
                "backend 'nccl' was asked for, but this torch build has no NCCL (CPU-only wheels and "
                "macOS never do). Run on CPU with backend 'gloo' (the default when no GPU is used), "
                "or install a CUDA build of torch on a machine with NVIDIA GPUs."
            )
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"backend 'nccl' needs CUDA tensors, but the model runs on {device}. Use 'gloo' on CPU."
            )
    elif backend == "gloo":
        if not dist.is_gloo_available():
            raise BackendUnavailableError("backend 'gloo' is not built into this torch.")
    else:
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}.")
    return backend


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_single_process_group(backend: str) -> None:
    """A world of one, for plain single-process use of the reference API."""
    port = free_port("127.0.0.1")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    destroy_at_exit()
    log.info("started a single-process %s group on port %d", backend, port)


def destroy_at_exit() -> None:
    """Destroy the default group at interpreter exit: a group left for the interpreter to tear
    down makes torch warn, and gloo ranks can abort at exit under torchrun."""

    def _destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(_destroy)


def init_model_parallel(model_parallel_size: int, pipeline_parallel_size: int = 1) -> None:
    """Initialise fairscale's model-parallel groups over the existing default process group: a
    world of pipeline_parallel_size stages of model_parallel_size ranks, stage-major (global
    rank = stage * model_parallel_size + model-parallel rank)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before model parallelism.")
    world = dist.get_world_size()
    if world % (model_parallel_size * pipeline_parallel_size):
        raise ValueError(f"model_parallel_size {model_parallel_size} x pipeline_parallel_size {pipeline_parallel_size} "
                         f"does not divide the world size {world}.")
    if fs_init.model_parallel_is_initialized():
        have = fs_init.get_model_parallel_world_size()
        if have != model_parallel_size:
            raise ValueError(f"model parallelism is already initialised with size {have}, not {model_parallel_size}.")
        return
    # fairscale announces each group with print(); keep stdout clean and log it instead.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        fs_init.initialize_model_parallel(model_parallel_size, pipeline_length=pipeline_parallel_size)
    for line in said.getvalue().splitlines():
        log.debug("fairscale: %s", line.lstrip("> "))


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()
