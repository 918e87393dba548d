"""Drain: what a replica does once Serve has begun to stop it (serve shutdown, a redeploy, a
scale-down).

At once: new requests get a 503 with Retry-After (code "replica_draining"), and so do requests
still waiting in the engine, which would otherwise wait on a replica that is going away; the
requests it has started run on. When the grace period (graceful_shutdown_timeout_s) is nearly
spent, those still running are ended the same way, a 503 or, in a stream, an error event, so
that no client gets a connection cut by Serve's kill.

Serve tells a replica nothing until its drain is over (the destructor runs last), and its
routers stop sending to a stopping replica only once they hear of it; so the replica asks
Serve's controller, every POLL_S, whether it is STOPPING. It reads what `serve status` and the
dashboard read (get_serve_instance_details), through Serve's private controller handle: Serve
offers no public call for one replica's state. tests/ray/test_drain.py covers it on the Ray
version we pin.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

POLL_S = 1.0
# Running requests are ended this long (plus one poll, by which the stop may have been seen
# late) before Serve's kill, so that their 503s and error events reach the clients first.
CUT_MARGIN_S = 2.0

Stopping = Callable[[], Awaitable[str | None]]  # why the replica is being stopped, or None


class Drainable(Protocol):
    def drain(self, why: str) -> int: ...

    def cut(self) -> int: ...


async def watch(target: Drainable, stopping: Stopping, grace_s: float, poll_s: float = POLL_S) -> None:
    """Poll `stopping` until it names a reason, then drain `target` at once and cut what still
    runs CUT_MARGIN_S + poll_s before `grace_s` is spent. A failing poll (the controller
    restarting) is not a stop: only the controller's word starts a drain."""
    while True:
        try:
            why = await stopping()
        except Exception as e:  # noqa: BLE001 - asked again at the next poll
            log.debug("could not ask Serve's controller whether this replica is stopping: %r", e)
            why = None
        if why is not None:
            break
        await asyncio.sleep(poll_s)
    ended = target.drain(why)
    cut_after_s = max(0.0, grace_s - poll_s - CUT_MARGIN_S)
    log.info("draining (%s): new requests get 503, %d not yet started were ended; running ones may go on for %.1f s",
             why, ended, cut_after_s)
    await asyncio.sleep(cut_after_s)
    log.warning("drain: the grace period is spent; %d requests still running were ended with a 503", target.cut())


def serve_stopping() -> tuple[Stopping, float]:
    """For the replica this runs in: a probe of whether Serve is stopping it, and its grace
    period in seconds (graceful_shutdown_timeout_s, as deployed)."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    ctx = serve.get_replica_context()
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)

    async def stopping() -> str | None:
        details = await controller.get_serve_instance_details.remote()
        app = (details.get("applications") or {}).get(ctx.app_name)
        if app is None:
            return None  # not listed is not proof: the controller may be recovering
        if app.get("status") == "DELETING":
            return f"application {ctx.app_name!r} is being deleted"
        deployment = (app.get("deployments") or {}).get(ctx.deployment) or {}
        for replica in deployment.get("replicas") or []:
            if replica.get("replica_id") == ctx.replica_tag and replica.get("state") == "STOPPING":
                return "Serve is stopping this replica: a redeploy, a scale-down or a failed health check"
        return None

    return stopping, ctx._deployment_config.graceful_shutdown_timeout_s  # Serve's config as deployed
