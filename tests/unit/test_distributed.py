"""Device, dtype and collective-backend choices (llama.distributed), with clear errors for what this machine lacks."""
from __future__ import annotations

import pytest
import torch

from llama.distributed import BackendUnavailableError, choose_backend, resolve_device, resolve_dtype


def test_no_nccl_on_a_cpu_machine_is_a_clear_error():
    cpu = torch.device("cpu")
    assert choose_backend(cpu) == "gloo"
    with pytest.raises(BackendUnavailableError, match="nccl.*(no NCCL|needs CUDA)"):
        choose_backend(cpu, "nccl")


def test_device_and_dtype_resolution():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8", torch.device("cpu"))
