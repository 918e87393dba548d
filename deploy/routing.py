"""ReadyFirstRouter: Serve's request router for LlamaDeployment. Replicas whose gang is ready
come first; a replica still starting its gang (which would make the request wait) only gets
requests when no ready replica can take them. Within each, power of two choices, as Serve's
default router: two picked at random, the one with the shorter queue wins.

Each replica reports {"ready": bool} through record_routing_stats (deploy/server.py); a
replica not yet heard from counts as starting.
"""
from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def rank_ready_first(replicas: list, sample=random.sample) -> list[list]:
    """[up to two ready replicas, up to two starting ones], leaving out an empty rank."""
    ready = [r for r in replicas if r.routing_stats.get("ready")]
    starting = [r for r in replicas if not r.routing_stats.get("ready")]
    return [sample(group, min(2, len(group))) for group in (ready, starting) if group]


class ReadyFirstRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return rank_ready_first(candidate_replicas)
