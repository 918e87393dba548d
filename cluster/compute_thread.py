"""ComputeThread: the one thread on which a rank process does all its torch work (joining the
group, loading, the engine's loop), so OpenMP keeps a single pool of worker threads.

OpenMP gives every host thread that opens a parallel region a worker pool of its own. A second
pool on the same cores (the load on an executor thread, then the loop on another) made the
peer benchmark's step at two threads run 1.3-1.8x slower (`bench/step_profile.py
--split-threads`: 23.6 against 18.2 ms a step at concurrency 1; 30.3 against 16.4 in another
run); libgomp's workers of the busy pool then sleep between regions instead of spinning.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any


class ComputeThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon: a hung collective must not keep the process from exiting.
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run fn(*args) after the jobs before it; its result or exception in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller's to see
                future.set_exception(e)
