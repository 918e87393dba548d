"""LlamaDeployment: the Serve replica that owns one gang of rank actors and serves HTTP.

The replica sits in bundle 0 of its placement group; its ranks take bundles 1..N. It starts
its gang in the background (cluster/starting_group.py), so it answers at once: GET /health
names the start's stage until the gang is ready. The HTTP routes live in deploy/api.py and
only see the EngineClient interface (deploy/engine_client.py); the API-key check in front of
them is deploy/auth.py's.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util import get_current_placement_group

from cluster.config import GangConfig
from cluster.starting_group import StartingGroup
from deploy.api import build_api
from deploy.auth import ApiKeySource, require_api_keys
from deploy.choice_streams import ChoiceStreams
from deploy.drain import serve_stopping, watch
from llama.engine.request import GenerationRequest, StreamDelta

log = logging.getLogger(__name__)


# A failed gang is replaced, never repaired: the health check (a ping to every rank, cheap) runs
# every 2 s so Serve notices soon, and a replica whose gang failed has nothing left to drain.
# Drain (deploy/drain.py): a replica that Serve stops (serve shutdown, a redeploy, a scale-down)
# answers new and not yet started requests 503 and lets its started ones run on for up to
# graceful_shutdown_timeout_s, ending what still runs just before Serve's kill; Serve checks
# every 0.5 s whether they are done.
# Requests go to replicas whose gang is ready first (deploy/routing.py), as each replica
# reports every 2 s. deploy/config.yaml's `deployments:` section may override any of these.
OPTIONS = dict(max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=30,
               graceful_shutdown_timeout_s=60, graceful_shutdown_wait_loop_s=0.5,
               request_router_config=RequestRouterConfig(request_router_class="deploy.routing:ReadyFirstRouter",
                                                         request_routing_stats_period_s=2))


class GangServer:
    """A replica and its gang: everything LlamaDeployment is but its HTTP app."""

    def __init__(self, gang: GangConfig, model_id: str, api_keys: ApiKeySource = ApiKeySource()):
        # First: a key variable missing from this node's environment fails the replica before
        # it reserves a gang. Read here, in the replica's own process, and only here.
        self.api_keys = api_keys.load()
        self.gang = gang
        self.model_id = model_id
        pg = get_current_placement_group()
        if pg is None:
            log.warning("replica has no placement group; reserving one for the ranks alone")
        # Requests that come while the gang starts wait for it as long as a request may run.
        self.group = StartingGroup(gang, pg, 0 if pg is None else 1, wait_s=gang.engine.request_timeout_s)
        self.tokenizer = gang.checkpoint.tokenizer()
        self._pool: dict | None = None  # the KV pool's size, for the router, once the gang is up
        stopping, grace_s = serve_stopping()  # Serve says nothing of a stop until the drain is over
        self.drain_watch = asyncio.get_running_loop().create_task(watch(self.group, stopping, grace_s))

    async def check_health(self) -> None:
        await self.group.check_alive()

    async def record_routing_stats(self) -> dict:
        """What the routers read (deploy/routing.py): ready, and the KV pool's size once known."""
        if self.group.ready and self._pool is None:
            engine = (await self.group.cluster_info())["engine"]
            self._pool = {"kv_blocks": engine["kv_blocks"], "block_size": engine["block_size"]}
        return {"ready": self.group.ready, **(self._pool or {})}

    # ---- called by LlamaIngress (deploy/ingress.py) through a handle, with prefix routing

    async def run(self, requests: list[GenerationRequest]) -> AsyncIterator[list[tuple[int, StreamDelta]]]:
        """One HTTP request's choices on this replica's gang, admitted all at once here: their
        deltas as (choice index, delta), as they come. Raises before the first for a request
        refused (ValueError, OverloadedError, DrainingError, a ClusterError); the caller
        closing the stream cancels what still runs."""
        streams = await ChoiceStreams.open(self.group, requests)
        try:
            async for i, d in streams.deltas(raw=True):
                yield [(i, d)]
        finally:
            await streams.aclose()

    async def cluster_info(self) -> dict:
        return await self.group.cluster_info()

    async def check_ready(self) -> None:
        """Raise unless ready to serve: GangStartingError (with its progress) while starting."""
        await self.group.check_health()

    def __del__(self) -> None:
        drain_watch = getattr(self, "drain_watch", None)
        if drain_watch is not None and not drain_watch.get_loop().is_closed():
            drain_watch.get_loop().call_soon_threadsafe(drain_watch.cancel)
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()


@serve.deployment(**OPTIONS)
@serve.ingress()
class LlamaDeployment(GangServer):
    def __serve_build_asgi_app__(self):
        app = build_api(self.group, self.tokenizer, self.model_id, self.gang.engine.max_seq_len)
        require_api_keys(app, self.api_keys)
        return app


# The same replica without an HTTP app of its own, behind LlamaIngress (deploy/ingress.py; Serve
# allows one FastAPI deployment per application). Named as the other, so that deploy/config.yaml's
# `deployments:` options (num_replicas) apply to the gangs either way.
LlamaGangs = serve.deployment(name="LlamaDeployment", **OPTIONS)(GangServer)
