"""RankGroup: a gang of N rank actors that acts as one model.

Creates the actors on their placement-group bundles, has them meet at rank 0's address, and
fans each batch out to every rank; rank 0's outputs are the answer. Batches run one at a time
(ranks must see them in the same order). Any rank failure makes the whole gang unhealthy: it
is replaced, never repaired in place.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import GangConfig
from cluster.errors import RankFailedError
from cluster.placement import acquire, plan_bundles, want_gpu
from cluster.rank import RankActor, RankInfo, RankState
from llama.request import GenerationOutput, GenerationRequest

log = logging.getLogger(__name__)

_RemoteRank = ray.remote(concurrency_groups={"control": 2})(RankActor)


class RankGroup:
    def __init__(self, config: GangConfig, actors: list, states: list[RankState], infos: list[RankInfo],
                 placement: PlacementGroup, owns_placement: bool):
        self.config = config
        self.actors = actors
        self.states = states
        self.infos = infos
        self.placement = placement
        self._owns_placement = owns_placement
        self._lock = asyncio.Lock()  # one batch at a time, in the same order on every rank
        self._failed: str | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, config: GangConfig, placement: PlacementGroup | None = None, first_bundle: int = 0) -> "RankGroup":
        """Start the gang. With `placement` (a Serve replica's group), ranks take bundles
        first_bundle.. of it; without, a placement group for just the ranks is reserved."""
        t0 = time.perf_counter()
        n = config.model_parallel_size
        use_gpu = want_gpu(config.device, n)
        owns = placement is None
        if owns:
            placement = acquire(plan_bundles(n, use_gpu, config.cpus_per_rank), config.placement_strategy,
                                config.placement_timeout_s)
            first_bundle = 0
        actors = [
            _RemoteRank.options(
                num_cpus=config.cpus_per_rank,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=first_bundle + r),
                name=None,
            ).remote(config, r)
            for r in range(n)
        ]
        try:
            addr, port = ray.get(actors[0].rendezvous_address.remote(), timeout=config.init_timeout_s)
            states = ray.get([a.setup.remote(addr, port) for a in actors], timeout=config.init_timeout_s)
            infos = ray.get([a.info.remote() for a in actors], timeout=config.init_timeout_s)
        except Exception as e:
            for a in actors:
                ray.kill(a)
            if owns:
                remove_placement_group(placement)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, ValueError):
                raise e.cause from None  # a configuration mistake (bad checkpoint, bad size)
            if isinstance(e, ray.exceptions.RayTaskError):
                raise RankFailedError(f"a rank failed while starting the gang: {e.cause!r}") from e
            raise RankFailedError(f"the gang of {n} ranks did not start: {e!r}") from e
        log.info("gang of %d ranks (%s, %s, %s) up in %.2fs", n, states[0].backend, states[0].device,
                 states[0].dtype, time.perf_counter() - t0)
        return cls(config, actors, states, infos, placement, owns)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead: nothing to do
                pass
        self.actors = []
        if self._owns_placement:
            remove_placement_group(self.placement)

    # ------------------------------------------------------------------ generation
    def _chunks(self, requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        b = self.config.max_batch_size
        return [requests[i : i + b] for i in range(0, len(requests), b)]

    def _check_usable(self) -> None:
        if self._failed:
            raise RankFailedError(f"this gang failed earlier ({self._failed}) and must be replaced.")

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Outputs for any number of requests, in order, batched up to max_batch_size."""
        outputs: list[GenerationOutput] = []
        async with self._lock:
            for chunk in self._chunks(requests):
                self._check_usable()
                refs = [a.generate.remote(chunk) for a in self.actors]
                try:
                    results = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.config.call_timeout_s)
                except Exception as e:
                    raise self._classify(e, refs) from e
                outputs.extend(results[0])
        return outputs

    def generate_blocking(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """The same as generate, for synchronous callers (scripts, tests)."""
        outputs: list[GenerationOutput] = []
        for chunk in self._chunks(requests):
            self._check_usable()
            refs = [a.generate.remote(chunk) for a in self.actors]
            try:
                results = ray.get(refs, timeout=self.config.call_timeout_s)
            except Exception as e:
                raise self._classify(e, refs) from e
            outputs.extend(results[0])
        return outputs

    def _classify(self, e: Exception, refs: list) -> Exception:
        """A ValueError raised on the ranks is the caller's mistake (raised on every rank before
        any collective, so the gang is fine); anything else breaks the gang."""
        if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e, ValueError):
            ray.wait(refs, num_returns=len(refs), timeout=30)  # every rank raised the same
            return e.cause if isinstance(e.cause, ValueError) else e
        if isinstance(e, (asyncio.TimeoutError, ray.exceptions.GetTimeoutError)):
            self._failed = f"a generate call took longer than {self.config.call_timeout_s:.0f}s"
        else:
            self._failed = f"{type(e).__name__}: {e}"
        return RankFailedError(f"the gang failed during generation: {self._failed}")

    # ------------------------------------------------------------------ health and info
    async def check_health(self, timeout_s: float = 30.0) -> None:
        self._check_usable()
        try:
            await asyncio.wait_for(asyncio.gather(*[a.ping.remote() for a in self.actors]), timeout=timeout_s)
        except Exception as e:
            self._failed = f"health check: {type(e).__name__}: {e}"
            raise RankFailedError(f"a rank did not answer its health check: {e!r}") from e

    async def cluster_info(self) -> dict:
        s = self.states[0]
        return {
            "world_size": len(self.infos),
            "backend": s.backend,
            "device": s.device,
            "dtype": s.dtype,
            "healthy": self._failed is None,
            "placement_group_id": self.placement.id.hex(),
            "ranks": [
                {**asdict(i), "gpu_ids": list(i.gpu_ids), "load_s": round(st.load_s, 3)}
                for i, st in zip(self.infos, self.states)
            ],
        }
