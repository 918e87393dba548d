"""StartingGroup: a RankGroup started in the background, serving as soon as it is ready.

A Serve replica answers only once its constructor returns, so a replica that started its gang
in the constructor could say nothing while the gang placed, joined and loaded (minutes, on a
big model). This wraps the start instead: the constructor returns at once, GET /health names
the stage until the gang is ready, requests wait for it (up to `wait_s`), and the replica's
health check passes while each stage is within its deadline and fails once one is not, so
Serve replaces a gang that cannot start.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from ray.util.placement_group import PlacementGroup

from cluster.admission import Admission
from cluster.config import GangConfig
from cluster.errors import DrainingError, GangStartingError, RankFailedError
from cluster.group import RankGroup
from cluster.start import StartProgress, stage_deadlines
from llama.engine.request import GenerationRequest, StreamDelta

log = logging.getLogger(__name__)


class StartingGroup:
    def __init__(self, config: GangConfig, placement: PlacementGroup | None = None, first_bundle: int = 0,
                 wait_s: float | None = 60.0, poll_s: float = 0.05):
        self.progress = StartProgress(stage_deadlines(config.parallel))
        self.group: RankGroup | None = None
        self.wait_s = wait_s
        self._poll_s = poll_s
        self._draining: str | None = None
        self._thread = threading.Thread(target=self._start, args=(config, placement, first_bundle),
                                        name="gang-start", daemon=True)
        self._thread.start()

    def _start(self, config: GangConfig, placement: PlacementGroup | None, first_bundle: int) -> None:
        try:
            self.group = RankGroup.start(config, placement, first_bundle, self.progress)
        except BaseException as e:  # noqa: BLE001 - recorded in progress, seen by the health checks
            if self.progress.error is None:
                self.progress.fail(e)
            log.error("the gang did not start: %s", e)

    @property
    def ready(self) -> bool:
        return self.group is not None

    async def _wait_ready(self, wait_s: float | None) -> RankGroup:
        """The gang, once ready; waits up to wait_s (None: until the start ends, which each
        stage's deadline bounds)."""
        loop = asyncio.get_running_loop()
        until = float("inf") if wait_s is None else loop.time() + wait_s
        while self.group is None:
            if self._draining is not None:
                raise DrainingError(f"this replica is shutting down ({self._draining}) before its model started; "
                                    f"retry, and another replica (or this one's replacement) will serve it.")
            if self.progress.error is not None:
                raise RankFailedError(f"the gang failed to start ({self.progress.error}); this replica will be "
                                      f"replaced")
            if loop.time() >= until:
                raise self._starting()
            await asyncio.sleep(self._poll_s)
        if self._draining is not None and self.group.draining is None:  # it became ready as the drain began
            self.group.drain(self._draining)
        return self.group

    def _starting(self) -> GangStartingError:
        return GangStartingError(f"the model is still starting: {self.progress.describe()}", self.progress.as_dict())

    # ---- EngineClient (deploy/engine_client.py)
    async def admit(self, n: int) -> Admission:
        group = await self._wait_ready(self.wait_s)
        return group.admit(n)

    async def stream(self, request: GenerationRequest, admission: Admission | None = None
                     ) -> AsyncIterator[StreamDelta]:
        group = await self._wait_ready(self.wait_s)
        async for delta in group.stream(request, admission):
            yield delta

    async def check_health(self) -> None:
        """Ready to serve: raises GangStartingError while starting, a ClusterError once failed."""
        group = await self._wait_ready(0.0)
        await group.check_health()

    async def cluster_info(self) -> dict:
        if self.group is None:
            return {"healthy": False, "ready": False, "start": self.progress.as_dict()}
        return {**await self.group.cluster_info(), "ready": True}

    # ---- the replica
    async def check_alive(self) -> None:
        """Serve's health check: passes while the start is on time, fails once a stage is past
        its deadline or the start or the gang failed."""
        if self.group is None:
            self.progress.check()
        else:
            await self.group.check_health()

    def drain(self, why: str) -> int:
        """Serve has begun to stop this replica: requests waiting for the start are refused, and
        the gang, if ready, drains (RankGroup.drain). Returns how many requests were ended."""
        self._draining = why
        return 0 if self.group is None else self.group.drain(why)

    def cut(self) -> int:
        """The drain's grace period is spent: RankGroup.cut."""
        return 0 if self.group is None else self.group.cut()

    def shutdown(self) -> None:
        self.progress.cancel()
        if self.group is not None:
            self.group.shutdown()
