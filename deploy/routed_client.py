"""RoutedClient: the EngineClient of LlamaIngress (deploy/ingress.py), reaching the gangs'
replicas through a Serve handle whose router sees each prompt (deploy/routing.py).

All the choices of one HTTP request go in one call (LlamaDeployment.run), so they land on one
replica, are admitted there all at once or refused (OverloadedError, a 429) before any starts,
and share the prompt's blocks. The call's deltas are dealt out to one stream per choice, which
deploy/choice_streams.py reads as it reads a local gang's. Closing every choice's stream
cancels the call, which cancels what still runs. An error raised on the replica reaches the
HTTP layer as itself, not wrapped in Ray's RayTaskError, so it maps to the same status.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray.exceptions import RayTaskError

from llama.engine.request import GenerationRequest, StreamDelta


def unwrapped(e: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's wrapper."""
    while isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause
    return e


class RoutedCall:
    """One HTTP request's choices, sent as one handle call once the last of them is added."""

    def __init__(self, handle, n: int) -> None:
        self._handle, self.n = handle, n
        self._requests: list[GenerationRequest] = []
        self._queues: list[asyncio.Queue] = []
        self._pump: asyncio.Task | None = None
        self._open = 0  # choice streams not yet finished or closed

    def release(self) -> None:
        """Admission's interface: the places are held on the replica, for the call's life."""

    def add(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        i = len(self._requests)
        self._requests.append(request)
        self._queues.append(asyncio.Queue())
        self._open += 1
        if len(self._requests) == self.n:
            self._pump = asyncio.ensure_future(self._run())
        return self._choice(i)

    async def _run(self) -> None:
        response = self._handle.options(stream=True).run.remote(self._requests)
        try:
            async for batch in response:
                for i, delta in batch:
                    self._queues[i].put_nowait(delta)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BaseException as e:  # noqa: BLE001 - every choice is told
            error = unwrapped(e)
            for q in self._queues:
                q.put_nowait(error)

    async def _choice(self, i: int) -> AsyncIterator[StreamDelta]:
        try:
            while True:
                item = await self._queues[i].get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._open -= 1
            if self._open == 0 and self._pump is not None and not self._pump.done():
                self._pump.cancel()  # every choice finished or left: nothing more to wait for


class RoutedClient:
    def __init__(self, handle) -> None:
        self._handle = handle

    async def admit(self, n: int) -> RoutedCall:
        return RoutedCall(self._handle, n)

    def stream(self, request: GenerationRequest, admission: RoutedCall | None = None) -> AsyncIterator[StreamDelta]:
        call = admission if admission is not None else RoutedCall(self._handle, 1)
        return call.add(request)

    async def cluster_info(self) -> dict:
        """One replica's gang, the one the router picked."""
        return await self._call("cluster_info")

    async def check_health(self) -> None:
        await self._call("check_ready")

    async def _call(self, method: str):
        try:
            return await getattr(self._handle, method).remote()
        except BaseException as e:
            raise unwrapped(e) from None
