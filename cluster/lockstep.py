"""The driver/follower lockstep: step plans travel from rank 0 to every other rank.

PlanChannel broadcasts each StepPlan as one fixed-size int64 tensor over a CPU (gloo) group of
its own, apart from the model's NCCL/gloo group, so a plan never waits behind GPU work and a
step costs one small collective. Followers loop on `follow`: receive a plan, run it, repeat,
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

log = logging.getLogger(__name__)


class PlanChannel:
    def __init__(self, capacity: int, timeout_s: float):
        # Every rank creates the group, in the same order (a collective call of its own).
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.capacity = capacity
        self._buf = torch.zeros(capacity, dtype=torch.int64)
        self.sent = 0
        self.send_s = 0.0

    def publish(self, plan: StepPlan) -> None:
        """Driver: send the plan to every other rank (returns once they all have it)."""
        t0 = time.perf_counter()
        dist.broadcast(plan.to_tensor(self.capacity), src=0, group=self.group)
        self.sent += 1
        self.send_s += time.perf_counter() - t0

    def receive(self) -> StepPlan:
        """Follower: wait for the driver's next plan."""
        dist.broadcast(self._buf, src=0, group=self.group)
        return StepPlan.from_tensor(self._buf)


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
