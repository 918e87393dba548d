"""The driver/follower lockstep: step plans travel from rank 0 to every other rank.

PlanChannel broadcasts each StepPlan as one fixed-size int64 tensor over a CPU (gloo) group of
its own, apart from the model's NCCL/gloo group, so a plan never waits behind GPU work and a
step costs one small collective; through shared memory where the model's collectives go that
way (every rank on one CPU machine). A follower then yields its core while it waits, for
PLAN_YIELD_S, and an idle one sleeps 5 ms at a time. Followers loop on `follow`: receive a plan, run it, repeat,
until the driver's stop plan arrives; they never decide anything themselves. An overlapping
driver (llama/engine/core.py) sends plan N+1 while step N runs; a plan whose decodes take step N's
tokens makes every rank's ModelRunner join the broadcast of those tokens first, on the device.
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

log = logging.getLogger(__name__)

PLAN_YIELD_S = 0.05  # a follower yields its core this long for the next plan before it sleeps (idle)


class PlanChannel:
    def __init__(self, capacity: int, timeout_s: float, shared_memory: bool = False):
        # Every rank creates the group, in the same order (a collective call of its own).
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.capacity = capacity
        self._buf = torch.zeros(capacity, dtype=torch.int64)
        self.sent = 0
        self.send_s = 0.0
        # Where every rank shares the machine (the model's collectives already do), through
        # shared memory rather than gloo's sockets; None where no shared file could be made.
        self.shared = (SharedMemoryGroup.create(self.group, capacity * 8, timeout_s, yield_s=PLAN_YIELD_S)
                       if shared_memory else None)

    def publish(self, plan: StepPlan) -> None:
        """Driver: send the plan to every other rank (returns once they all have it)."""
        t0 = time.perf_counter()
        self._broadcast(plan.to_tensor(self.capacity))
        self.sent += 1
        self.send_s += time.perf_counter() - t0

    def receive(self) -> StepPlan:
        """Follower: wait for the driver's next plan."""
        self._broadcast(self._buf)
        return StepPlan.from_tensor(self._buf)

    def _broadcast(self, t: torch.Tensor) -> None:
        if self.shared is not None:
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
