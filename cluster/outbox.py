"""Outbox: on the driver, the deltas of every request one caller submitted, sent in batches.

The engine's thread makes a delta for each running request every step. Sent one Ray stream per
request, each delta woke the driver's event loop and cost a streamed Ray message and its wake-up
on the replica: 16 of each a step at 16 requests, all taking the GIL and CPU from the step's
threads (bench/peer.py's through-Serve figures against the engine's in one process). An outbox
gathers them instead: the engine thread appends (request id, delta) under a lock and wakes the
loop once per batch; the driver's `deltas` stream sends what has gathered as one message
(cluster/rank.py), which the caller's DeltaReader (cluster/deltas.py) hands to each request.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from llama.engine.request import StreamDelta

Item = StreamDelta | BaseException  # a delta, or the error that ended the request
Batch = list[tuple[str, Item]]


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()  # guards _items, shared with the engine thread
        self._items: Batch = []
        self._ready = asyncio.Event()
        self.live: set[str] = set()  # requests not ended yet (event loop only)
        self.closed = False

    def sink(self, request_id: str) -> Callable[[Item], None]:
        """The engine's sink for one request (call on the event loop, before submitting it)."""
        self.live.add(request_id)

        def put(item: Item) -> None:  # the engine thread
            with self._lock:
                first = not self._items
                self._items.append((request_id, item))
            if first:  # the loop has not been woken for this batch yet
                self._loop.call_soon_threadsafe(self._ready.set)

        return put

    def forget(self, request_id: str) -> None:
        """A request the engine refused: it will send nothing."""
        self.live.discard(request_id)

    async def take(self) -> Batch | None:
        """Every item gathered since the last take, waiting for one; None once closed."""
        while True:
            with self._lock:
                items, self._items = self._items, []
            if items:
                for request_id, item in items:
                    if isinstance(item, BaseException) or item.finish_reason is not None:
                        self.live.discard(request_id)
                return items
            if self.closed:
                return None
            self._ready.clear()
            with self._lock:
                if self._items:  # appended between the swap and the clear: its wake-up may be spent
                    continue
            await self._ready.wait()

    def close(self) -> None:
        """End `take` (event loop only); what is still live is the caller's to abort."""
        self.closed = True
        self._ready.set()
