"""The driver's outbox (cluster/outbox.py): what the engine thread emits for many requests
leaves as few batches, in order, each request's items whole, a step's items in one batch; a
request ends with its last delta or its error; close ends the stream."""
from __future__ import annotations

import asyncio
import threading
import time

from cluster.outbox import Outbox
from llama.engine.request import StreamDelta


def _delta(i: int, last: bool = False) -> StreamDelta:
    return StreamDelta(token_ids=(i,), text=str(i), finish_reason="length" if last else None)


def _run(box: Outbox, sinks: dict, steps: int, wait: bool, pause: float = 0.0) -> threading.Thread:
    """The engine thread: one delta per request a step, each request's last ending it, and a
    flush after each step (as Engine.run does); `pause` between deltas, as detokenising takes."""
    def engine():
        for step in range(steps):
            for sink in sinks.values():
                sink(_delta(step, last=step == steps - 1))
                time.sleep(pause)
            box.flush()

    t = threading.Thread(target=engine)
    t.start()
    if wait:
        t.join()
    return t


def test_what_gathers_while_the_loop_is_busy_leaves_as_one_batch_in_order():
    async def go():
        box = Outbox(asyncio.get_running_loop())
        sinks = {f"r{k}": box.sink(f"r{k}") for k in range(4)}
        _run(box, sinks, 50, wait=True)  # the loop is blocked meanwhile, as while it sends the last batch
        return [await box.take()], box

    batches, box = asyncio.run(go())
    assert len(batches[0]) == 200
    assert [(rid, d.token_ids[0]) for rid, d in batches[0]] == [(f"r{k}", s) for s in range(50) for k in range(4)]
    assert not box.live


def test_deltas_taken_while_the_engine_emits_keep_each_requests_order():
    async def go():
        box = Outbox(asyncio.get_running_loop())
        t = _run(box, {f"r{k}": box.sink(f"r{k}") for k in range(4)}, 300, wait=False)
        batches = []
        while box.live:
            batches.append(await asyncio.wait_for(box.take(), 10))
        t.join()
        return batches

    got: dict[str, list[int]] = {}
    for batch in asyncio.run(go()):
        for rid, d in batch:
            got.setdefault(rid, []).append(d.token_ids[0])
    assert got == {f"r{k}": list(range(300)) for k in range(4)}


def test_an_error_ends_its_request_and_close_ends_the_stream():
    async def go():
        box = Outbox(asyncio.get_running_loop())
        a, b = box.sink("a"), box.sink("b")
        box.sink("refused")
        box.forget("refused")  # the engine refused it: nothing will come
        err = RuntimeError("the engine failed")
        threading.Thread(target=lambda: (a(_delta(1)), b(err), box.flush())).start()
        first = []
        while len(first) < 2:
            first += await box.take()
        live = set(box.live)
        box.close()
        return first, live, await box.take()

    first, live, after = asyncio.run(go())
    assert [rid for rid, _ in first] == ["a", "b"] and isinstance(first[1][1], RuntimeError)
    assert live == {"a"}  # b ended with its error; a runs on (the caller aborts it when it closes)
    assert after is None


def test_take_waits_for_a_delta_that_comes_later():
    async def go():
        loop = asyncio.get_running_loop()
        box = Outbox(loop)
        sink = box.sink("x")
        emit = lambda: (sink(_delta(7, last=True)), box.flush())  # noqa: E731
        loop.call_later(0.05, lambda: threading.Thread(target=emit).start())
        return await asyncio.wait_for(box.take(), 5)

    assert [(rid, d.token_ids) for rid, d in asyncio.run(go())] == [("x", (7,))]


def test_a_step_leaves_as_one_batch_though_the_loop_is_free_while_the_engine_emits_it():
    """The loop waits for the step's flush: woken at a step's first delta, it would take the GIL
    mid-step and send the step in pieces, a message each (cluster/rank.py's `deltas`)."""
    async def go():
        box = Outbox(asyncio.get_running_loop())
        t = _run(box, {f"r{k}": box.sink(f"r{k}") for k in range(4)}, 20, wait=False, pause=0.002)
        batches = []
        while box.live:
            batches.append(await asyncio.wait_for(box.take(), 10))
        t.join()
        return batches

    batches = asyncio.run(go())
    assert sum(map(len, batches)) == 80
    assert all(len(b) % 4 == 0 for b in batches), [len(b) for b in batches]  # whole steps only
    assert len(batches) <= 20


def test_what_is_not_flushed_waits_and_close_sends_it():
    async def go():
        box = Outbox(asyncio.get_running_loop())
        sink = box.sink("x")
        sink(_delta(1))
        try:
            await asyncio.wait_for(box.take(), 0.2)
            waited = False
        except asyncio.TimeoutError:
            waited = True
        box.close()
        return waited, await box.take(), await box.take()

    waited, last, after = asyncio.run(go())
    assert waited and [d.token_ids for _, d in last] == [(1,)] and after is None
