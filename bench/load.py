"""A load tool: N requests at a fixed concurrency against a running server, loopback only.

    python bench/load.py [--url http://127.0.0.1:8000 --model llama-demo --requests 500 \
                          --concurrency 32 --stream-share 0.5 --max-tokens 24 --time-limit-s 900]

Each of `concurrency` workers sends the next request as soon as its last one ended (a closed
loop), half of them streamed (server-sent events) by default, greedy, over a fixed list of
prompts. It prints every request's outcome as one JSON line into --out (a file), then a table:
outcomes by kind, requests/s and generated tokens/s, time to first token (streamed requests)
and latency at p50 and p99, and the server's own counters from GET /cluster before and after
(requests the engine finished) and, with --metrics, Ray's Prometheus endpoints on this machine
(requests finished by reason, tokens generated), which must account for every request answered.

Bounded: at most --requests requests and --time-limit-s seconds, and only to a loopback
address, so it can never load anything but a server on this machine.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "Q: What is the largest animal?\nA:",
    "Q: What is Ray Serve?\nA:",
    "The capital of France is",
    "Llamas live in",
    "Q: What does a placement group do?\nA:",
    "Once upon a time",
]


@dataclass
class Outcome:
    index: int
    stream: bool
    outcome: str  # "ok", "http <status>", "error event", "transport: <error>", "not sent (time limit)"
    latency_s: float | None = None
    ttft_s: float | None = None  # streamed requests: the first chunk with text
    completion_tokens: int = 0


def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--url {url}: this tool only loads a server on this machine (127.0.0.1, ::1 or localhost).")


async def one(http: httpx.AsyncClient, url: str, model: str, index: int, stream: bool, max_tokens: int) -> Outcome:
    body = {"model": model, "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await http.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                return Outcome(index, stream, f"http {r.status_code}", time.perf_counter() - t0)
            return Outcome(index, stream, "ok", time.perf_counter() - t0, None, r.json()["usage"]["completion_tokens"])
        body.update(stream=True, stream_options={"include_usage": True})
        ttft, tokens, done = None, 0, False
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Outcome(index, stream, f"http {r.status_code}", time.perf_counter() - t0)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Outcome(index, stream, "error event", time.perf_counter() - t0)
                if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if not done:
            return Outcome(index, stream, "stream ended without [DONE]", time.perf_counter() - t0)
        return Outcome(index, stream, "ok", time.perf_counter() - t0, ttft, tokens)
    except httpx.HTTPError as e:
        return Outcome(index, stream, f"transport: {type(e).__name__}", time.perf_counter() - t0)


async def run(args: argparse.Namespace) -> tuple[list[Outcome], float, dict, dict]:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as http:
        before = (await http.get(args.url + "/cluster")).json()
        outcomes: list[Outcome] = []
        next_index = 0
        stop_at = time.perf_counter() + args.time_limit_s
        streamed_every = round(1 / args.stream_share) if args.stream_share > 0 else 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.requests:
                i, next_index = next_index, next_index + 1
                if time.perf_counter() > stop_at:
                    outcomes.append(Outcome(i, False, "not sent (time limit)"))
                    continue
                stream = streamed_every > 0 and i % streamed_every == 0
                outcomes.append(await one(http, args.url, args.model, i, stream, args.max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        wall = time.perf_counter() - t0
        after = (await http.get(args.url + "/cluster")).json()
    return sorted(outcomes, key=lambda o: o.index), wall, before, after


def metrics_totals(discovery: Path) -> dict[str, float]:
    """Sums over Ray's metrics endpoints on this machine (listed in the session's Prometheus
    discovery file; asked at 127.0.0.1): requests finished by reason, tokens generated."""
    totals: Counter = Counter()
    for group in json.loads(discovery.read_text()):
        for target in group["targets"]:
            port = target.rsplit(":", 1)[1]
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                m = re.match(r'^ray_llama_(request_success_total|generation_tokens_total)\{(.*)\} (\S+)$', line)
                if m:
                    reason = re.search(r'finished_reason="(\w+)"', m.group(2))
                    totals[m.group(1) + (f"[{reason.group(1)}]" if reason else "")] += float(m.group(3))
    return dict(totals)


def metrics_delta(discovery: Path, before: dict[str, float], want_finished: int, wait_s: float = 60.0) -> dict:
    """The increase since `before`, once Ray has reported every request's end and the counters
    have settled (Ray reports every few seconds, the ranks sample every second), or as it
    stands after wait_s."""
    deadline = time.monotonic() + wait_s
    last = None
    while True:
        now = metrics_totals(discovery)
        delta = {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}
        finished = sum(v for k, v in delta.items() if k.startswith("request_success_total"))
        if (finished >= want_finished and delta == last) or time.monotonic() > deadline:
            return delta
        last = delta
        time.sleep(5.0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)


def report(outcomes: list[Outcome], wall: float, before: dict, after: dict, args: argparse.Namespace,
           metrics: dict | None) -> None:
    kinds = Counter(o.outcome for o in outcomes)
    ok = [o for o in outcomes if o.outcome == "ok"]
    lat = [o.latency_s for o in ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    tokens = sum(o.completion_tokens for o in ok)
    finished = after["engine"]["finished"] - before["engine"]["finished"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1e3 * v:.0f} ms"

    print(f"\n{len(outcomes)} requests, concurrency {args.concurrency}, {sum(o.stream for o in outcomes)} streamed, "
          f"max_tokens {args.max_tokens}, greedy; {wall:.1f} s")
    for kind, n in kinds.most_common():
        print(f"  {kind:<28} {n}")
    print(f"  throughput                   {len(ok) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s")
    print(f"  time to first token (stream) p50 {ms(percentile(ttft, 50))}, p99 {ms(percentile(ttft, 99))}")
    print(f"  latency                      p50 {ms(percentile(lat, 50))}, p99 {ms(percentile(lat, 99))}")
    print(f"  server: requests finished    {finished} (engine counter, GET /cluster); answered ok here {len(ok)}")
    if metrics is not None:
        shown = ", ".join(f"{k} +{v:g}" for k, v in sorted(metrics.items())) or "no change"
        print(f"  server: Ray metrics          {shown}; tokens received here {sum(o.completion_tokens for o in ok)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="llama-demo")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--stream-share", type=float, default=0.5, help="share of requests streamed (0..1)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--time-limit-s", type=float, default=900.0, help="no request is sent after this")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--out", default=None, help="write every request's outcome here, one JSON line each")
    p.add_argument("--metrics", default=None, metavar="DISCOVERY_JSON",
                   help="also compare Ray's metrics, e.g. /tmp/ray/session_latest/prom_metrics_service_discovery.json")
    args = p.parse_args(argv)
    loopback_only(args.url)
    if not 0 < args.requests <= 100_000 or not 0 < args.concurrency <= 1024 or not 0 <= args.stream_share <= 1:
        raise SystemExit("--requests 1..100000, --concurrency 1..1024, --stream-share 0..1")
    discovery = Path(args.metrics) if args.metrics else None
    metrics_before = metrics_totals(discovery) if discovery else None
    outcomes, wall, before, after = asyncio.run(run(args))
    n_ok = sum(o.outcome == "ok" for o in outcomes)
    metrics = metrics_delta(discovery, metrics_before, n_ok) if discovery else None
    if args.out:
        with open(args.out, "w") as f:
            for o in outcomes:
                f.write(json.dumps(asdict(o)) + "\n")
    report(outcomes, wall, before, after, args, metrics)


if __name__ == "__main__":
    main()
