"""deploy/drain.py's watch without Serve: a probe standing in for Serve's controller, a target
standing in for the gang. The drain starts when the probe says so, once, and what still runs is
cut before the grace period is spent."""
from __future__ import annotations

import asyncio
import time

from deploy.drain import CUT_MARGIN_S, watch


class Target:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def drain(self, why: str) -> int:
        self.calls.append((f"drain: {why}", time.monotonic()))
        return 2

    def cut(self) -> int:
        self.calls.append(("cut", time.monotonic()))
        return 1


def test_the_drain_starts_when_serve_says_stopping_and_cuts_before_the_grace_is_spent() -> None:
    answers = [None, None, None, "application 'llama' is being deleted"]
    asked: list[float] = []

    def stopping() -> str | None:
        asked.append(time.monotonic())
        return answers[len(asked) - 1]

    target = Target()
    poll_s, grace_s = 0.02, CUT_MARGIN_S + 0.02 + 0.3
    asyncio.run(asyncio.wait_for(watch(target, stopping, grace_s, poll_s), timeout=10))
    assert len(asked) == 4  # asked until it said stopping, then no more
    (drain, drained_at), (cut, cut_at) = target.calls
    assert drain == "drain: application 'llama' is being deleted" and cut == "cut"
    assert drained_at >= asked[-1]
    # Cut one poll and the margin before the grace period would end, counted from the drain.
    assert 0.3 <= cut_at - drained_at < grace_s


def test_no_drain_while_the_probe_does_not_say_stopping() -> None:
    def stopping() -> str | None:
        return None

    async def scenario() -> Target:
        target = Target()
        task = asyncio.ensure_future(watch(target, stopping, 60.0, 0.01))
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        return target

    assert asyncio.run(scenario()).calls == []
