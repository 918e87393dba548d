"""Prometheus metrics through Ray's metrics API: they appear on every node's Ray metrics endpoint
(and Ray's dashboard) with no second exporter. Named as operators know them from vLLM, with
Ray's `ray_` and our `llama_` in front (vllm:num_requests_running is ray_llama_num_requests_running),
tagged with the checkpoint's folder name and, per rank, the rank.

Two sources: each request as the replica streams it (RequestMetrics, in RankGroup.stream), and
each rank's engine or runner, sampled once a second on the rank's own thread (RankSampler).
deploy/grafana-dashboard.json graphs them.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

from ray.util.metrics import Counter, Gauge, Histogram

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")


@functools.cache  # one set per process: Ray's metric objects are per process
def _request_metrics() -> dict:
    tags = ("checkpoint",)
    return {
        "ttft": Histogram("llama_time_to_first_token_seconds", "time from a request's arrival at the replica to "
                          "its first token", boundaries=_SECONDS, tag_keys=tags),
        "tpot": Histogram("llama_time_per_output_token_seconds", "time between a request's tokens after the first",
                          boundaries=_SECONDS, tag_keys=tags),
        "e2e": Histogram("llama_e2e_request_latency_seconds", "time from arrival to the last token",
                         boundaries=_SECONDS, tag_keys=tags),
        "queue": Histogram("llama_request_queue_time_seconds", "time a request waited in the engine before "
                           "it started running", boundaries=_SECONDS, tag_keys=tags),
        "finished": Counter("llama_request_success_total", "requests ended, by finished_reason (stop, length, "
                            "abort, timeout, error)", tag_keys=(*tags, "finished_reason")),
    }


class RequestMetrics:
    """One request's timings as the replica streams it; `finish` records them once."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.queue_s: float | None = None
        self._done = False

    def queued(self, queue_s: float | None) -> None:
        if queue_s is not None:
            self.queue_s = queue_s

    def tokens_arrived(self, n: int) -> None:
        now = time.perf_counter()
        if n and self.first is None:
            self.first = now
        self.last = now if n else self.last
        self.tokens += n

    def finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        m, tags = _request_metrics(), {"checkpoint": self.checkpoint}
        m["finished"].inc(1, tags={**tags, "finished_reason": reason})
        m["e2e"].observe(time.perf_counter() - self.t0, tags=tags)
        if self.queue_s is not None:
            m["queue"].observe(self.queue_s, tags=tags)
        if self.first is not None:
            m["ttft"].observe(self.first - self.t0, tags=tags)
            if self.tokens > 1 and self.last is not None:
                m["tpot"].observe((self.last - self.first) / (self.tokens - 1), tags=tags)


@functools.cache
def _rank_metrics() -> dict:
    tags = ("checkpoint", "rank")
    return {
        "running": Gauge("llama_num_requests_running", "requests running (holding KV blocks)", tag_keys=tags),
        "waiting": Gauge("llama_num_requests_waiting", "requests queued to run, preempted ones included",
                         tag_keys=tags),
        "usage": Gauge("llama_kv_cache_usage_perc", "share of KV-cache blocks used by running requests (0..1)",
                       tag_keys=tags),
        "blocks_used": Gauge("llama_kv_cache_blocks_used", "KV-cache blocks used by running requests", tag_keys=tags),
        "blocks_cached": Gauge("llama_kv_cache_blocks_cached", "KV-cache blocks holding a cached prefix no "
                               "request uses (reusable, evicted when memory is needed)", tag_keys=tags),
        "prefix_queries": Counter("llama_prefix_cache_queries_total", "prompt tokens looked up in the prefix cache",
                                  tag_keys=tags),
        "prefix_hits": Counter("llama_prefix_cache_hits_total", "prompt tokens found in the prefix cache (not prefilled)",
                               tag_keys=tags),
        "preemptions": Counter("llama_num_preemptions_total", "running requests preempted for want of KV blocks "
                               "(recomputed later)", tag_keys=tags),
        "prompt": Counter("llama_prompt_tokens_total", "prompt tokens served (prefilled, or found in the prefix "
                          "cache)", tag_keys=tags),
        "generated": Counter("llama_generation_tokens_total", "tokens generated", tag_keys=tags),
        "steps": Counter("llama_rank_steps_total", "engine steps this rank ran a forward for", tag_keys=tags),
        "step_s": Counter("llama_rank_step_seconds_total", "seconds this rank spent running steps", tag_keys=tags),
        "plan_s": Counter("llama_plan_broadcast_seconds_total", "seconds the driver spent sending step plans to "
                          "the other ranks", tag_keys=tags),
    }


class RankSampler:
    """Reads a rank's counters once a second (`read` returns the engine's load() on the driver,
    the runner's step counters on the others) and exports them: gauges as they are, counters
    by their increase since the last read. A daemon thread; stop() ends it."""

    def __init__(self, checkpoint: str, rank: int, read: Callable[[], dict], interval_s: float = 1.0):
        self.tags = {"checkpoint": checkpoint, "rank": str(rank)}
        self.read = read
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rank{rank}-metrics", daemon=True)

    def start(self) -> "RankSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        m, now = _rank_metrics(), self.read()
        if "kv_blocks" in now:  # the driver's engine
            m["running"].set(now["running"], tags=self.tags)
            m["waiting"].set(now["waiting"], tags=self.tags)
            m["usage"].set(now["kv_blocks_used"] / now["kv_blocks"], tags=self.tags)
            m["blocks_used"].set(now["kv_blocks_used"], tags=self.tags)
            m["blocks_cached"].set(now["kv_blocks_cached"], tags=self.tags)
            self._add(m["prefix_queries"], "prefix_queries", now["prefix_cache_query_tokens"])
            self._add(m["prefix_hits"], "prefix_hits", now["prefix_cache_hit_tokens"])
            self._add(m["preemptions"], "preemptions", now["preemptions"])
            self._add(m["prompt"], "prompt", now["prefill_tokens"] + now["prefix_cache_hit_tokens"])
            self._add(m["generated"], "generated", now["generated_tokens"])
            self._add(m["plan_s"], "plan_s", now.get("publish_s", 0.0))
        self._add(m["steps"], "steps", now["steps"])
        self._add(m["step_s"], "step_s", now["step_s"])

    def _add(self, counter: Counter, key: str, total: float) -> None:
        delta = total - self._last.get(key, 0.0)
        if delta > 0:
            counter.inc(delta, tags=self.tags)
        self._last[key] = total
