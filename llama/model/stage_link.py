"""What crosses between pipeline stages in a step: the hidden states, forward, and the logits,
back to the ranks that sample.

Global ranks are stage-major, as fairscale numbers them (initialize_model_parallel with a
pipeline): rank = stage * TP + tp_rank. Tensor-parallel rank t of stage s sends its hidden states
(T, dim), whole after the stage's last all-reduce, to rank t of stage s + 1: one point-to-point
send per boundary and TP rank a step, over the default process group (NCCL on GPUs, gloo on
CPUs). The last stage's first rank sends the step's logits (R, vocab) to each rank in
`logits_to` (the driver of a gang; under torchrun, where every rank samples for itself, every
rank before the last stage). Both ends know every shape from the plan, so nothing else travels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llama.model.stages import Stage


class StageLink:
    def __init__(self, stage: Stage, rank: int, tp_size: int, logits_to: tuple[int, ...]):
        """rank: this process's global rank; logits_to: the global ranks outside the last stage
        that take the logits."""
        self.stage = stage
        self.rank = rank
        self.prev = None if stage.first else rank - tp_size
        self.next = None if stage.last else rank + tp_size
        self.logits_from = (stage.count - 1) * tp_size  # the last stage's first rank
        self.logits_to = tuple(r for r in logits_to if r < self.logits_from)
        self.sent_bytes = 0  # hidden states and logits this rank has sent (for /cluster, bench)

    def receive_hidden(self, tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        h = torch.empty((tokens, dim), dtype=dtype, device=device)
        dist.recv(h, src=self.prev)
        return h

    def send_hidden(self, h: torch.Tensor) -> None:
        h = h.contiguous()
        dist.send(h, dst=self.next)
        self.sent_bytes += h.numel() * h.element_size()

    def logits(self, local: torch.Tensor | None, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        """The step's logits (rows, vocab) float32 where this rank takes them (the last stage's own
        `local`; received from it in `logits_to`), else an empty (0, vocab)."""
        if self.stage.last:
            if self.rank == self.logits_from and rows:
                local = local.contiguous()
                for dst in self.logits_to:
                    dist.send(local, dst=dst)
                    self.sent_bytes += local.numel() * local.element_size()
            return local
        if self.rank not in self.logits_to or not rows:
            return torch.empty((0, vocab), device=device)
        out = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        dist.recv(out, src=self.logits_from)
        return out
