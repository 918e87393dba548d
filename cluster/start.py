"""A gang's start, in stages, each with its own deadline, observable while it runs.

RankGroup.start walks the stages in order and records each in a StartProgress: the stage it
is in, how long each finished stage took, every rank's load progress while weights load, and
the error if the start failed. GET /health and GET /cluster show it until the gang is ready,
and a Serve replica's health check fails once a stage is past its deadline.
"""
from __future__ import annotations

import threading
import time

from cluster.config import ParallelConfig
from cluster.errors import GangStartError

STAGES = ("placement", "actors", "rendezvous", "collective", "weights", "ready")

# What each stage waits for, and what to do when it does not come in time.
STAGE_WAITS = {
    "placement": "the cluster to have room for the gang's bundles",
    "actors": "every rank's process to start",
    "rendezvous": "every rank to join the process group at rank 0's address",
    "collective": "the first all-reduce and broadcast across the gang",
    "weights": "every rank to load its slices of the checkpoint",
    "ready": "the first engine step (a one-token warm-up) through the whole gang",
}
STAGE_FIXES = {
    "placement": "add nodes or free their resources, lower model_parallel_size or pipeline_parallel_size, or use a "
                 "looser placement_strategy (`ray status` shows what the cluster has)",
    "actors": "check `ray status` and the node's logs (/tmp/ray/session_latest/logs); a runtime_env that installs "
              "packages may need a longer parallel.actors_timeout_s",
    "rendezvous": "the machines must reach each other on all TCP ports from their Ray addresses; run "
                  "`python -m deploy.doctor deploy/config.yaml` to see which rank cannot",
    "collective": "the interface used for collectives (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME) may not carry traffic "
                  "between the machines; run `python -m deploy.doctor deploy/config.yaml`",
    "weights": "raise parallel.load_timeout_s for a big model or slow disks, or copy the checkpoint to every "
               "machine's local disk (GET /cluster shows each rank's rate)",
    "ready": "a device or a collective hangs: run `python -m deploy.doctor deploy/config.yaml`; raise "
             "parallel.call_timeout_s if one step of this model is really that slow",
}


def stage_deadlines(parallel: ParallelConfig) -> dict[str, float]:
    """Each stage's deadline in seconds, from the settings that own them."""
    return {"placement": parallel.placement_timeout_s, "actors": parallel.actors_timeout_s,
            "rendezvous": parallel.rendezvous_timeout_s, "collective": parallel.collective_timeout_s,
            "weights": parallel.load_timeout_s, "ready": parallel.call_timeout_s}


class StartProgress:
    """Where a start is. Written by the starting thread, read by any other (thread-safe)."""

    def __init__(self, deadlines: dict[str, float], clock=time.monotonic):
        if set(deadlines) != set(STAGES):
            raise ValueError(f"a deadline for each of {STAGES} is needed, got {sorted(deadlines)}")
        self.deadlines = dict(deadlines)
        self._clock = clock
        self._lock = threading.Lock()
        self._began = clock()
        self._stage: str | None = None  # None: not begun; "ready" once enter("ready") finished by done()
        self._stage_began = self._began
        self._finished: list[tuple[str, float]] = []
        self._ready = False
        self._ready_at = 0.0
        self._error: BaseException | None = None
        self._cancelled = False
        self.ranks: list[dict] | None = None  # each rank's LoadProgress.as_dict(), while and after loading

    # ---- the starting thread
    def enter(self, stage: str) -> float:
        """Finish the current stage and begin `stage`; returns its deadline in seconds."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        with self._lock:
            if self._cancelled:
                raise GangStartError("the start was cancelled: the replica is shutting down.")
            now = self._clock()
            if self._stage is not None:
                self._finished.append((self._stage, now - self._stage_began))
            self._stage, self._stage_began = stage, now
            return self.deadlines[stage]

    def left_s(self) -> float:
        """Seconds left before the current stage's deadline (negative: past it)."""
        with self._lock:
            return self.deadlines.get(self._stage, 0.0) - (self._clock() - self._stage_began)

    def timed_out(self) -> GangStartError:
        """The error for the current stage having passed its deadline: what it waited for, how
        long, and the fix."""
        stage = self._stage or "placement"
        return GangStartError(f"the gang did not get through stage {stage!r} ({STAGES.index(stage) + 1} of "
                              f"{len(STAGES)}: waiting for {STAGE_WAITS[stage]}) within its "
                              f"{self.deadlines[stage]:g}s deadline: {STAGE_FIXES[stage]}.")

    def done(self) -> None:
        with self._lock:
            self._ready_at = self._clock()
            self._finished.append((self._stage, self._ready_at - self._stage_began))
            self._ready = True

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True

    # ---- readers
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Raise if the start failed or its current stage is past its deadline; pass while it
        is on time (a Serve replica's health check while its gang starts)."""
        if self._error is not None:
            raise self._error
        if not self._ready and self.left_s() < 0:
            raise self.timed_out()

    def as_dict(self) -> dict:
        with self._lock:
            now = self._clock()
            stage = "ready" if self._ready else self._stage
            return {
                "stage": stage or "placement",
                "stage_number": STAGES.index(stage or "placement") + 1,
                "stages": len(STAGES),
                "stage_seconds": None if self._ready else round(now - self._stage_began, 2),
                "stage_deadline_s": None if self._ready else self.deadlines[stage or "placement"],
                "seconds": round((self._ready_at if self._ready else now) - self._began, 2),
                "finished_stages": [{"stage": s, "seconds": round(t, 3)} for s, t in self._finished],
                "ranks_loading": self.ranks,
                "error": None if self._error is None else f"{type(self._error).__name__}: {self._error}",
            }

    def describe(self) -> str:
        """One line for a log or an error: 'stage weights (5 of 6), 3.2s in, deadline 1800s'."""
        d = self.as_dict()
        if d["error"]:
            return f"failed in stage {d['stage']}: {d['error']}"
        if self._ready:
            return f"ready after {d['seconds']:.1f}s"
        return f"stage {d['stage']} ({d['stage_number']} of {d['stages']}), {d['stage_seconds']:.1f}s in, deadline " \
               f"{d['stage_deadline_s']:g}s"
