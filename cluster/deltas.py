"""DeltaReader: a RankGroup's end of the driver's delta stream, on one event loop.

One streaming Ray call to the driver (RankActor.deltas) carries the deltas of every request this
loop submits, a batch per message (cluster/outbox.py); the reader hands each to its request's
queue. A request opens its queue before it is submitted and closes it when it ends; deltas for
a request no longer open (aborted, its caller gone) are dropped.

The stream belongs to no request: it runs in a context of its own, so that Serve cancelling a
request (and its Ray calls, when its client goes away) cannot reach it; were it cancelled all
the same, it reads on from where it was. If the stream fails (the driver died), every open
request gets the error, and the next request opens a new stream (which fails the same way until
the gang is replaced).
"""
from __future__ import annotations

import asyncio
import contextvars
import uuid

import ray

from cluster.outbox import Item


class DeltaReader:
    def __init__(self, driver):
        self.driver = driver
        self.id = uuid.uuid4().hex
        self.loop = asyncio.get_running_loop()
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._task = self.loop.create_task(self._read(), context=contextvars.Context())

    def usable(self) -> bool:
        """Whether requests on the running loop may use this reader."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return loop is self.loop and not self._task.done()

    def open(self, request_id: str) -> asyncio.Queue[Item]:
        """The queue request_id's deltas will arrive in (before it is submitted)."""
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _read(self) -> None:
        error: BaseException | None = RuntimeError("the driver ended its stream of deltas")
        try:
            while True:
                try:
                    async for ref in self.driver.deltas.remote(self.id):
                        for request_id, item in await ref:
                            queue = self._queues.get(request_id)
                            if queue is not None:
                                queue.put_nowait(item)
                    break
                except ray.exceptions.TaskCancelledError:
                    continue  # not by us (we close the stream, never cancel it): read on
        except asyncio.CancelledError:  # the loop is closing (asyncio.run's end): its requests are cancelled too
            error = None
            raise
        except Exception as e:  # noqa: BLE001 - the driver died or its stream failed: every request is told
            error = e
        finally:
            for queue in self._queues.values() if error is not None else ():
                queue.put_nowait(error)
            self._queues.clear()
            if not isinstance(error, ray.exceptions.RayActorError):
                self.driver.close_stream.remote(self.id)  # aborts what still runs under this id
