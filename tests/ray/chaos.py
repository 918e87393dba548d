"""The chaos suite's clients and probes (tests/ray/test_chaos.py): the served replica's settings,
requests sent and read whole or left mid-way (what each client saw, choice by choice), and what
the server says afterwards (its engine's state over /cluster, Ray's metrics by finished reason)."""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import pytest

from tests.conftest import GOLDEN_DIR

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
        return (e.get("free_slots") == e.get("slots") == MAX_BATCH and e.get("running") == e.get("waiting") == 0
                and e.get("kv_blocks_used") == 0  # every block free or cached, and the counts add up
                and e.get("kv_blocks_cached", 0) + e.get("kv_blocks_free", 0) == e.get("kv_blocks"))

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
