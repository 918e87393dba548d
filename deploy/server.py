"""LlamaDeployment: the Serve replica that owns one gang of rank actors and serves HTTP.

The replica sits in bundle 0 of its placement group; its ranks take bundles 1..N. The HTTP
routes live in deploy/api.py and only see the EngineClient interface (deploy/engine_client.py),
which the RankGroup provides.
"""
from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.util import get_current_placement_group

from cluster.config import GangConfig
from cluster.group import RankGroup
from deploy.api import build_api

log = logging.getLogger(__name__)


# A failed gang is replaced, never repaired: the health check (a ping to every rank, cheap) runs
# every 2 s so Serve notices soon, and a replica whose gang failed has nothing left to drain.
# deploy/config.yaml's `deployments:` section may override these, as any Serve option.
@serve.deployment(max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
@serve.ingress()
class LlamaDeployment:
    async def __init__(self, gang: GangConfig, model_id: str):
        self.gang = gang
        self.model_id = model_id
        pg = get_current_placement_group()
        # Started off the event loop: loading can take minutes on a big model.
        if pg is None:
            log.warning("replica has no placement group; reserving one for the ranks alone")
            self.group = await asyncio.to_thread(RankGroup.start, gang)
        else:
            self.group = await asyncio.to_thread(RankGroup.start, gang, pg, 1)
        self.tokenizer = gang.checkpoint.tokenizer()

    def __serve_build_asgi_app__(self):
        return build_api(self.group, self.tokenizer, self.model_id, self.gang.engine.max_seq_len)

    async def check_health(self) -> None:
        await self.group.check_health()

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()
