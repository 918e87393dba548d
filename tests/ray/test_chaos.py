"""Chaos through Ray Serve: failures injected under load into a replica that owns a gang of two
gloo ranks serving the golden checkpoint (max_batch_size 4 running + max_waiting 4 queued).

Clients that leave mid-stream or while queued, floods past the replica's bound, malformed
requests among valid ones, and a rank killed mid-stream. After each: every request was answered
with a full, golden-correct result or a clear error in OpenAI's shape, no KV-cache slot or
admission place is left taken, the service answers correctly again, and Ray's metrics count
what the clients saw. The rank kill runs last: it ends with the replica replaced.
"""
from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from llama.distributed import free_port
from tests.conftest import GOLDEN_CKPT
from tests.ray.chaos import (
    CHAT,
    COMPLETIONS,
    MAX_BATCH,
    MAX_WAITING,
    MODEL,
    MAX_SEQ_LEN,
    BOUND,
    Service,
    Answer,
    greedy,
    long_stream,
    ask,
    cancel,
    leave_after,
    client,
    get,
    wait_for,
    wait_async,
    check_error_shape,
    check_golden,
    reasons_seen,
    settle_metrics,
    baseline,
    cluster,
    engine,
    engine_idle,
    check_serves_correctly,
)
from tests.ray.serving import serving

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def svc():
    import ray

    metrics_port = free_port("127.0.0.1")
    # Ray reports metrics every 0.5 s here. 6 CPUs: a gang takes 3 (replica + 2 ranks), and its
    # replacement may be placed before the failed one's group is released.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        with serving({"model": MODEL, "ckpt_dir": str(GOLDEN_CKPT),
                      "engine": {"max_seq_len": MAX_SEQ_LEN, "max_batch_size": MAX_BATCH, "max_waiting": MAX_WAITING},
                      "parallel": {"model_parallel_size": 2, "device": "cpu"}}) as url:
            svc = Service(url, f"http://127.0.0.1:{metrics_port}/metrics")
            health = wait_for(lambda: get(svc.url + "/health"), lambda r: r.status_code == 200, 120)
            assert health.status_code == 200, f"the gang did not start within 120 s: {health.text}"
            yield svc
    finally:
        ray.shutdown()


# ---- scenarios -------------------------------------------------------------------------------


def test_clients_that_leave_mid_stream_or_while_queued_free_everything(svc, golden):
    """A chat stream, a two-choice stream and a whole request take every slot; two requests queue
    behind them and their clients leave; two that will complete queue too; then the first three's
    clients leave mid-way. The two complete with golden tokens, the six choices left count as
    aborts in the metrics and the engine, and nothing stays held."""
    before_metrics, before_engine = baseline(svc)

    async def go() -> tuple[list[int], list[Answer]]:
        async with client(svc) as http:
            leave = asyncio.Event()
            streams = [asyncio.ensure_future(leave_after(http, long_stream(chat=True), CHAT, 3, leave)),
                       asyncio.ensure_future(leave_after(http, {**long_stream(), "n": 2}, COMPLETIONS, 3, leave))]
            # Whole requests leave by closing their connection: each on a client of its own.
            own = [client(svc) for _ in range(3)]
            whole = asyncio.ensure_future(ask(own[0], {**long_stream(), "stream": False}))
            e = await wait_async(lambda: engine(svc), lambda e: e["running"] == MAX_BATCH, 60)
            assert e["running"] == MAX_BATCH, e
            # Queued behind them (no slot, no response started), then abandoned.
            queued = [asyncio.ensure_future(ask(own[1], long_stream())),
                      asyncio.ensure_future(ask(own[2], {**long_stream(), "stream": False}))]
            e = await wait_async(lambda: engine(svc), lambda e: e["waiting"] == 2, 60)
            assert e["waiting"] == 2 and not any(t.done() for t in queued), e
            await cancel(queued, own[1:])
            e = await wait_async(lambda: engine(svc), lambda e: e["waiting"] == 0, 30)
            assert e["waiting"] == 0 and e["running"] == MAX_BATCH, f"abandoned requests still queued: {e}"
            # Two that complete, queued until the slots are given back.
            completers = [asyncio.ensure_future(ask(http, greedy(0, 32, stream=False))),
                          asyncio.ensure_future(ask(http, greedy(2, 32, stream=True)))]
            e = await wait_async(lambda: engine(svc), lambda e: e["waiting"] == 2, 60)
            assert e["waiting"] == 2 and e["running"] == MAX_BATCH and not whole.done(), e  # all still running
            leave.set()
            left = await asyncio.gather(*streams)
            await cancel([whole], own[:1])
            return left, list(await asyncio.gather(*completers))

    left, (whole, streamed) = asyncio.run(go())
    assert left == [3, 3]
    check_golden(whole, golden, 0, 32)
    check_golden(streamed, golden, 2, 32)
    n_left = 1 + 2 + 1 + 2  # choices: the chat stream, the two-choice stream, the whole request, the queued two
    settle_metrics(svc, before_metrics, reasons_seen([whole, streamed]) + Counter(abort=n_left))
    e = engine_idle(svc)
    assert e["aborted"] - before_engine["aborted"] == n_left
    assert e["finished"] - before_engine["finished"] == n_left + 2
    check_serves_correctly(svc, golden)


def test_bursts_of_clients_leaving_at_once_free_everything(svc, golden):
    """Round after round, BOUND clients (streams and whole requests) fill every slot and every
    waiting place, then all leave at once: each request counts as one abort, the gang stays
    healthy (a client's leaving is not a failure of the gang), and nothing stays held."""
    rounds = 3
    before_metrics, before_engine = baseline(svc)

    async def burst() -> None:
        own = [client(svc) for _ in range(BOUND)]
        tasks = [asyncio.ensure_future(ask(c, {**long_stream(), "stream": k % 2 == 0})) for k, c in enumerate(own)]
        e = await wait_async(lambda: engine(svc), lambda e: e["running"] == MAX_BATCH and e["waiting"] == MAX_WAITING,
                             60)
        assert e["running"] == MAX_BATCH and e["waiting"] == MAX_WAITING and not any(t.done() for t in tasks), e
        await cancel(tasks, own)

    for _ in range(rounds):
        asyncio.run(burst())
        engine_idle(svc)
        health = get(svc.url + "/health")
        assert health.status_code == 200, f"clients that left made the gang unhealthy: {health.text}"
    settle_metrics(svc, before_metrics, Counter(abort=rounds * BOUND))
    e = engine_idle(svc)
    assert e["aborted"] - before_engine["aborted"] == e["finished"] - before_engine["finished"] == rounds * BOUND
    check_serves_correctly(svc, golden)


@pytest.mark.parametrize("n", [1, 3], ids=["one-choice", "three-choices"])
def test_a_flood_past_the_bound_gets_full_answers_or_429(svc, golden, n):
    """Many times the replica's bound at once, half streamed, each request n choices: each gets
    all its choices with golden tokens or a 429 in OpenAI's shape with Retry-After, and the
    metrics and the engine count exactly the choices answered (a refused request none)."""
    requests = 3 * BOUND // n + 4
    before_metrics, before_engine = baseline(svc)
    bodies = [greedy(k % 6, 32, stream=k % 2 == 0, n=n) for k in range(requests)]

    async def go() -> list[Answer]:
        async with client(svc, requests + 8) as http:
            return list(await asyncio.gather(*[ask(http, b) for b in bodies]))

    answers = asyncio.run(go())
    ok = [k for k, a in enumerate(answers) if a.status == 200]
    refused = [k for k, a in enumerate(answers) if a.status == 429]
    assert len(ok) + len(refused) == requests, Counter(a.status for a in answers)
    assert refused and ok, f"{len(ok)} answered, {len(refused)} refused"
    for k in ok:
        check_golden(answers[k], golden, k % 6, 32, n)
    for k in refused:
        a = answers[k]
        check_error_shape(a)
        assert a.error["type"] == "rate_limit_error" and a.error["code"] == "rate_limit_exceeded", a
        assert a.retry_after is not None and int(a.retry_after) > 0, a
    settle_metrics(svc, before_metrics, reasons_seen(answers))
    e = engine_idle(svc)
    assert e["finished"] - before_engine["finished"] == n * len(ok), "the engine ran choices of refused requests"
    check_serves_correctly(svc, golden)


# (path, body: a dict sent as JSON or bytes sent as they are, the status OpenAI's API gives)
MALFORMED = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b'{"model": "llama-chaos", "prompt": "hi", "max_tokens": 4', 400),
    ("/v1/completions", b"[1, 2, 3]", 400),
    ("/v1/completions", b"null", 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"\xff\xfe\x00", 400),
    ("/v1/completions", {"model": MODEL, "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": "hot"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "hi"}, "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1.5, 2], "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": "yes"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream_options": {"include_usage": True}},
     400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 1000}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["hi"] * 100, "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logprobs": 100}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stop": ["x"] * 100}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "bogus": 1}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi", "max_tokens": 4}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": "a " * MAX_SEQ_LEN, "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "a " * MAX_SEQ_LEN, "max_tokens": 4, "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_SEQ_LEN}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999], "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, -5]], "max_tokens": 4, "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[]], "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logit_bias": {"99999": 1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logit_bias": {"99999": 1},
                         "stream": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logit_bias": {"abc": 1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logit_bias": {"5": 500}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logit_bias": {"5": "x"}}, 400),
    ("/v1/completions", b'{"model": "llama-chaos", "prompt": "hi", "max_tokens": 4, "logit_bias": {"5": NaN}}', 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi", "max_tokens": 4}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 4}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a " * MAX_SEQ_LEN}],
                              "stream": True}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": MAX_SEQ_LEN}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"400": 1}}, 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/tokenize", {"model": MODEL, "prompt": 5}, 400),
    ("/detokenize", {"model": MODEL, "tokens": [99999]}, 400),
    ("/v1/no/such/route", {"model": MODEL}, 404),
]


def test_malformed_requests_during_load_get_4xx_and_leave_the_load_correct(svc, golden):
    """While three clients keep sending valid requests, each malformed one gets its 4xx in
    OpenAI's shape; every valid one completes with golden tokens; the ranks stay up."""
    before_metrics, before_engine = baseline(svc)

    async def go() -> tuple[list[tuple[int, Answer]], list[Answer]]:
        async with client(svc) as http:
            stop = asyncio.Event()
            valid: list[tuple[int, Answer]] = []

            async def load(w: int) -> None:
                k = w
                while not stop.is_set() or k < w + 6:  # at least two requests each, whatever the timing
                    valid.append((k % 6, await ask(http, greedy(k % 6, 16, stream=k % 2 == 1))))
                    k += 3

            workers = [asyncio.ensure_future(load(w)) for w in range(3)]
            await wait_async(lambda: engine(svc), lambda e: e["running"] > 0, 60)
            bad = []
            for _ in range(2):  # twice over, while the load's requests come and go
                bad += await asyncio.gather(*[ask(http, body, path) for path, body, _ in MALFORMED])
            stop.set()
            await asyncio.gather(*workers)
            return valid, bad

    valid, bad = asyncio.run(go())
    for (path, body, status), a in zip(MALFORMED * 2, bad):
        assert a.status == status, (path, body, a)
        check_error_shape(a)
    for i, a in valid:
        check_golden(a, golden, i, 16)
    settle_metrics(svc, before_metrics, reasons_seen([a for _, a in valid]))
    e = engine_idle(svc)
    assert e["finished"] - before_engine["finished"] == len(valid)
    check_serves_correctly(svc, golden)


def test_a_rank_killed_mid_stream_fails_every_request_clearly_then_the_replica_is_replaced(svc, golden):
    """Three streams (one chat) and a whole request decode, and one more waits for a slot, when
    rank 1's process is killed: each stream ends with an error event in OpenAI's shape and no
    [DONE], each whole request gets a 503 saying the workers failed, and the metrics count five
    errors; a request sent next is refused the same way (or, on the replacement, answered).
    Serve replaces the replica; the new gang answers correctly with no slot held, and the
    failed gang's CPUs are released."""
    import ray

    before_metrics, _ = baseline(svc)
    old = cluster(svc)
    victim = next(r for r in old["ranks"] if r["rank"] == 1)
    free_cpus = ray.available_resources().get("CPU", 0)

    async def go() -> tuple[list[Answer], Answer]:
        async with client(svc) as http:
            going = [asyncio.Event() for _ in range(3)]

            def mark(k: int) -> Callable[[int], Awaitable[None]]:
                async def on_event(seen: int) -> None:
                    if seen >= 2:
                        going[k].set()
                return on_event

            streams = [asyncio.ensure_future(ask(http, long_stream(chat=k == 0), CHAT if k == 0 else COMPLETIONS,
                                                 mark(k)))
                       for k in range(3)]
            wholes = [asyncio.ensure_future(ask(http, {**long_stream(), "stream": False}))]
            await asyncio.wait_for(asyncio.gather(*[g.wait() for g in going]), 60)
            e = await wait_async(lambda: engine(svc), lambda e: e["running"] == MAX_BATCH, 30)
            assert e["running"] == MAX_BATCH, e
            wholes.append(asyncio.ensure_future(ask(http, greedy(0, 32, stream=False))))
            e = await wait_async(lambda: engine(svc), lambda e: e["waiting"] == 1, 30)
            assert e["running"] == MAX_BATCH and e["waiting"] == 1 and not any(w.done() for w in wholes), e
            os.kill(victim["pid"], signal.SIGKILL)  # a rank process of this test's own Ray instance
            # Bounded: a hang fails here, not at the clients' 120 s timeout.
            answers = list(await asyncio.wait_for(asyncio.gather(*streams, *wholes), 60))
            return answers, await ask(http, greedy(1, 8, stream=False))

    answers, after = asyncio.run(go())
    for a in answers[:3]:
        assert a.status == 200 and not a.done and a.events_after_end == 0, f"the stream looks complete: {a}"
        assert a.error is not None and set(a.error) >= {"message", "type", "param", "code"}, a
        assert set(a.finish_reasons.values()) == {None}, a  # no choice claims to have finished
    for a in answers[3:]:
        assert a.status == 503, a
        check_error_shape(a)
    for a in answers:
        assert a.error["type"] == "service_unavailable_error" and "workers failed" in a.error["message"], a
    if after.status == 200:  # the replacement was ready already
        check_golden(after, golden, 1, 8)
    else:
        assert after.status == 503 and after.error["type"] == "service_unavailable_error", after
    settle_metrics(svc, before_metrics, Counter(error=len(answers)) + reasons_seen([after]))

    # Serve's health check (every 2 s) fails, and the replica is replaced with a new gang.
    health = wait_for(lambda: get(svc.url + "/health"), lambda r: r.status_code == 200, 150, every_s=1)
    assert health.status_code == 200, f"no healthy replica 150 s after the kill: {health.status_code} {health.text}"
    new = cluster(svc)
    assert not {r["pid"] for r in old["ranks"]} & {r["pid"] for r in new["ranks"]}, "the failed gang still serves"
    check_serves_correctly(svc, golden)
    left = wait_for(lambda: ray.available_resources().get("CPU", 0), lambda c: c == free_cpus, 60)
    assert left == free_cpus, f"the failed gang's CPUs were not all released: {left} free, {free_cpus} before"
