"""StartingGroup (cluster/starting_group.py) without Ray: RankGroup.start replaced by a fake that
walks the stages when the test says. While it starts: health says the stage, requests wait (or
are told to come back), Serve's liveness check passes on time and fails past a deadline; once
ready, everything goes to the gang; a failed start is a ClusterError everywhere."""
from __future__ import annotations

import asyncio
import threading

import pytest

import cluster.starting_group as sg
from cluster.errors import DrainingError, GangStartError, GangStartingError, RankFailedError
from cluster.start import STAGES
from llama.engine.request import GenerationRequest, SamplingParams, StreamDelta
from tests.conftest import gang_config


class FakeGroup:
    def __init__(self):
        self.shut = False
        self.draining = None

    def drain(self, why):
        self.draining = why
        return 0

    def admit(self, n):
        return n

    async def stream(self, request, admission=None):
        yield StreamDelta(token_ids=(7,), text="x", finish_reason="length")

    async def check_health(self):
        pass

    async def cluster_info(self):
        return {"healthy": True, "world_size": 2}

    def shutdown(self):
        self.shut = True


class Script:
    """RankGroup.start's stand-in: goes to stage `upto` when told, then finishes or fails."""

    def __init__(self):
        self.go = threading.Semaphore(0)
        self.fail: BaseException | None = None
        self.group = FakeGroup()

    def start(self, config, placement, first_bundle, progress):
        for stage in STAGES:
            self.go.acquire()
            progress.enter(stage)
        self.go.acquire()
        if self.fail is not None:
            progress.fail(self.fail)
            raise self.fail
        progress.done()
        return self.group

    def advance(self, starting, n: int, stage: str | None) -> None:
        for _ in range(n):
            self.go.release()
        for _ in range(200):
            if (starting.ready if stage is None else starting.progress.as_dict()["stage"] == stage
                                                            or starting.progress.error is not None):
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"the fake start did not reach {stage}")


@pytest.fixture
def script(monkeypatch) -> Script:
    s = Script()
    monkeypatch.setattr(sg.RankGroup, "start", s.start)
    return s


@pytest.fixture
def config(tiny_ckpts):
    return gang_config(tiny_ckpts["mha1"], 1, device="cpu", rendezvous_timeout_s=30)


REQUEST = GenerationRequest((1, 2), SamplingParams(max_tokens=1, temperature=0))


async def collect(starting):
    return [d async for d in starting.stream(REQUEST)]


def test_while_starting_health_names_the_stage_and_liveness_passes(script, config):
    starting = sg.StartingGroup(config, wait_s=0.05, poll_s=0.01)
    script.advance(starting, 3, "rendezvous")
    with pytest.raises(GangStartingError) as e:
        asyncio.run(starting.check_health())
    assert e.value.progress["stage"] == "rendezvous" and not starting.ready
    asyncio.run(starting.check_alive())  # on time: Serve keeps the replica
    info = asyncio.run(starting.cluster_info())
    assert (info["ready"], info["healthy"], info["start"]["stage"]) == (False, False, "rendezvous")
    with pytest.raises(GangStartingError, match="still starting: stage rendezvous"):  # waited wait_s, no more
        asyncio.run(collect(starting))
    script.advance(starting, 4, None)


def test_a_request_that_comes_while_starting_waits_for_the_gang(script, config):
    starting = sg.StartingGroup(config, wait_s=10, poll_s=0.01)

    async def scenario():
        waiting = asyncio.ensure_future(collect(starting))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await asyncio.to_thread(script.advance, starting, len(STAGES) + 1, None)
        return await waiting

    deltas = asyncio.run(scenario())
    assert [d.token_ids for d in deltas] == [(7,)]
    asyncio.run(starting.check_health())
    asyncio.run(starting.check_alive())
    assert asyncio.run(starting.cluster_info()) == {"healthy": True, "world_size": 2, "ready": True}
    starting.shutdown()
    assert script.group.shut


def test_a_stage_past_its_deadline_fails_liveness_so_serve_replaces_the_replica(script, config, monkeypatch):
    starting = sg.StartingGroup(config, wait_s=0.05, poll_s=0.01)
    script.advance(starting, 3, "rendezvous")
    monkeypatch.setattr(starting.progress, "left_s", lambda: -1.0)
    with pytest.raises(GangStartError, match="'rendezvous'.*30s deadline"):
        asyncio.run(starting.check_alive())
    script.advance(starting, 4, None)


def test_a_failed_start_is_a_cluster_error_for_requests_health_and_liveness(script, config):
    starting = sg.StartingGroup(config, wait_s=5, poll_s=0.01)
    script.fail = RuntimeError("rank 1 died while loading")
    script.advance(starting, len(STAGES) + 1, "ready")
    with pytest.raises(RankFailedError, match="failed to start.*rank 1 died while loading.*will be replaced"):
        asyncio.run(collect(starting))
    with pytest.raises(RankFailedError):
        asyncio.run(starting.check_health())
    with pytest.raises(RuntimeError, match="rank 1 died"):
        asyncio.run(starting.check_alive())
    assert asyncio.run(starting.cluster_info())["start"]["error"] == "RuntimeError: rank 1 died while loading"


def test_a_drain_while_starting_refuses_the_waiting_requests_and_reaches_the_gang_once_ready(script, config):
    starting = sg.StartingGroup(config, wait_s=10, poll_s=0.01)

    async def scenario():
        waiting = asyncio.ensure_future(collect(starting))
        await asyncio.sleep(0.05)
        assert starting.drain("application 'llama' is being deleted") == 0
        with pytest.raises(DrainingError, match="shutting down .application 'llama' is being deleted. before its "
                                                "model started; retry"):
            await waiting
        with pytest.raises(DrainingError):
            await starting.admit(1)
        await asyncio.to_thread(script.advance, starting, len(STAGES) + 1, None)
        await starting.admit(1)  # ready now: the gang itself is told, and refuses from then on

    asyncio.run(scenario())
    assert script.group.draining == "application 'llama' is being deleted"
    starting.shutdown()
