"""The paged KV cache changes no token: Meta's golden outputs with blocks of any size shuffled
over the pool, with the prompt found in the prefix cache, and under forced preemption (a pool
too small for the batch); seeded draws the same with and without preemption; a request that
could never fit is refused at submission; and after a thousand mixed requests (shared
prefixes, n > 1, echo, penalties, cancellations, deadlines, preemptions) every block is free or
cached and the pool's counts add up. Each runs with and without overlap (test_engine.step_mode)."""
from __future__ import annotations

import random

import pytest
from test_engine import Driver, golden_model, greedy, random_prompts, step_mode  # noqa: F401 (fixtures)

from llama.engine.request import GenerationRequest, SamplingParams


def _golden_requests(golden) -> list[GenerationRequest]:
    c = golden["completions"]
    return [greedy(p, c["max_gen_len"], logprobs=0) for p in c["prompt_token_ids"]]


def _assert_golden(outs, golden) -> None:
    c = golden["completions"]
    assert [o.token_ids for o in outs] == c["generated_token_ids"]
    for o, want in zip(outs, c["results"]):
        got = o.logprobs[: len(want["logprobs"])]
        assert all(abs(a - b) <= 1e-4 for a, b in zip(got, want["logprobs"]))


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_golden_tokens_with_blocks_of_any_size_shuffled_over_the_pool(golden_model, golden, block_size):
    model, tok = golden_model
    d = Driver(model, tok, block_size=block_size, max_batch_size=golden["max_batch_size"])
    d.engine.pool.shuffle(random.Random(block_size))
    _assert_golden(d.run(_golden_requests(golden)), golden)
    d.engine.pool.check()
    assert d.engine.pool.used == 0


def test_golden_tokens_when_the_prompts_are_found_in_the_prefix_cache(golden_model, golden):
    model, tok = golden_model
    d = Driver(model, tok, block_size=4, max_batch_size=golden["max_batch_size"])
    first = d.run(_golden_requests(golden))
    again = d.run(_golden_requests(golden))
    _assert_golden(first, golden)
    _assert_golden(again, golden)
    plens = [len(p) for p in golden["completions"]["prompt_token_ids"]]
    # every full block before the last prompt token, and the generated ones the first run cached too
    assert [o.cached_tokens for o in first] == [0] * len(plens)
    assert all(o.cached_tokens >= (n - 1) // 4 * 4 for o, n in zip(again, plens))
    assert d.engine.load()["prefix_cache_hit_tokens"] == sum(o.cached_tokens for o in again)


def test_golden_tokens_under_forced_preemption(golden_model, golden):
    model, tok = golden_model
    c = golden["completions"]
    longest = max(len(p) for p in c["prompt_token_ids"]) + c["max_gen_len"]
    blocks = -(-longest // 4) + 2  # the longest request fits alone, the batch does not
    d = Driver(model, tok, num_blocks=blocks, block_size=4, max_batch_size=golden["max_batch_size"], prefill_chunk=8)
    _assert_golden(d.run(_golden_requests(golden)), golden)
    load = d.engine.load()
    assert load["preemptions"] >= 3 and load["kv_blocks"] == blocks and load["kv_blocks_used"] == 0
    d.engine.pool.check()


def test_seeded_draws_are_the_same_with_and_without_preemption(golden_model):
    model, tok = golden_model
    prompts = random_prompts(6, tok.n_words, seed=3, lo=10, hi=30)
    requests = [GenerationRequest(tuple(p), SamplingParams(max_tokens=24, temperature=0.8, seed=i)) for i, p in enumerate(prompts)]
    roomy = Driver(model, tok, block_size=4).run(requests)
    tight_driver = Driver(model, tok, num_blocks=16, block_size=4, prefill_chunk=8)
    tight = tight_driver.run(requests)
    assert tight_driver.engine.load()["preemptions"] > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]


def test_a_request_that_could_never_fit_is_refused_naming_its_blocks(golden_model):
    model, tok = golden_model
    d = Driver(model, tok, num_blocks=5, block_size=4)
    with pytest.raises(ValueError, match=r"need 6 KV blocks of 4 positions, and this server's cache holds 5"):
        d.engine.submit("big", greedy(list(range(1, 17)), 8), print)
    d.run([greedy(list(range(1, 17)), 4)])  # 20 positions: 5 blocks, it fits


def test_a_thousand_mixed_requests_leave_every_block_free_or_cached(golden_model):
    model, tok = golden_model
    rng = random.Random(7)
    d = Driver(model, tok, num_blocks=40, block_size=4, max_batch_size=6, prefill_chunk=12, max_waiting=10_000)
    systems = random_prompts(4, tok.n_words, seed=8, lo=8, hi=20)  # shared prefixes
    submitted = 0
    for wave in range(25):
        ids = []
        for _ in range(40):
            prompt = rng.choice(systems) + random_prompts(1, tok.n_words, seed=rng.randrange(10**6), lo=1, hi=12)[0][1:]
            kind = rng.random()
            params = SamplingParams(
                max_tokens=rng.randint(1, 12), temperature=0 if kind < 0.5 else 0.7, seed=rng.randrange(100),
                logprobs=1 if kind > 0.9 else None, echo=kind > 0.95,
                presence_penalty=0.5 if 0.8 < kind < 0.85 else 0.0)
            timeout = 1e-9 if rng.random() < 0.03 else None
            rid = f"w{wave}-{submitted}"
            d.submit(rid, GenerationRequest(tuple(prompt), params, timeout_s=timeout))
            ids.append(rid)
            submitted += 1
        for _ in range(rng.randint(1, 6)):
            d.engine.step()
        for rid in rng.sample(ids, 4):
            d.engine.abort(rid)  # some before they start, some midway, some already done
        d.drain()
    load = d.engine.load()
    assert submitted == 1000 and load["finished"] == 1000
    assert all(d.deltas[r] and d.deltas[r][-1].finish_reason for r in d.deltas)
    assert load["aborted"] > 0 and load["timed_out"] > 0 and load["preemptions"] > 0
    assert load["prefix_cache_hit_tokens"] > 0
    assert not d.engine.scheduler.running and not d.engine.scheduler.waiting
    d.engine.pool.check()
    assert load["kv_blocks_used"] == 0 and load["kv_blocks_cached"] + load["kv_blocks_free"] == load["kv_blocks"] == 40
