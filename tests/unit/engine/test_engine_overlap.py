"""The engine's overlap (async_scheduling) against its plain steps, on one engine each: overlapped
decodes name the last step's tokens instead of carrying them, and a stop found a step late costs
one dropped row and nothing else. (Every test in test_engine.py also runs in both modes.)"""
from __future__ import annotations

from test_engine import Driver, golden_model, greedy, random_prompts  # noqa: F401 (golden_model: a fixture)

from llama.engine.request import collect
from llama.engine.step_plan import sampled_token


def test_overlapped_decodes_read_their_inputs_on_the_device_and_a_stop_costs_one_dropped_row(golden_model):
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine

    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=23)[0]
    first = Driver(model, tok).run([greedy(prompt, 12)])[0]
    stop = tok.decode(first.token_ids[:6])[-2:]  # a stop string that ends it within its first 6 tokens
    runs = {}
    for overlap in (False, True):
        plans = []
        engine = Engine(model, tok, EngineConfig(max_batch_size=2, max_seq_len=96, async_scheduling=overlap),
                        publish=plans.append)
        deltas = []
        engine.submit("s", greedy(prompt, 12, stop=(stop,)), deltas.append)
        while engine.step():
            pass
        runs[overlap] = (collect(list(prompt), deltas), engine.stats.decode_tokens, plans)
    (sync, sync_rows, sync_plans), (over, over_rows, over_plans) = runs[False], runs[True]
    assert sync.finish_reason == over.finish_reason == "stop" and over.token_ids == sync.token_ids
    assert len(sync.token_ids) < 12
    assert over_rows == sync_rows + 1  # the stop is found a step late: that step's row is dropped
    assert not any(p.takes_sampled for p in sync_plans)
    decodes = [p for p in over_plans if p.segments and p.segments[0].length == 1]
    assert decodes and all(p.takes_sampled and p.tokens == (sampled_token(0),) for p in decodes)

