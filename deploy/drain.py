"""Drain: what a replica does once Serve has begun to stop it (serve shutdown, a redeploy, a
scale-down).

At once: new requests get a 503 with Retry-After (code "replica_draining"), and so do requests
still waiting in the engine, which would otherwise wait on a replica that is going away; the
requests it has started run on. When the grace period (graceful_shutdown_timeout_s) is nearly
spent, those still running are ended the same way, a 503 or, in a stream, an error event, so
that no client gets a connection cut by Serve's kill.

Serve tells the user's code nothing until its drain is over (the destructor runs last), and
its routers stop sending to a stopping replica only once they hear of it. So the replica reads,
every POLL_S, the flag Serve's replica actor sets as its graceful shutdown begins: private to
Serve, reached through Ray's table of this process's actors, since no public call says it.
(Serve's controller is no substitute: a deleted application's replicas vanish from its
details at once, while they still drain.) tests/ray/test_drain.py covers both a delete and a
redeploy on the Ray version installed.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

POLL_S = 0.2
# Running requests are ended this long (plus one poll, by which the stop may have been seen
# late) before Serve's kill, so that their 503s and error events reach the clients first.
CUT_MARGIN_S = 2.0

Stopping = Callable[[], str | None]  # why the replica is being stopped, or None


class Drainable(Protocol):
    def drain(self, why: str) -> int: ...

    def cut(self) -> int: ...


async def watch(target: Drainable, stopping: Stopping, grace_s: float, poll_s: float = POLL_S) -> None:
    """Poll `stopping` until it names a reason, then drain `target` at once and cut what still
    runs CUT_MARGIN_S + poll_s before `grace_s` is spent."""
    while (why := stopping()) is None:
        await asyncio.sleep(poll_s)
    ended = target.drain(why)
    cut_after_s = max(0.0, grace_s - poll_s - CUT_MARGIN_S)
    log.info("draining (%s): new requests get 503, %d not yet started were ended; running ones may go on for %.1f s",
             why, ended, cut_after_s)
    await asyncio.sleep(cut_after_s)
    log.warning("drain: the grace period is spent; %d requests still running were ended with a 503", target.cut())


def serve_stopping() -> tuple[Stopping, float]:
    """For the replica this runs in: a probe of whether Serve is stopping it, and its grace
    period in seconds (graceful_shutdown_timeout_s, as deployed). The probe reads the flag
    Serve's replica sets as its graceful shutdown begins; a Ray whose replica keeps it elsewhere
    gets a probe that never fires, and a warning (Serve's own drain still lets started requests
    finish)."""
    import ray
    from ray import serve
    from ray._private.worker import global_worker

    ctx = serve.get_replica_context()
    grace_s = ctx._deployment_config.graceful_shutdown_timeout_s  # Serve's config as deployed
    replica = global_worker.actors.get(ray.ActorID.from_hex(ray.get_runtime_context().get_actor_id()))
    impl = getattr(replica, "_replica_impl", None)
    if not isinstance(getattr(impl, "_shutting_down", None), bool):
        log.warning("this Ray's Serve replica keeps its shutdown flag where deploy/drain.py does not look: when "
                    "Serve stops this replica, requests it has not started will wait instead of getting a 503")
        return (lambda: None), grace_s

    def stopping() -> str | None:
        if not impl._shutting_down:
            return None
        return ("Serve is stopping it: a shutdown, a deleted application, a redeploy, a scale-down or a failed "
                "health check")

    return stopping, grace_s
