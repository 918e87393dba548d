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
import json
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import pytest

from llama.distributed import free_port
from tests.conftest import GOLDEN_CKPT, GOLDEN_DIR
from tests.ray.serving import serving

pytestmark = pytest.mark.chaos

MODEL = "llama-chaos"
MAX_SEQ_LEN = 512  # room for streams long enough to be still running whatever this machine's speed
MAX_BATCH, MAX_WAITING = 4, 4
BOUND = MAX_BATCH + MAX_WAITING  # engine streams one replica holds; more get 429
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
REASONS = ("stop", "length", "abort", "timeout", "error")  # request_success_total's finished_reason
PROMPTS = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]["prompts"]
EOS = 2  # the golden tokenizer's only stop id
T = TypeVar("T")


# ---- the service -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    url: str
    metrics_url: str


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


# ---- clients ---------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one client saw, choice by choice."""

    status: int
    stream: bool
    token_ids: dict[int, list[int]] = field(default_factory=dict)  # choice index -> its token ids
    finish_reasons: dict[int, str | None] = field(default_factory=dict)
    error: dict | None = None  # the "error" object: of a JSON error body, or of an error event
    retry_after: str | None = None
    done: bool = False  # stream: `data: [DONE]` arrived
    events_after_end: int = 0  # stream: events after [DONE] or an error event (there must be none)


def greedy(i: int, max_tokens: int, stream: bool, n: int = 1) -> dict:
    """Golden prompt i, greedy, with its token ids returned."""
    return {"model": MODEL, "prompt": PROMPTS[i], "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "n": n, "return_token_ids": True}


def long_stream(chat: bool = False) -> dict:
    """A stream that runs to max_tokens (its EOS biased away) unless something stops it: on this
    model many seconds, so it is still running when a test acts on it."""
    body = {"model": MODEL, "max_tokens": MAX_SEQ_LEN - 64, "temperature": 0, "stream": True,
            "logit_bias": {str(EOS): -100}}
    return {**body, "messages": [{"role": "user", "content": "hi"}]} if chat else {**body, "prompt": "hello"}


def expected(golden: dict, i: int, max_tokens: int) -> tuple[list[int], str]:
    """Golden prompt i's greedy tokens and finish reason at max_tokens (at most the reference's 32)."""
    c = golden["completions"]
    assert max_tokens <= c["max_gen_len"]
    ids = c["generated_token_ids"][i]
    return ids[:max_tokens], "stop" if len(ids) < max_tokens else "length"


async def ask(http: httpx.AsyncClient, body: dict | bytes, path: str = COMPLETIONS,
              on_event: Callable[[int], Awaitable[None]] | None = None) -> Answer:
    """POST one request (a dict as JSON, bytes as they are) and read all of its answer. For a
    stream, `on_event(k)` is awaited after its k-th chunk, so a caller can act mid-stream."""
    if isinstance(body, bytes):
        kw: dict = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": body}
    stream = isinstance(body, dict) and body.get("stream") is True
    async with http.stream("POST", path, **kw) as r:
        a = Answer(r.status_code, stream, retry_after=r.headers.get("retry-after"))
        if r.status_code != 200 or not stream:
            await r.aread()
            try:
                data = r.json()
            except ValueError:
                data = {"error": {"not JSON": r.text}}
            if r.status_code != 200:
                a.error = data.get("error", {"no error object": data})
            for choice in data.get("choices", []):
                a.token_ids[choice["index"]] = choice.get("token_ids") or []
                a.finish_reasons[choice["index"]] = choice["finish_reason"]
            return a
        k = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if a.done or a.error is not None:
                a.events_after_end += 1
            elif line == "data: [DONE]":
                a.done = True
            elif "error" in (chunk := json.loads(line[len("data: "):])):
                a.error = chunk["error"]
            else:
                for choice in chunk["choices"]:
                    a.token_ids.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
                    a.finish_reasons[choice["index"]] = choice["finish_reason"]
                k += 1
                if on_event is not None:
                    await on_event(k)
        return a


async def cancel(tasks: list[asyncio.Task], clients: list[httpx.AsyncClient]) -> None:
    """The clients of requests in flight go away: their connections are closed."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        await c.aclose()


class Left(Exception):
    """Raised from on_event: the client goes away mid-stream (its connection is closed)."""


async def leave_after(http: httpx.AsyncClient, body: dict, path: str, k: int, gate: asyncio.Event) -> int:
    """Read k chunks, wait for `gate`, then go away without reading the rest. Returns k."""

    async def on_event(seen: int) -> None:
        if seen >= k:
            await gate.wait()
            raise Left

    try:
        a = await ask(http, body, path, on_event)
    except Left:
        return k
    raise AssertionError(f"the stream ended before its client could leave it: {a}")


def client(svc: Service, limit: int = 64) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=svc.url, timeout=120,
                             limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))


def get(url: str) -> httpx.Response:
    try:
        return httpx.get(url, timeout=30)
    except httpx.HTTPError as e:  # the proxy may refuse while a replica is replaced
        return httpx.Response(599, text=f"{type(e).__name__}: {e}")


def wait_for(read: Callable[[], T], ok: Callable[[T], bool], timeout_s: float, every_s: float = 0.25) -> T:
    """read() until ok(value) or timeout_s; the last value either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(every_s)
        value = read()
    return value


async def wait_async(read: Callable[[], T], ok: Callable[[T], bool], timeout_s: float) -> T:
    """wait_for from an event loop, on a thread, so the loop's clients keep reading."""
    return await asyncio.to_thread(wait_for, read, ok, timeout_s)


def check_error_shape(a: Answer) -> None:
    """OpenAI's error object, with a message that says something."""
    assert a.error is not None and set(a.error) >= {"message", "type", "param", "code"}, a
    assert isinstance(a.error["message"], str) and len(a.error["message"]) > 10, a
    assert not a.token_ids and not a.done, a


def check_golden(a: Answer, golden: dict, i: int, max_tokens: int, n: int = 1) -> None:
    """A full, correct result: each of n choices golden prompt i's greedy tokens and finish
    reason, and for a stream [DONE] and nothing after it."""
    ids, reason = expected(golden, i, max_tokens)
    assert a.status == 200 and a.error is None, a
    assert a.token_ids == {k: ids for k in range(n)} and a.finish_reasons == {k: reason for k in range(n)}, (i, a)
    if a.stream:
        assert a.done and a.events_after_end == 0, a


def reasons_seen(answers: list[Answer]) -> Counter:
    """Choices the clients got whole, by finish reason: what the metrics must count."""
    return Counter(r for a in answers if a.status == 200 and a.error is None for r in a.finish_reasons.values())


# ---- what the server says --------------------------------------------------------------------

_FINISHED = re.compile(r'^ray_llama_request_success_total\{(.*)\} (\S+)$')


def finished_by_reason(svc: Service) -> Counter:
    """Ray's request_success_total (one per engine stream, i.e. per choice), summed over the
    processes that report it, by finished_reason."""
    out: Counter = Counter()
    for line in urllib.request.urlopen(svc.metrics_url, timeout=10).read().decode().splitlines():
        if m := _FINISHED.match(line):
            reason = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))).get("finished_reason", "")
            out[reason] += float(m.group(2))
    return out


def settle_metrics(svc: Service, before: Counter, want: Counter, timeout_s: float = 30) -> None:
    """Ray's counts rise by `want` (reason -> choices), and by nothing else. Each process reports
    every 0.5 s, so they are polled until they match, pass it (counters only rise) or timeout_s."""
    want = Counter({r: want.get(r, 0) for r in REASONS})

    def delta() -> Counter:
        now = finished_by_reason(svc)
        return Counter({r: now.get(r, 0) - before.get(r, 0) for r in REASONS})

    got = wait_for(delta, lambda d: d == want or any(d[r] > want[r] for r in REASONS), timeout_s)
    if got != want:  # past it: one more report, so the message shows every count
        time.sleep(2)
        got = delta()
    assert got == want, f"metrics' requests by finished_reason rose by {dict(got)}; the clients saw {dict(want)}"


def baseline(svc: Service) -> tuple[Counter, dict]:
    """Counts to measure a test's requests from, once nothing is running and the metrics have
    settled (equal over three report intervals): an earlier test that failed may have left
    counts still to be reported, or a gang that Serve is replacing."""
    health = wait_for(lambda: get(svc.url + "/health"), lambda r: r.status_code == 200, 150, every_s=1)
    assert health.status_code == 200, f"the service is not healthy: {health.status_code} {health.text}"
    e = engine_idle(svc)

    def two_reads() -> tuple[Counter, Counter]:
        first = finished_by_reason(svc)
        time.sleep(1.5)
        return first, finished_by_reason(svc)

    return wait_for(two_reads, lambda r: r[0] == r[1], 20, every_s=0)[1], e


def cluster(svc: Service) -> dict:
    r = get(svc.url + "/cluster")
    assert r.status_code == 200, r.text
    return r.json()


def engine(svc: Service) -> dict:
    """The driver's slots and counters (GET /cluster); fails at once, saying why, if the gang
    has failed or is being replaced, where every wait on the engine would only time out."""
    info = cluster(svc)
    if not info.get("healthy") or "error" in info.get("engine", {"error": "no engine"}):
        pytest.fail(f"the gang is unhealthy or being replaced: /cluster {info.get('engine') or info.get('start')}; "
                    f"/health {get(svc.url + '/health').text}")
    return info["engine"]


def engine_idle(svc: Service, timeout_s: float = 30) -> dict:
    """The driver's engine once every slot is free and nothing waits (freed at its next step)."""

    def idle(e: dict) -> bool:
        return e.get("free_slots") == e.get("slots") == MAX_BATCH and e.get("running") == e.get("waiting") == 0

    e = wait_for(lambda: engine(svc), idle, timeout_s)
    assert idle(e), f"slots left behind: {e}"
    return e


def check_serves_correctly(svc: Service, golden: dict) -> None:
    """Healthy (every rank answers), no slot held, and exactly BOUND concurrent requests all
    answered with golden tokens: no admission place was left taken. Waits until the metrics
    count them, so the next test starts from settled counts."""
    info = cluster(svc)
    assert info["healthy"] and info["world_size"] == 2 and len({r["pid"] for r in info["ranks"]}) == 2, info
    assert get(svc.url + "/health").status_code == 200
    engine_idle(svc)
    before = finished_by_reason(svc)  # settled: each caller has just waited for its own requests' counts

    async def go() -> list[Answer]:
        async with client(svc) as http:
            return list(await asyncio.gather(*[ask(http, greedy(k % 6, 8, stream=k % 2 == 1)) for k in range(BOUND)]))

    answers = asyncio.run(go())
    for k, a in enumerate(answers):
        check_golden(a, golden, k % 6, 8)
    settle_metrics(svc, before, reasons_seen(answers))
    engine_idle(svc)


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
