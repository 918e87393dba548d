"""A gang of rank actors on in-process Ray (CPU, gloo): MP=2 (and 4) against MP=1 and Meta's
reference, exact greedy tokens; the driver's continuous engine streams concurrent requests,
answers control calls while it computes, and frees the slot of a stream its caller drops;
caller mistakes leave the gang healthy; rank failure does not."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time

import jsonschema
import pytest

from cluster.errors import (
    GangStartError,
    OverloadedError,
    PlacementImpossibleError,
    PlacementTimeoutError,
    RankFailedError,
)
from cluster.start import STAGES
from llama.engine.grammar import Grammar
from llama.engine.request import GenerationRequest, SamplingParams, collect
from llama.model.shared_memory_group import shared_memory_supported
from tests.conftest import GOLDEN_CKPT, engine_idle, gang_config
from tests.json_schemas import random_schema


def _start(ray_local, ckpt, mp: int, **kw):
    from cluster.group import RankGroup

    kw = {"max_batch_size": 6, "cpus_per_rank": 1.0, "prefill_chunk": 16, **kw}
    return RankGroup.start(gang_config(ckpt, mp, **kw))


def _greedy(prompts: list[list[int]], n: int, logprobs: bool = False) -> list[GenerationRequest]:
    lp = 0 if logprobs else None
    return [GenerationRequest(tuple(p), SamplingParams(max_tokens=n, temperature=0, logprobs=lp)) for p in prompts]


@pytest.fixture(scope="module")
def golden_mp2(ray_local):
    g = _start(ray_local, GOLDEN_CKPT, 2, max_waiting=256)  # room for 200 requests at once, all queued in the engine
    yield g
    g.shutdown()


def test_golden_at_mp2_matches_meta_reference(golden_mp2, golden):
    c = golden["completions"]
    out = golden_mp2.generate(_greedy(c["prompt_token_ids"], c["max_gen_len"], logprobs=True))
    assert [o.token_ids for o in out] == c["generated_token_ids"]
    for o, want in zip(out, c["results"]):
        assert o.text == want["generation"]
        assert max(abs(a - b) for a, b in zip(o.logprobs, want["logprobs"])) < 1e-4


def test_golden_at_mp2_under_forced_preemption(ray_local, golden):
    """Both ranks apply the same table changes when the driver preempts (a freed row taken again
    in the same plan, blocks evicted from the prefix cache and given out anew): Meta's tokens,
    twice over (the second pass on whatever the first left cached). The choices-of-one-prompt
    test below takes a prompt from the prefix cache at MP=2."""
    from llama.engine.kv_memory import GIB, token_nbytes
    from llama.model.args import ModelArgs

    c = golden["completions"]
    args = ModelArgs.from_json(GOLDEN_CKPT / "params.json")
    blocks = 20  # of 4 positions: the longest request (65 positions) fits alone, the six together do not
    g = _start(ray_local, GOLDEN_CKPT, 2, block_size=4, prefill_chunk=8,
               kv_cache_memory_gb=blocks * 4 * token_nbytes(args, 2, 4) / GIB)
    try:
        first = g.generate(_greedy(c["prompt_token_ids"], c["max_gen_len"], logprobs=True))
        again = g.generate(_greedy(c["prompt_token_ids"], c["max_gen_len"], logprobs=True))
        engine = asyncio.run(g.cluster_info())["engine"]
    finally:
        g.shutdown()
    for out in (first, again):
        assert [o.token_ids for o in out] == c["generated_token_ids"]
        for o, want in zip(out, c["results"]):
            assert max(abs(a - b) for a, b in zip(o.logprobs, want["logprobs"])) < 1e-4
    assert engine["kv_blocks"] == blocks and engine["preemptions"] > 0
    assert engine_idle(engine)


def test_seeded_sampling_same_on_every_rank_and_alone(golden_mp2, golden):
    c = golden["completions"]
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=40 + i))
            for i, p in enumerate(c["prompt_token_ids"])]
    together = golden_mp2.generate(reqs)
    alone = [golden_mp2.generate([r])[0] for r in reqs[:3]]
    assert [o.token_ids for o in together[:3]] == [o.token_ids for o in alone]
    assert [o.token_ids for o in together] != c["generated_token_ids"]


def test_caller_mistake_is_a_value_error_and_the_gang_survives(golden_mp2, golden):
    with pytest.raises(ValueError, match="max_seq_len"):
        golden_mp2.generate(_greedy([[1] * 200], 4))
    with pytest.raises(ValueError, match="vocabulary"):
        golden_mp2.generate(_greedy([[1, 5000]], 4))
    asyncio.run(golden_mp2.check_health())
    c = golden["completions"]
    out = golden_mp2.generate(_greedy(c["prompt_token_ids"][:1], 4))
    assert out[0].token_ids == c["generated_token_ids"][0][:4]


def test_more_requests_than_max_batch_size_are_batched(golden_mp2, golden):
    c = golden["completions"]
    prompts = c["prompt_token_ids"] * 2  # 12 > max_batch_size 6
    out = golden_mp2.generate(_greedy(prompts, 6))
    assert [o.token_ids for o in out] == [g[:6] for g in c["generated_token_ids"]] * 2


def test_concurrent_streams_give_the_tokens_each_gives_alone(golden_mp2, golden):
    c = golden["completions"]
    prompts = [(p + p[1:] * k)[:60] for k, p in enumerate(c["prompt_token_ids"])]  # 2..60 tokens
    reqs = [_greedy([p], 6 + 4 * i)[0] for i, p in enumerate(prompts)]
    together = golden_mp2.generate(reqs)  # 6 concurrent Ray calls into one engine
    alone = [golden_mp2.generate([r])[0] for r in reqs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_concurrent_streams_come_back_on_one_stream_batched_and_it_closes_with_its_loop(golden_mp2, golden):
    """The tokens of all of a loop's requests come on one Ray stream from the driver, each
    step's deltas in one message (cluster/outbox.py), not one stream per request."""
    import ray

    driver = golden_mp2.actors[0]
    before = ray.get(driver.load.remote())
    prompts = golden["completions"]["prompt_token_ids"]

    async def go():
        started = [asyncio.Event() for _ in prompts]

        async def one(r, started):
            out = []
            async for d in golden_mp2.stream(r):
                out.append(d)
                started.set()
            return out

        tasks = [asyncio.ensure_future(one(r, e)) for r, e in zip(_greedy(prompts, 40), started)]
        # Asked once every request has its first token (not after a fixed wait, by which a fast
        # CPU had finished all of them): 40 tokens are far more steps than one Ray call takes.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        during = await driver.load.remote()
        return await asyncio.gather(*tasks), during

    streams, during = asyncio.run(go())
    after = ray.get(driver.load.remote())
    assert during["running"] > 1 and during["delta_streams"] == 1  # one stream for them all
    deltas = after["deltas_sent"] - before["deltas_sent"]
    messages = after["delta_messages"] - before["delta_messages"]
    steps = after["steps"] - before["steps"]
    assert deltas == sum(len(s) for s in streams) >= 40 * len(prompts) // 2
    assert messages <= steps  # a step's deltas in one message, never split
    assert messages < deltas / 2  # batched: at most half as many messages as deltas
    for _ in range(100):  # closed with asyncio.run's loop (a message on its way)
        if ray.get(driver.load.remote())["delta_streams"] == 0:
            break
        time.sleep(0.05)
    assert ray.get(driver.load.remote())["delta_streams"] == 0
    assert [collect(list(p), s).token_ids for p, s in zip(prompts, streams)] == \
        [o.token_ids for o in golden_mp2.generate(_greedy(prompts, 40))]


def test_a_dropped_stream_frees_its_slot_and_control_calls_answer_meanwhile(golden_mp2):
    import ray

    aborted = ray.get(golden_mp2.actors[0].load.remote())["aborted"]

    async def go():
        it = golden_mp2.stream(_greedy([[1, 45, 74]], 90)[0])
        first = await it.__anext__()
        assert first.token_ids
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*[a.ping.remote() for a in golden_mp2.actors])  # while it decodes
        ping_s = asyncio.get_running_loop().time() - t0
        load = await golden_mp2.actors[0].load.remote()
        await it.aclose()  # the caller goes away
        return ping_s, load

    ping_s, load = asyncio.run(go())
    assert ping_s < 5 and load["running"] == 1
    for _ in range(100):
        load = ray.get(golden_mp2.actors[0].load.remote())
        if engine_idle(load):
            break
        import time

        time.sleep(0.05)
    assert engine_idle(load)
    assert load["aborted"] == aborted + 1  # freed by the abort, not by running to its end


def test_cluster_info_shows_each_rank(golden_mp2):
    info = asyncio.run(golden_mp2.cluster_info())
    assert info["world_size"] == 2 and info["backend"] == "gloo" and info["device"] == "cpu"
    # both ranks on this one machine: the model's collectives through shared memory, not gloo's sockets
    assert info["collectives"] == ("shared memory" if shared_memory_supported() else "gloo")
    if shared_memory_supported():  # the warm-up step at least; every call fitted its slot
        assert info["engine"]["shared_memory_calls"] > 0 and info["engine"]["shared_memory_fallbacks"] == 0
    assert [r["rank"] for r in info["ranks"]] == [0, 1]
    assert len({r["pid"] for r in info["ranks"]}) == 2
    assert all(r["node_ip"] and r["node_id"] for r in info["ranks"])
    # how the start went, stage by stage, and each rank's load: every byte of its slices read
    assert [s["stage"] for s in info["start"]["finished_stages"]] == list(STAGES) and info["start"]["stage"] == "ready"
    assert all(r["load"]["done_bytes"] == r["load"]["total_bytes"] > 0 for r in info["ranks"])
    assert all(r["weights_from"] == "local files" for r in info["ranks"])
    # threads_per_rank null: this machine's cores shared by the gang's two ranks on it
    assert [r["threads"] for r in info["ranks"]] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2


def test_a_stage_past_its_deadline_stops_the_start_naming_the_stage_and_the_fix(ray_local, tiny_ckpts):
    free = ray_local.available_resources().get("CPU", 0)
    with pytest.raises(GangStartError, match="stage 'weights' .5 of 6.*within its 0.001s deadline: raise "
                                             "parallel.load_timeout_s"):
        _start(ray_local, tiny_ckpts["gqa1"], 2, load_timeout_s=0.001)
    for _ in range(100):  # its actors and placement group are released (Ray does it in the background)
        if ray_local.available_resources().get("CPU", 0) == free:
            break
        time.sleep(0.1)
    assert ray_local.available_resources().get("CPU", 0) == free


def test_a_gang_that_fits_but_finds_the_cpus_taken_waits_then_says_what_is_free(ray_local, tiny_ckpts, golden_mp2):
    # 6 CPUs in all, golden_mp2 holds 2: two bundles of 2.5 could fit an empty cluster, not this one
    with pytest.raises(PlacementTimeoutError, match=r"within 1s: 2 bundles, PACK.*free now, in all: \{CPU: 4\}"):
        _start(ray_local, tiny_ckpts["gqa1"], 2, cpus_per_rank=2.5, placement_timeout_s=1)


def test_a_gang_this_cluster_can_never_hold_is_refused_at_once(ray_local, tiny_ckpts):
    from deploy.app import build_app

    with pytest.raises(PlacementImpossibleError, match=r"can never place.*3 bundles, PACK.*\{CPU: 6\}"):
        build_app({"ckpt_dir": str(tiny_ckpts["gqa1"]), "replica_cpus": 1,
                   "parallel": {"model_parallel_size": 2, "cpus_per_rank": 4, "device": "cpu"}})
    with pytest.raises(PlacementImpossibleError, match="2 bundles, STRICT_SPREAD"):
        _start(ray_local, tiny_ckpts["gqa1"], 2, placement_strategy="STRICT_SPREAD")  # one node


def test_different_prompt_lengths_gqa_mp1_vs_mp2_resharded(ray_local, tiny_ckpts):
    """A GQA model cut for 1 rank, served at MP=1 and resharded to MP=2: same tokens, same logprobs.
    The MP=2 gang overlaps its steps, as it does on GPUs: its follower takes each decode's input
    from the driver's sampled tokens, broadcast over the gang's group. At MP=2 the collectives go
    through shared memory, and with parallel.shared_memory false through gloo: the same bits."""
    prompts = [[1, 5], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 100, 7, 9], [1] + list(range(200, 230))]
    results, ways = {}, {}
    for mp, shared in ((1, True), (2, True), (2, False)):
        g = _start(ray_local, tiny_ckpts["gqa1"], mp, async_scheduling=mp == 2, shared_memory=shared)
        try:
            results[mp, shared] = g.generate(_greedy(prompts, 24, logprobs=True))
            ways[mp, shared] = asyncio.run(g.cluster_info())["collectives"]
        finally:
            g.shutdown()
    assert ways == {(1, True): "gloo", (2, True): "shared memory" if shared_memory_supported() else "gloo",
                    (2, False): "gloo"}
    one, two = results[1, True], results[2, True]
    assert [o.token_ids for o in one] == [o.token_ids for o in two]
    assert all(len(o.token_ids) == 24 for o in one)  # random weights: no EOS expected
    for a, b in zip(one, two):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    # two addends sum alike in either order: shared memory and gloo give the same logprobs, bit for bit
    assert [(o.token_ids, o.logprobs) for o in two] == [(o.token_ids, o.logprobs) for o in results[2, False]]


# vLLM's sampling extensions and a grammar (structured outputs) on some of the batch's requests (tests/unit/engine/test_engine_vllm_sampling.py
# checks what each does); the rest plain.
VLLM_EXTENSIONS = [dict(min_p=0.2), dict(repetition_penalty=1.5, presence_penalty=0.5), dict(min_tokens=12,
                   stop_token_ids=(40, 41)), dict(allowed_token_ids=tuple(range(30, 90))),
                   dict(bad_words=((50,), (60, 61))), dict(grammar=Grammar("regex", "[a-z ]{3,30}")),
                   dict(ignore_eos=True), {}]


def test_seeded_sampling_same_at_mp1_and_mp2_alone_and_in_a_batch_of_8(ray_local, tiny_ckpts):
    prompts = [[1] + list(range(10 + 7 * i, 14 + 11 * i)) for i in range(8)]
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7 + i,
                                                       **VLLM_EXTENSIONS[i]))
            for i, p in enumerate(prompts)]
    # and 8 generated JSON schemas sampled at temperature 1: the same JSON at both sizes
    rng = random.Random(2027)
    schemas = [random_schema(rng) for _ in range(8)]
    json_reqs = [GenerationRequest((1, 20 + i, 30 + i), SamplingParams(max_tokens=88, temperature=1.0, seed=i,
                                                                       grammar=Grammar.json_schema(s)))
                 for i, s in enumerate(schemas)]
    results, json_out = {}, {}
    for mp in (1, 2):
        g = _start(ray_local, tiny_ckpts["gqa2"], mp, max_batch_size=8)
        try:
            batch = g.generate(reqs)
            alone = [g.generate([r])[0] for r in reqs[:3]]
            json_out[mp] = g.generate(json_reqs)
        finally:
            g.shutdown()
        assert [o.token_ids for o in alone] == [o.token_ids for o in batch[:3]]
        results[mp], texts = [o.token_ids for o in batch], [o.text for o in batch]
    assert results[1] == results[2]
    assert len({tuple(t) for t in results[1]}) == 8
    assert set(results[1][3]) <= set(range(30, 90)) and len(results[1][2]) == 12
    assert re.fullmatch("[a-z ]{3,30}", texts[5]), texts[5]
    assert [o.token_ids for o in json_out[1]] == [o.token_ids for o in json_out[2]]
    for schema, o in zip(schemas, json_out[2]):
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)


def test_mp4_from_one_shard(ray_local, tiny_ckpts):
    prompts = [[1, 5, 6], [1, 40, 41, 42, 43, 44]]
    results = {}
    for mp in (1, 4):
        g = _start(ray_local, tiny_ckpts["mha1"], mp, cpus_per_rank=0.5)
        try:
            results[mp] = [o.token_ids for o in g.generate(_greedy(prompts, 16))]
        finally:
            g.shutdown()
    assert results[1] == results[4]


def test_forcing_nccl_on_cpu_says_what_to_do(ray_local, tiny_ckpts):
    with pytest.raises(Exception, match="nccl.*(no NCCL|needs CUDA).*gloo"):
        _start(ray_local, tiny_ckpts["gqa1"], 2, backend="nccl")


def test_split_the_heads_do_not_allow_is_a_value_error(ray_local, tiny_ckpts):
    with pytest.raises(ValueError, match="cannot be split into 4"):
        _start(ray_local, tiny_ckpts["gqa1"], 4, cpus_per_rank=0.5)


def test_beyond_running_and_waiting_a_request_is_refused_at_once_and_later_ones_run(ray_local, tiny_ckpts):
    g = _start(ray_local, tiny_ckpts["gqa1"], 2, max_batch_size=1, max_waiting=1)

    async def scenario():
        long = [asyncio.ensure_future(_collect(g, _greedy([[1, 2, 3]], 60)[0])) for _ in range(2)]
        while True:  # both admitted: one running, one waiting (each runs 60 steps, one after the other)
            engine = (await g.cluster_info())["engine"]
            if engine["running"] == 1 and engine["waiting"] == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="max_batch_size 1 running \\+ max_waiting 1 waiting"):
            await _collect(g, _greedy([[1, 2]], 2)[0])
        done = await asyncio.gather(*long)
        again = await _collect(g, _greedy([[1, 2]], 2)[0])  # room again: it runs
        return done, again

    try:
        done, again = asyncio.run(scenario())
        assert [len(o.token_ids) for o in done] == [60, 60] and len(again.token_ids) == 2
        assert asyncio.run(g.cluster_info())["engine"]["aborted"] == 0  # the refused one never entered
    finally:
        g.shutdown()


async def _collect(g, request: GenerationRequest):
    return collect(list(request.prompt_tokens), [d async for d in g.stream(request)])


def test_a_dead_rank_makes_the_gang_unhealthy(ray_local, tiny_ckpts):
    g = _start(ray_local, tiny_ckpts["gqa1"], 2)
    try:
        asyncio.run(g.check_health())
        ray_local.kill(g.actors[1])  # asynchronous: a ping sent at once may still be answered
        deadline = time.monotonic() + 30
        with pytest.raises(RankFailedError):
            while time.monotonic() < deadline:
                asyncio.run(g.check_health())
                time.sleep(0.1)
        with pytest.raises(RankFailedError, match="must be replaced"):
            g.generate(_greedy([[1, 2]], 2))
    finally:
        g.shutdown()


def test_a_request_admitted_midway_at_mp2_gives_its_tokens_alone(golden_mp2, golden):
    c = golden["completions"]
    long_req, late_req = _greedy([c["prompt_token_ids"][0]], 40)[0], _greedy([c["prompt_token_ids"][2]], 12)[0]

    async def go():
        first = golden_mp2.stream(long_req)
        got = [await first.__anext__() for _ in range(3)]  # the first request is decoding
        late = collect(list(late_req.prompt_tokens), [d async for d in golden_mp2.stream(late_req)])
        got += [d async for d in first]
        return got, late

    got, late = asyncio.run(go())
    assert late.token_ids == golden_mp2.generate([late_req])[0].token_ids
    assert [t for d in got for t in d.token_ids] == golden_mp2.generate([long_req])[0].token_ids


def test_no_slot_leaks_after_200_mixed_requests_at_mp2(golden_mp2, golden):
    import random

    rng = random.Random(3)
    prompts = golden["completions"]["prompt_token_ids"]

    async def one(i: int):
        p = SamplingParams(max_tokens=rng.randrange(1, 8), temperature=0 if i % 2 else 0.7, seed=i,
                           stop=("e",) if i % 5 == 0 else (), logprobs=2 if i % 7 == 0 else None, echo=i % 7 == 0)
        req = GenerationRequest(tuple(prompts[i % len(prompts)]), p, timeout_s=0.0 if i % 13 == 0 else None)
        if i % 4 == 0:  # the caller leaves after its first delta
            it = golden_mp2.stream(req)
            await it.__anext__()
            await it.aclose()
            return "left"
        return [d async for d in golden_mp2.stream(req)][-1].finish_reason

    async def go():
        return await asyncio.gather(*(one(i) for i in range(200)))

    import time

    import ray

    aborted = ray.get(golden_mp2.actors[0].load.remote())["aborted"]
    reasons = asyncio.run(go())
    assert set(reasons) >= {"left", "timeout", "length"} and None not in reasons

    for _ in range(100):
        load = ray.get(golden_mp2.actors[0].load.remote())
        if engine_idle(load):
            break
        time.sleep(0.05)
    assert engine_idle(load)
    assert load["aborted"] > aborted  # some callers left before their request ended
    asyncio.run(golden_mp2.check_health())


def test_choices_of_one_prompt_share_its_prefill_on_every_rank(golden_mp2, golden):
    import ray

    prompt = golden["completions"]["prompt_token_ids"][2]  # 33 tokens
    reqs = [GenerationRequest(tuple(prompt), SamplingParams(max_tokens=8, temperature=1.0, seed=60 + i)) for i in range(4)]
    hits = ray.get(golden_mp2.actors[0].load.remote())["prefix_cache_hit_tokens"]
    together = golden_mp2.generate(reqs)
    # the first choice's blocks (2 full ones of 16) serve the other three, on both ranks
    assert [o.cached_tokens for o in together[1:]] == [32] * 3
    assert ray.get(golden_mp2.actors[0].load.remote())["prefix_cache_hit_tokens"] == hits + sum(o.cached_tokens for o in together)
    alone = [golden_mp2.generate([r])[0] for r in reqs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
