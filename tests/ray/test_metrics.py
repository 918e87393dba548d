"""Metrics on Ray's own Prometheus endpoint (cluster/metrics.py): after a known mix of requests
through a gang of two ranks, the counters equal what the clients saw (requests by finished
reason, time to first token observed once per request with tokens) and what the engine counted
(prompt and generated tokens); both ranks count the same steps; the gauges return to zero."""
from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest

from llama.distributed import free_port
from llama.engine.request import GenerationRequest, SamplingParams, collect
from tests.conftest import gang_config

_LINE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')


@pytest.fixture(scope="module")
def metrics_url():
    import ray

    port = free_port("127.0.0.1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        m = _LINE.match(line)
        if m and m.group(1).startswith("ray_llama_"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples, name: str, **labels) -> float:
    return sum(v for n, lb, v in samples if n == name and all(lb.get(k) == w for k, w in labels.items()))


def test_counts_match_what_clients_saw_and_the_engine_counted(metrics_url, tiny_ckpts):
    from cluster.group import RankGroup

    group = RankGroup.start(gang_config(tiny_ckpts["gqa1"], 2, max_batch_size=4, cpus_per_rank=1.0))
    try:
        def greedy(n: int, **kw) -> GenerationRequest:
            # 20 tokens: a full block of 16, which each request after the first finds cached
            return GenerationRequest((1, 5, 9, 30, *range(40, 56)), SamplingParams(max_tokens=n, temperature=0, **kw))

        first = group.generate([greedy(20)])[0]
        stop = first.text[4:7]
        outs = group.generate([greedy(5), greedy(6), greedy(20, stop=(stop,))])

        async def abandon() -> None:  # the client goes away after the first tokens
            stream = group.stream(greedy(60))
            await stream.__anext__()
            await stream.aclose()

        asyncio.run(abandon())
        time.sleep(1.0)
        info = asyncio.run(group.cluster_info())["engine"]
        want = {"length": 3, "stop": 1, "abort": 1}
        assert [o.finish_reason for o in outs] == ["length", "length", "stop"] and first.finish_reason == "length"
        deadline = time.monotonic() + 30
        while True:  # Ray reports every 0.5 s here; the rank samplers every 1 s
            s = scrape(metrics_url)
            got = {r: total(s, "ray_llama_request_success_total", finished_reason=r) for r in want}
            steps = [total(s, "ray_llama_rank_steps_total", rank=r) for r in ("0", "1")]
            if (got == want and total(s, "ray_llama_generation_tokens_total") == info["generated_tokens"]
                    and steps[0] == steps[1] == info["steps"] or time.monotonic() > deadline):
                break
            time.sleep(0.5)
    finally:
        group.shutdown()
    assert got == want
    assert total(s, "ray_llama_generation_tokens_total") == info["generated_tokens"]  # the warm-up's token too
    assert total(s, "ray_llama_prompt_tokens_total") == info["prefill_tokens"] + info["prefix_cache_hit_tokens"]
    assert steps[0] == steps[1] == info["steps"] > 0  # every rank ran every step
    assert total(s, "ray_llama_time_to_first_token_seconds_count") == 5  # each request that got tokens
    assert total(s, "ray_llama_request_queue_time_seconds_count") == 5  # each got a slot
    assert total(s, "ray_llama_num_requests_running") == total(s, "ray_llama_num_requests_waiting") == 0
    assert total(s, "ray_llama_prefix_cache_hits_total") == info["prefix_cache_hit_tokens"] == 16 * 4  # all but the first
    assert total(s, "ray_llama_prefix_cache_queries_total") == info["prefix_cache_query_tokens"] > 0
    assert total(s, "ray_llama_kv_cache_blocks_used") == 0 and total(s, "ray_llama_kv_cache_usage_perc") == 0
    assert total(s, "ray_llama_kv_cache_blocks_cached") == info["kv_blocks_cached"] > 0
    assert total(s, "ray_llama_num_preemptions_total") == info["preemptions"] == 0
    assert total(s, "ray_llama_plan_broadcast_seconds_total") > 0 and total(s, "ray_llama_rank_step_seconds_total") > 0
