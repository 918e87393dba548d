"""RoutedClient (deploy/routed_client.py), LlamaIngress's engine, over a fake Serve handle: the
choices of one request go in one call and come back each to its own stream; an error raised on
the replica reaches the caller as itself, out of Ray's wrapper; closing every stream cancels the
call."""
from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import RayTaskError

from cluster.errors import OverloadedError
from deploy.choice_streams import ChoiceStreams
from deploy.routed_client import RoutedClient, unwrapped
from llama.engine.request import GenerationRequest, SamplingParams, StreamDelta


class FakeResponse:
    def __init__(self, items, error: BaseException | None, hold: asyncio.Event | None):
        self.items, self.error, self.hold, self.cancelled = items, error, hold, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for item in self.items:
            await asyncio.sleep(0)
            yield item
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """What RoutedClient uses of a DeploymentHandle to LlamaDeployment."""

    def __init__(self, items=(), error=None, hold=None, info=None):
        self.calls: list[list[GenerationRequest]] = []
        self.responses: list[FakeResponse] = []
        self._items, self._error, self._hold, self._info = list(items), error, hold, info
        self.run = self.cluster_info = self.check_ready = self

    def options(self, stream: bool):
        assert stream
        return self

    def remote(self, requests=None):
        if requests is None:  # cluster_info / check_ready
            async def answer():
                if isinstance(self._info, BaseException):
                    raise self._info
                return self._info
            return answer()
        self.calls.append(requests)
        self.responses.append(FakeResponse(self._items, self._error, self._hold))
        return self.responses[-1]


def delta(text: str, finish=None) -> StreamDelta:
    return StreamDelta([5], text, finish_reason=finish)


def request(n: int = 3) -> GenerationRequest:
    return GenerationRequest((1, 2, 3), SamplingParams(max_tokens=n))


def wrapped(e: BaseException) -> RayTaskError:
    return RayTaskError("run", "traceback ...", e).as_instanceof_cause()


def test_the_choices_of_one_request_go_in_one_call_and_come_back_apart():
    handle = FakeHandle([[(1, delta("b"))], [(0, delta("a"))], [(0, delta("c", "length")), (1, delta("d", "stop"))]])

    async def scenario():
        streams = await ChoiceStreams.open(RoutedClient(handle), [request(), request()])
        return await streams.collect()

    out = asyncio.run(scenario())
    assert len(handle.calls) == 1 and len(handle.calls[0]) == 2
    assert [[d.text for d in choice] for choice in out] == [["a", "c"], ["b", "d"]]


def test_a_refusal_on_the_replica_is_raised_as_itself():
    handle = FakeHandle(error=wrapped(OverloadedError("this replica holds 72 requests")))

    async def scenario():
        await ChoiceStreams.open(RoutedClient(handle), [request()])

    with pytest.raises(OverloadedError, match="holds 72 requests") as e:
        asyncio.run(scenario())
    assert not isinstance(e.value, RayTaskError)
    assert isinstance(unwrapped(wrapped(ValueError("x"))), ValueError)


def test_closing_every_stream_cancels_the_call():
    hold = asyncio.Event()
    handle = FakeHandle([[(0, delta("a")), (1, delta("b"))]], hold=hold)

    async def scenario():
        streams = await ChoiceStreams.open(RoutedClient(handle), [request(), request()])
        await streams.aclose()  # the client left after the first tokens
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert handle.responses[0].cancelled


def test_health_and_cluster_come_from_a_replica_and_its_errors_unwrapped():
    client = RoutedClient(FakeHandle(info={"ready": True}))
    assert asyncio.run(client.cluster_info()) == {"ready": True}
    failing = RoutedClient(FakeHandle(info=wrapped(OverloadedError("busy"))))
    with pytest.raises(OverloadedError, match="busy"):
        asyncio.run(failing.check_health())
