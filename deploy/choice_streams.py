"""ChoiceStreams: the engine side of one HTTP request, one engine stream per choice.

It opens the streams, merges their deltas as they arrive (a stream sends them on, a whole
response collects them), turns a choice the engine ended unfinished into the request's error,
and closes every stream however the request ends, which cancels what is still running.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from cluster.admission import Admission
from deploy.engine_client import EngineClient
from deploy.errors import unfinished_error
from llama.engine.request import GenerationRequest, StreamDelta

logger = logging.getLogger(__name__)


class ChoiceStreams:
    """The engine streams of one HTTP request, one per choice, each already past its first delta."""

    def __init__(self, streams: list[AsyncIterator[StreamDelta]], firsts: list[StreamDelta],
                 admission: Admission | None = None) -> None:
        self._streams = streams
        self._firsts = firsts
        self._admission = admission  # the replica's places the choices hold until aclose
        self._pending: dict[asyncio.Task[StreamDelta], int] = {}  # next-delta pull -> choice index

    def __len__(self) -> int:
        return len(self._streams)

    @classmethod
    async def open(cls, engine: EngineClient, requests: list[GenerationRequest]) -> ChoiceStreams:
        """Start every choice and wait for each one's first delta, concurrently. Whatever fails here
        (a ValueError for a request the engine cannot serve, a ClusterError) closes all the
        streams and is raised before the response starts. The choices are admitted all at once,
        or the request is refused (OverloadedError) before any starts."""
        admission = await engine.admit(len(requests))
        streams: list[AsyncIterator[StreamDelta]] = []
        tasks: list[asyncio.Task[StreamDelta]] = []
        try:
            for r in requests:
                streams.append(engine.stream(r, admission))
            tasks = [asyncio.ensure_future(_next(s)) for s in streams]
            firsts = await asyncio.gather(*tasks)
        except BaseException:
            await _cancel(tasks)
            await _close(streams)
            admission.release()
            raise
        return cls(streams, list(firsts), admission)

    @classmethod
    def finished(cls, deltas: list[StreamDelta]) -> ChoiceStreams:
        """Choices answered without the engine: each delta is its choice's only, final one."""
        assert all(d.finish_reason is not None for d in deltas)
        return cls([_nothing() for _ in deltas], deltas)

    async def deltas(self, raw: bool = False) -> AsyncGenerator[tuple[int, StreamDelta], None]:
        """(choice index, delta): the first deltas in choice order, then the others as they
        arrive. Each stream's next delta is pulled while the previous one is being sent. A delta
        that ends its choice unfinished ("timeout", "abort") raises the request's APIError: one
        unfinished choice fails the whole request. raw: pass such deltas on as they are (a gang's
        replica serving an ingress, whose own ChoiceStreams decides)."""
        for i, d in enumerate(self._firsts):
            yield i, self._received(i, d, raw)
        while self._pending:
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=self._pending.__getitem__):
                i = self._pending.pop(task)
                d = task.result()  # the engine's error, if it failed mid-stream
                yield i, self._received(i, d, raw)

    async def collect(self) -> list[list[StreamDelta]]:
        """Every choice's deltas, in order, once all have finished (for a whole response). The
        streams are closed however this ends."""
        out: list[list[StreamDelta]] = [[] for _ in self._streams]
        try:
            async with aclosing(self.deltas()) as deltas:
                async for i, d in deltas:
                    out[i].append(d)
        finally:
            await self.aclose()
        return out

    async def aclose(self) -> None:
        """Cancel the pulls in flight and close every stream: the engine cancels the requests that
        have not finished. Safe to call more than once."""
        tasks = list(self._pending)
        self._pending.clear()
        try:
            await _cancel(tasks)
            await _close(self._streams)
        finally:
            if self._admission is not None:
                self._admission.release()

    def _received(self, i: int, delta: StreamDelta, raw: bool = False) -> StreamDelta:
        """Check a choice's delta and, unless it was its last, start pulling the next one."""
        if delta.finish_reason in ("timeout", "abort") and not raw:
            raise unfinished_error(delta.finish_reason)
        if delta.finish_reason is None:
            self._pending[asyncio.ensure_future(_next(self._streams[i]))] = i
        return delta


async def _next(stream: AsyncIterator[StreamDelta]) -> StreamDelta:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise RuntimeError("an engine stream ended without a delta that has a finish_reason") from None


async def _nothing() -> AsyncIterator[StreamDelta]:
    return
    yield  # an async generator that yields nothing


async def _cancel(tasks: list[asyncio.Task[StreamDelta]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # waits until each stream has seen it


async def _close(streams: list[AsyncIterator[StreamDelta]]) -> None:
    closes = [s.aclose() for s in streams if hasattr(s, "aclose")]
    for result in await asyncio.gather(*closes, return_exceptions=True):
        if isinstance(result, Exception):
            logger.warning("closing an engine stream failed: %s: %s", type(result).__name__, result)
