"""RankGroup's aborts (cluster/group.py) without Ray: a fake driver whose submit call is answered
when the test says. The driver runs its control calls (abort) beside its submits, so an abort sent
while the submit is still on its way can reach the engine first, where it finds no such request
and is lost: the request then runs to its end for a client that has gone. So an abort waits until
the driver has the request, whoever sends it (the client leaving, a drain, a cut). And it is sent
from a context of its own: Ray cancels the calls a cancelled request made (its children, known by
a context variable), and would cancel the abort with them."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
from types import SimpleNamespace

from cluster.group import RankGroup
from llama.engine.request import GenerationRequest, SamplingParams, StreamDelta


# Stands for Ray's async_task_id: what makes a call the child of the request that made it.
PARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("parent", default=None)


class Ref:
    """An ObjectRef's stand-in: awaitable, and `future()` as Ray's."""

    def __init__(self):
        self.done = concurrent.futures.Future()

    def future(self) -> concurrent.futures.Future:
        return self.done

    def __await__(self):
        return asyncio.shield(asyncio.wrap_future(self.done)).__await__()


class Call:
    def __init__(self, fn):
        self.remote = fn


class Driver:
    def __init__(self):
        self.log: list[str] = []
        self.ref = Ref()
        self.submit = Call(self._submit)
        self.abort = Call(lambda rid: self.log.append("abort" if PARENT.get() is None else "abort as a child"))

    def _submit(self, stream_id, request_id, request) -> Ref:
        self.log.append("submit")
        return self.ref

    def answer(self) -> None:
        """The driver has queued the request: its submit call returns."""
        self.log.append("queued")
        self.ref.done.set_result(None)


class Reader:
    id = "stream"

    def __init__(self):
        self.queues: dict[str, asyncio.Queue] = {}

    def usable(self) -> bool:
        return True

    def open(self, request_id: str) -> asyncio.Queue:
        self.queues[request_id] = asyncio.Queue()
        return self.queues[request_id]

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    def deliver(self, delta: StreamDelta) -> None:
        """The driver's next delta for the one request open."""
        (queue,) = self.queues.values()
        queue.put_nowait(delta)


def group_with(driver: Driver) -> RankGroup:
    config = SimpleNamespace(engine=SimpleNamespace(max_batch_size=4, max_waiting=4))
    group = RankGroup(config, [driver], [], [], None, False, None)
    group._deltas = Reader()
    return group


REQUEST = GenerationRequest(prompt_tokens=(1, 2, 3), params=SamplingParams(max_tokens=8))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_client_leaving_before_the_driver_has_its_request_is_aborted_after_it_has():
    async def go():
        driver = Driver()
        group = group_with(driver)
        first = asyncio.ensure_future(anext(group._stream(REQUEST)))
        await settle()
        assert driver.log == ["submit"]
        first.cancel()  # the client leaves while the submit is on its way
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert driver.log == ["submit"], "an abort sent before the driver has the request is lost there"
        driver.answer()
        assert driver.log == ["submit", "queued", "abort"]
        assert not group._submitting and not group._live

    asyncio.run(go())


def test_a_drain_before_the_driver_has_the_request_aborts_it_after_it_has():
    async def go():
        driver = Driver()
        group = group_with(driver)
        stream = group._stream(REQUEST)
        first = asyncio.ensure_future(anext(stream))
        await settle()
        assert group.drain("scaling down") == 1
        assert driver.log == ["submit"]
        driver.answer()
        assert driver.log == ["submit", "queued", "abort"]
        group._deltas.deliver(StreamDelta(token_ids=[], text="", finish_reason="abort"))
        assert (await first).finish_reason == "abort"
        with contextlib.suppress(StopAsyncIteration):
            await anext(stream)
        assert driver.log == ["submit", "queued", "abort"], "a finished request is not aborted again"
        assert not group._submitting and not group._live

    asyncio.run(go())


def test_a_client_leaving_mid_stream_is_aborted_at_once_and_not_as_the_requests_child():
    async def go():
        driver = Driver()
        group = group_with(driver)
        arrived: list = []

        async def request() -> None:  # as Serve runs it: the request's calls are its children
            PARENT.set("request")
            async for delta in group._stream(REQUEST):
                arrived.append(delta)

        task = asyncio.ensure_future(request())
        await settle()
        driver.answer()
        group._deltas.deliver(StreamDelta(token_ids=[5], text="a"))
        await settle()
        assert [d.token_ids for d in arrived] == [[5]]
        task.cancel()  # the client leaves after its first token
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert driver.log == ["submit", "queued", "abort"]
        assert not group._submitting and not group._live

    asyncio.run(go())
