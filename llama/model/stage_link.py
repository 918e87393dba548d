"""What crosses between pipeline stages in a step: the hidden states, forward, and the logits,
back to the ranks that sample.

Global ranks are stage-major, as fairscale numbers them (initialize_model_parallel with a
pipeline): rank = stage * TP + tp_rank. Tensor-parallel rank t of stage s sends its hidden states
(T, dim), whole after the stage's last all-reduce, to rank t of stage s + 1: one point-to-point
send per boundary and TP rank a step, over the default process group (NCCL on GPUs, gloo on
CPUs). The last stage's first rank sends the step's logits (R, vocab) to each rank in
`logits_to` (of a row whose greedy token is all the driver takes, LOGITS_TOKEN, only that token) (the driver of a gang; under torchrun, where every rank samples for itself, every
rank before the last stage), over a group of their own, so on a GPU they travel on a stream of
their own and never queue behind the next step's hidden states. Both ends know every shape from
the plan, so nothing else travels.

Every send is asynchronous: a stage hands its step on and goes to the next while the receiver
is still busy with an earlier one (the driver keeps a step in flight per stage:
llama/engine/core.py). Each stage receives in the order it was sent to, so no tag is needed.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from llama.model.stages import Stage

class Sends:
    """Asynchronous point-to-point sends, each tensor kept alive until its send is done. Up to
    `unwaited` are left unwaited before the oldest is waited for: more than a pipe of steps in
    flight can owe, so the waiting never holds up the pipe."""

    def __init__(self, unwaited: int):
        self.unwaited = unwaited
        self.sent_bytes = 0
        self._works: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def send(self, t: torch.Tensor, dst: int, group=None) -> None:
        self._works.append((dist.isend(t, dst=dst, group=group), t))
        self.sent_bytes += t.numel() * t.element_size()
        while self._works and (len(self._works) > self.unwaited or self._works[0][0].is_completed()):
            self._works.popleft()[0].wait()


class StageLink:
    def __init__(self, stage: Stage, rank: int, tp_size: int, logits_to: tuple[int, ...]):
        """rank: this process's global rank; logits_to: the global ranks outside the last stage
        that take the logits. Collective: every rank of the world makes its link at the same point
        (the logits' group is made here)."""
        self.stage = stage
        self.rank = rank
        self.prev = None if stage.first else rank - tp_size
        self.next = None if stage.last else rank + tp_size
        self.logits_from = (stage.count - 1) * tp_size  # the last stage's first rank
        self.logits_to = tuple(r for r in logits_to if r < self.logits_from)
        self.back = dist.new_group(backend=dist.get_backend())  # the logits' way back
        self._sends = Sends(2 * stage.count + 2)

    @property
    def sent_bytes(self) -> int:
        """Hidden states and logits this rank has sent (for /cluster, bench)."""
        return self._sends.sent_bytes

    @property
    def takes_logits(self) -> bool:
        """Whether this rank samples from logits the last stage sends (receive_logits)."""
        return self.rank in self.logits_to

    def receive_hidden(self, tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        h = torch.empty((tokens, dim), dtype=dtype, device=device)
        dist.recv(h, src=self.prev)
        return h

    def send_hidden(self, h: torch.Tensor) -> None:
        self._sends.send(h.contiguous(), self.next)

    def send_logits(self, local: torch.Tensor, token_rows: list[int]) -> None:
        """The last stage: its logits (R, vocab) to every rank that takes them (from its first
        rank), in one message: the rows not in token_rows whole, then the greedy token of each
        row in token_rows (as float32: exact below 2**24)."""
        if self.rank != self.logits_from or not local.shape[0] or not self.logits_to:
            return
        if token_rows:
            index = torch.tensor(token_rows, device=local.device)
            keep = torch.ones(local.shape[0], dtype=torch.bool, device=local.device)
            keep[index] = False
            local = torch.cat([local[keep].flatten(), local[index].argmax(dim=-1).float()])
        local = local.contiguous()
        for dst in self.logits_to:
            self._sends.send(local, dst, self.back)

    def receive_logits(self, rows: int, token_rows: list[int], vocab: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A step's message from the last stage, in the order of its steps: its logits (rows,
        vocab) float32, zero in token_rows, and the tokens (rows,) long known already (-1 elsewhere;
        None where no row is a token row)."""
        full = rows - len(token_rows)
        msg = torch.empty(full * vocab + len(token_rows), dtype=torch.float32, device=device)
        if rows:
            dist.recv(msg, src=self.logits_from, group=self.back)
        if not token_rows:
            return msg.view(rows, vocab), None
        logits = torch.zeros((rows, vocab), dtype=torch.float32, device=device)
        known = torch.full((rows,), -1, dtype=torch.long, device=device)
        index = torch.tensor(token_rows, device=device)
        keep = torch.ones(rows, dtype=torch.bool, device=device)
        keep[index] = False
        logits[keep] = msg[: full * vocab].view(full, vocab)
        known[index] = msg[full * vocab :].long()
        return logits, known
