"""Outbox: on the driver, the deltas of every request one caller submitted, sent in batches.

The engine's thread makes a delta for each running request every step. Sent one Ray stream per
request, each delta woke the driver's event loop and cost a streamed Ray message and its wake-up
on the replica: 16 of each a step at 16 requests, all taking the GIL and CPU from the step's
threads (bench/peer.py's through-Serve figures against the engine's in one process). An outbox
gathers them instead: the engine thread appends (request id, delta) under a lock, and once the
step's deltas are all out (the engine's `flush`, after each step) wakes the loop once; the
driver's `deltas` stream sends what has gathered as one message (cluster/rank.py), which the
caller's DeltaReader (cluster/deltas.py) hands to each request. Woken at the first delta instead,
the loop took the GIL mid-step and sent a step's deltas in two or more messages.
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
        self._lock = threading.Lock()  # guards _items, _flushed and _woken, shared with the engine thread
        self._items: Batch = []
        self._flushed = 0  # how many of _items the engine has flushed: only those are sent
        self._woken = False  # a wake-up is on its way for them
        self._ready = asyncio.Event()
        self.live: set[str] = set()  # requests not ended yet (event loop only)
        self.closed = False

    def sink(self, request_id: str) -> Callable[[Item], None]:
        """The engine's sink for one request (call on the event loop, before submitting it)."""
        self.live.add(request_id)

        def put(item: Item) -> None:  # the engine thread; sent once flushed
            with self._lock:
                self._items.append((request_id, item))

        return put

    def flush(self) -> None:
        """The engine thread's step is done: what it put is to be sent, with one wake-up."""
        with self._lock:
            wake = len(self._items) > self._flushed and not self._woken
            self._flushed = len(self._items)
            self._woken = self._woken or wake
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    def forget(self, request_id: str) -> None:
        """A request the engine refused: it will send nothing."""
        self.live.discard(request_id)

    async def take(self) -> Batch | None:
        """Every item flushed since the last take, waiting for one; once closed, what is left
        and then None."""
        while True:
            with self._lock:
                n = len(self._items) if self.closed else self._flushed
                items, self._items = self._items[:n], self._items[n:]
                self._flushed, self._woken = 0, False
            if items:
                for request_id, item in items:
                    if isinstance(item, BaseException) or item.finish_reason is not None:
                        self.live.discard(request_id)
                return items
            if self.closed:
                return None
            self._ready.clear()
            with self._lock:
                if self._flushed:  # flushed between the swap and the clear: its wake-up may be spent
                    continue
            await self._ready.wait()

    def close(self) -> None:
        """End `take` (event loop only); what is still live is the caller's to abort."""
        self.closed = True
        self._ready.set()
