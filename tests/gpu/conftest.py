"""GPU tier: skipped where torch sees no CUDA device. No Ray here (the device machine has none)."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def mp1_cuda() -> None:
    import torch.distributed as dist

    from llama.distributed import init_model_parallel, init_single_process_group

    if not dist.is_initialized():
        init_single_process_group("nccl")
    init_model_parallel(1)
