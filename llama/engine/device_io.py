"""Small host<->device moves that never make the host wait for the GPU's queue.

A plain `torch.tensor(values, device="cuda")` or `.to("cuda")` of pageable host memory copies
and then waits for the stream to drain: every step's small inputs would stall the host until
the previous step had finished on the GPU, and the engine could not build the next plan while
the GPU runs the current one. `to_device` stages through pinned memory and copies without
waiting (torch's pinned allocator keeps the staging buffer until the copy has run).
`Readback` starts a step's one device->host copy and lets the host collect it later. On the
CPU both are plain tensors.
"""
from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A list (or host tensor) of values as a tensor on `device`, without waiting for the stream."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class Readback:
    """A device tensor on its way to the host: the copy is queued now, `tolist` waits for it."""

    def __init__(self, t: torch.Tensor):
        if t.device.type == "cuda":
            self._host = t.to("cpu", non_blocking=True)  # into pinned memory, after the queued work
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = t, None

    def tolist(self) -> list:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
