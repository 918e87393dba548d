"""Unit tier: no Ray. One process-wide size-1 model-parallel group (gloo), started once."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mp1() -> None:
    import torch.distributed as dist

    from llama.distributed import init_model_parallel, init_single_process_group

    if not dist.is_initialized():
        init_single_process_group("gloo")
    init_model_parallel(1)
