"""A gang cut into pipeline stages on in-process Ray (CPU, gloo): PP=2 (TP=1, 1 and 2 layers)
and PP=2 x TP=2 from Meta's golden files cut for 2 ranks give Meta's tokens and logprobs, with
chunked prefill, concurrent streams, seeded sampling and cancellation as at PP=1; each rank
holds and reads only its stage's layers, and GET /cluster says which."""
from __future__ import annotations

import asyncio
import time

import pytest

from llama.engine.request import GenerationRequest, SamplingParams
from tests.conftest import GOLDEN_CKPT, engine_idle, gang_config


def _start(pp: int, tp: int, **kw):
    from cluster.group import RankGroup

    kw = {"max_batch_size": 6, "cpus_per_rank": 0.5, "prefill_chunk": 16, "pipeline_parallel_size": pp, **kw}
    return RankGroup.start(gang_config(GOLDEN_CKPT, tp, **kw))


def _greedy(prompts, n: int, logprobs: bool = False) -> list[GenerationRequest]:
    return [GenerationRequest(tuple(p), SamplingParams(max_tokens=n, temperature=0, logprobs=0 if logprobs else None))
            for p in prompts]


def _seeded(prompts) -> list[GenerationRequest]:
    return [GenerationRequest(tuple(p), SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=40 + i))
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def seeded_at_pp1(ray_local, golden):
    """What a gang without a pipeline (MP=2) samples with seeds: the tokens each stage layout must give."""
    g = _start(1, 2)
    try:
        return [o.token_ids for o in g.generate(_seeded(golden["completions"]["prompt_token_ids"]))]
    finally:
        g.shutdown()


@pytest.fixture(scope="module")
def pp2xtp2(ray_local):
    """Asked to overlap, as on CUDA by default: in a pipeline the steps in flight, one per stage,
    take overlap's place (a sequence runs again once its token is back)."""
    g = _start(2, 2, async_scheduling=True)
    yield g
    g.shutdown()


@pytest.mark.parametrize("pp,tp,layers", [(2, 1, [1, 2]), (2, 2, None)], ids=["pp2-layers-1-2", "pp2xtp2"])
def test_stages_give_meta_tokens_and_logprobs_and_sample_as_one_stage_does(request, golden, seeded_at_pp1,
                                                                          pp, tp, layers):
    """(tests/unit/test_torchrun.py runs more splits through the library: P=3, an even P=2.)"""
    c = golden["completions"]
    # The uneven split's pool: 1,000 blocks of its larger stage's 2 layers (512 bytes a position on
    # the golden model, 2 KV heads of 16), so every stage holds it, the 1-layer driver's included.
    gb = 1000 * 16 * 512 / 2**30
    g = request.getfixturevalue("pp2xtp2") if tp == 2 else _start(pp, tp, pipeline_layers=layers, kv_cache_memory_gb=gb)
    try:
        out = g.generate(_greedy(c["prompt_token_ids"], c["max_gen_len"], logprobs=True))  # prefill in chunks of 16
        seeded = g.generate(_seeded(c["prompt_token_ids"]))
        info = asyncio.run(g.cluster_info())
    finally:
        if tp != 2:
            g.shutdown()
    assert [o.token_ids for o in out] == c["generated_token_ids"]
    for o, want in zip(out, c["results"]):
        assert o.text == want["generation"]
        assert max(abs(a - b) for a, b in zip(o.logprobs, want["logprobs"])) < 1e-4
    assert [o.token_ids for o in seeded] == seeded_at_pp1
    if layers is not None:
        assert info["engine"]["kv_blocks"] == 1000
    # each rank: its stage, its rank in the stage, its layers; it read only its own slices
    counts = layers or [2, 1]
    starts = [sum(counts[:s]) for s in range(pp)]
    assert (info["world_size"], info["pipeline_parallel_size"], info["model_parallel_size"]) == (pp * tp, pp, tp)
    assert [(r["rank"], r["stage"], r["tp_rank"], r["layers"]) for r in info["ranks"]] == [
        (s * tp + t, s, t, [starts[s], starts[s] + counts[s]]) for s in range(pp) for t in range(tp)]
    # the stages hold disjoint tensors: together one tensor-parallel rank's slices of the model
    whole = sum(r["load"]["total_bytes"] for r in info["ranks"] if r["tp_rank"] == 0)
    assert all(r["load"]["done_bytes"] == r["load"]["total_bytes"] < whole for r in info["ranks"])


def test_concurrent_streams_give_the_tokens_each_gives_alone_with_a_step_in_flight_per_stage(pp2xtp2, golden):
    import ray

    c = golden["completions"]
    prompts = [(p + p[1:] * k)[:60] for k, p in enumerate(c["prompt_token_ids"])]  # 2..60 tokens
    reqs = [_greedy([p], 6 + 4 * i)[0] for i, p in enumerate(prompts)]
    before = ray.get(pp2xtp2.actors[0].load.remote())
    together = pp2xtp2.generate(reqs)
    after = ray.get(pp2xtp2.actors[0].load.remote())
    alone = [pp2xtp2.generate([r])[0] for r in reqs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    # together, the driver launched most steps while the one before was still on the second stage
    steps, overlapped = after["steps"] - before["steps"], after["overlapped"] - before["overlapped"]
    assert overlapped > steps / 2, (steps, overlapped)


def test_rows_that_take_the_last_stages_token_and_rows_that_take_logits_share_steps(pp2xtp2, golden, seeded_at_pp1):
    """Greedy rows without logprobs come back from the last stage as their token alone
    (LOGITS_TOKEN); rows with logprobs or a draw as logits, in the same message."""
    c = golden["completions"]
    prompts = c["prompt_token_ids"]
    greedy, with_logprobs = _greedy(prompts, c["max_gen_len"]), _greedy(prompts, c["max_gen_len"], logprobs=True)
    seeded = _seeded(prompts)
    reqs = [(greedy, with_logprobs, seeded)[i % 3][i] for i in range(len(prompts))]
    out = pp2xtp2.generate(reqs)
    for i, o in enumerate(out):
        want = seeded_at_pp1[i] if i % 3 == 2 else c["generated_token_ids"][i]
        assert o.token_ids == want, i
        if i % 3 == 1:
            assert max(abs(a - b) for a, b in zip(o.logprobs, c["results"][i]["logprobs"])) < 1e-4


def test_a_dropped_stream_frees_its_slot_on_every_stage(pp2xtp2, golden):
    import ray

    aborted = ray.get(pp2xtp2.actors[0].load.remote())["aborted"]

    async def go():
        it = pp2xtp2.stream(_greedy([[1, 45, 74]], 90)[0])
        assert (await it.__anext__()).token_ids
        await it.aclose()  # the caller goes away

    asyncio.run(go())
    for _ in range(100):
        load = ray.get(pp2xtp2.actors[0].load.remote())
        if engine_idle(load):
            break
        time.sleep(0.05)
    assert engine_idle(load) and load["aborted"] == aborted + 1
    # the rows it held were freed on every stage too: the golden prompts run as before
    c = golden["completions"]
    assert [o.token_ids for o in pp2xtp2.generate(_greedy(c["prompt_token_ids"], c["max_gen_len"]))] == \
        c["generated_token_ids"]


@pytest.mark.parametrize("settings,says", [
    ({"pipeline_parallel_size": 4}, "more than the model's 3 layers"),
    ({"pipeline_parallel_size": 2, "pipeline_layers": [2, 2]}, "summing to the model's 3 layers"),
    ({"pipeline_parallel_size": 2, "pipeline_layers": [3]}, "a list of one count of layers"),
])
def test_a_split_the_model_cannot_take_is_refused_before_any_rank_starts(settings, says):
    with pytest.raises(ValueError, match=says):
        gang_config(GOLDEN_CKPT, 1, **settings)
