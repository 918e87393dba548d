"""The driver/follower lockstep: step plans travel from rank 0 to every other rank.

PlanChannel broadcasts each StepPlan as one fixed-size int64 tensor over a CPU (gloo) group of
its own, apart from the model's NCCL/gloo group, so a plan never waits behind GPU work and a
step costs one small collective; through shared memory where the model's collectives go that
way (every rank on one CPU machine). A follower then yields its core while it waits, for
PLAN_YIELD_S, and an idle one sleeps 5 ms at a time. Followers loop on `follow`: receive a plan, run it, repeat,
until the driver's stop plan arrives; they never decide anything themselves. An overlapping
driver (llama/engine/core.py) sends plan N+1 while step N runs; a plan whose decodes take step N's
tokens makes every rank's ModelRunner join the broadcast of those tokens first, on the device.

In a pipeline the plans travel with the steps instead: the driver broadcasts a plan to its own
stage's ranks only and sends it to the next stage, whose ranks each take it from their peer in
the stage before and pass it on, all asynchronously. A whole-gang broadcast would make the
driver wait for the last stage to finish the step before; this way each stage takes plan N+1
when it is done with step N, while the driver is already on step N+2 (llama/engine/core.py).
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from llama.engine.runner import ModelRunner
from llama.engine.step_plan import StepPlan
from llama.model.shared_memory_group import SharedMemoryGroup
from llama.model.stage_link import Sends
from llama.model.stages import Stage

log = logging.getLogger(__name__)

PLAN_YIELD_S = 0.05  # a follower yields its core this long for the next plan before it sleeps (idle)


class PlanChannel:
    def __init__(self, capacity: int, timeout_s: float, shared_memory: bool = False, stage: Stage | None = None,
                 rank: int = 0, tp_size: int = 1):
        """stage, rank, tp_size: where this rank is in a pipeline (None: no pipeline)."""
        # Every rank creates the groups, in the same order (collective calls of their own).
        timeout = timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.capacity = capacity
        self._buf = torch.zeros(capacity, dtype=torch.int64)
        self.sent = 0
        self.send_s = 0.0
        pipeline = stage is not None and stage.count > 1
        self.pipeline = pipeline
        # A pipeline: the first stage's ranks broadcast among themselves; each later rank takes
        # plans from its peer in the stage before (prev) and passes them to the one after (next).
        self.first_stage = (dist.new_group(ranks=list(range(tp_size)), backend="gloo", timeout=timeout)
                            if pipeline and tp_size > 1 else None)
        self.prev = rank - tp_size if pipeline and not stage.first else None
        self.next = rank + tp_size if pipeline and not stage.last else None
        self._forwards = Sends(2 * stage.count + 2) if pipeline else None
        # Where every rank shares the machine (the model's collectives already do), through
        # shared memory rather than gloo's sockets; None where no shared file could be made.
        self.shared = (SharedMemoryGroup.create(self.group, capacity * 8, timeout_s, yield_s=PLAN_YIELD_S)
                       if shared_memory and not pipeline else None)

    def publish(self, plan: StepPlan) -> None:
        """Driver: send the plan to every other rank (returns once they all have it); in a pipeline,
        to its own stage's ranks, and on down the pipe without waiting."""
        t0 = time.perf_counter()
        t = plan.to_tensor(self.capacity)
        self._broadcast(t)
        self._forward(t)
        self.sent += 1
        self.send_s += time.perf_counter() - t0

    def receive(self) -> StepPlan:
        """Follower: wait for the driver's next plan (in a pipeline, pass it on down the pipe)."""
        if self.prev is not None:
            dist.recv(self._buf, src=self.prev, group=self.group)
        else:
            self._broadcast(self._buf)
        self._forward(self._buf)
        return StepPlan.from_tensor(self._buf)

    def _forward(self, t: torch.Tensor) -> None:
        if self.next is not None:
            self._forwards.send(t.clone(), self.next, self.group)

    def _broadcast(self, t: torch.Tensor) -> None:
        if self.pipeline:
            if self.first_stage is not None:
                dist.broadcast(t, src=0, group=self.first_stage)
        elif self.shared is not None:
            self.shared.broadcast_(t, src=0)
        else:
            dist.broadcast(t, src=0, group=self.group)


def follow(runner: ModelRunner, channel: PlanChannel) -> None:
    """A follower's whole life after setup: run each plan the driver sends, until it says stop."""
    steps = 0
    while True:
        plan = channel.receive()
        if plan.stop:
            log.info("driver stopped after %d steps; leaving the loop", steps)
            return
        runner.execute(plan)
        steps += 0 if plan.idle else 1
