"""The continuous-batching engine in one process (MP=1, no Ray): exact greedy tokens against
each request run alone, against a cache-free decode loop and against Meta's reference; mid-way
admission; chunked prefill that never stalls decoding; seeded sampling whatever the batch;
stop strings, echo, logprobs with alternatives; cancellation, deadlines, and no slot leaks."""
from __future__ import annotations

import random

import pytest
import torch

from llama.engine.request import GenerationOutput, GenerationRequest, SamplingParams, StreamDelta, collect
from tests.conftest import GOLDEN_CKPT


class Driver:
    """Runs an Engine on the test's thread: submit, then step until idle. Every test that uses it
    runs twice (`step_mode`): each step read back at once, and overlapped (step N read back after
    step N+1 is planned and launched, its decodes taking step N's tokens on the device)."""

    overlap = False

    def __init__(self, model, tokenizer, num_blocks: int | None = None, **config):
        from llama.engine.config import EngineConfig
        from llama.engine.core import Engine

        self.engine = Engine(model, tokenizer, EngineConfig(**{"max_batch_size": 4, "max_seq_len": 96, "prefill_chunk": 16,
                                                               "async_scheduling": Driver.overlap, **config}),
                             num_blocks=num_blocks)
        self.deltas: dict[str, list] = {}
        self.requests: dict[str, GenerationRequest] = {}

    def submit(self, rid: str, request: GenerationRequest) -> None:
        self.deltas[rid] = []
        self.requests[rid] = request
        self.engine.submit(rid, request, self.deltas[rid].append)

    def drain(self) -> int:
        steps = 0
        while self.engine.step():
            steps += 1
        return steps

    def output(self, rid: str) -> GenerationOutput:
        return collect(list(self.requests[rid].prompt_tokens), self.deltas[rid])

    def run(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        base = len(self.deltas)
        for i, r in enumerate(requests):
            self.submit(f"r{base + i}", r)
        self.drain()
        return [self.output(f"r{base + i}") for i in range(len(requests))]


@pytest.fixture(params=["sync", "overlap"], autouse=True)
def step_mode(request):
    Driver.overlap = request.param == "overlap"
    yield request.param
    Driver.overlap = False


@pytest.fixture(scope="module")
def golden_model(mp1, golden):
    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer

    info = inspect_checkpoint(GOLDEN_CKPT)
    model = Transformer(info.args, golden["max_seq_len"])
    load_into(model, info, 0, 1)
    return model, load_tokenizer(info.tokenizer_path)


def greedy(prompt, n: int, **kw) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(max_tokens=n, temperature=0, **kw))


def random_prompts(count: int, vocab: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(count)]


def test_reproduces_meta_reference_tokens_and_logprobs(golden_model, golden):
    model, tok = golden_model
    c = golden["completions"]
    out = Driver(model, tok).run([greedy(p, c["max_gen_len"], logprobs=0) for p in c["prompt_token_ids"]])
    assert [o.token_ids for o in out] == c["generated_token_ids"]
    for o, want in zip(out, c["results"]):
        assert o.text == want["generation"]
        assert max(abs(a - b) for a, b in zip(o.logprobs, want["logprobs"])) < 1e-4


def test_echo_prompt_logprobs_match_the_reference_across_prefill_chunks(golden_model, golden):
    model, tok = golden_model
    e = golden["completions_echo"]
    prompts = [tok.encode(p, bos=True, eos=False) for p in e["prompts"]]
    out = Driver(model, tok, prefill_chunk=3).run([greedy(p, e["max_gen_len"], logprobs=2, echo=True) for p in prompts])
    for o, want in zip(out, e["results"]):
        lps = o.prompt_logprobs + o.logprobs
        assert len(lps) == len(want["logprobs"])
        assert max(abs(a - b) for a, b in zip(lps, want["logprobs"])) < 1e-4
        assert o.prompt_top_logprobs[0] == [] and all(len(t) == 2 for t in o.prompt_top_logprobs[1:])


def test_concurrent_requests_give_the_tokens_each_gives_alone(golden_model):
    model, tok = golden_model
    prompts = random_prompts(12, tok.n_words, seed=7)
    lengths = [5 + 3 * i for i in range(12)]
    reqs = [greedy(p, n) for p, n in zip(prompts, lengths)]
    together = Driver(model, tok).run(reqs)  # 12 requests through 4 slots
    for r, o in zip(reqs, together):
        alone = Driver(model, tok, max_batch_size=1, prefill_chunk=64).run([r])[0]
        assert o.token_ids == alone.token_ids
        assert o.finish_reason == alone.finish_reason


def test_matches_a_greedy_loop_that_recomputes_every_position(golden_model):
    """No cache reuse, no chunks, no slots shared: each token from a fresh forward over the
    whole sequence so far (the slow, obviously right way)."""
    from llama.engine.runner import forward_rows

    model, tok = golden_model
    reqs = [greedy(p, 20) for p in random_prompts(6, tok.n_words, seed=8)]
    engine = Driver(model, tok).run(reqs)
    for r, o in zip(reqs, engine):
        seq = list(r.prompt_tokens)
        with torch.inference_mode():
            while len(seq) < len(r.prompt_tokens) + 20:
                logits = forward_rows(model, [seq])
                nxt = int(torch.argmax(logits[-1]))
                if nxt == tok.eos_id:
                    break
                seq.append(nxt)
        assert o.token_ids == seq[len(r.prompt_tokens):]
        assert o.text == tok.decode(o.token_ids)


def test_request_admitted_midway_gives_the_same_tokens(golden_model):
    model, tok = golden_model
    p = random_prompts(3, tok.n_words, seed=9)
    d = Driver(model, tok)
    d.submit("a", greedy(p[0], 30))
    d.submit("b", greedy(p[1], 30))
    for _ in range(7):
        d.engine.step()
    assert len(d.deltas["a"]) > 3 and d.deltas["a"][-1].finish_reason is None  # a is mid-decode
    d.submit("c", greedy(p[2], 20))
    d.drain()
    alone = Driver(model, tok).run([greedy(p[2], 20)])[0]
    assert d.output("c").token_ids == alone.token_ids


def test_long_prompt_is_chunked_and_does_not_stall_decoding(golden_model):
    model, tok = golden_model
    short, long_ = [1, 50, 60], [1] + list(range(100, 180))
    d = Driver(model, tok, prefill_chunk=8)
    d.submit("short", greedy(short, 40))
    d.engine.step()  # short is prefilled and decoding
    d.submit("long", greedy(long_, 4))
    before = len(d.deltas["short"])
    steps = 0
    while not d.deltas["long"]:
        d.engine.step()
        steps += 1
    lag = int(Driver.overlap)  # overlapped, a step's tokens are read back in the step() after it
    assert steps == 81 // 8 + 1 + lag  # 81 prompt tokens, 8 per step
    assert len(d.deltas["short"]) - before == steps  # one token every step meanwhile
    d.drain()
    assert d.output("long").token_ids == Driver(model, tok).run([greedy(long_, 4)])[0].token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_8(golden_model):
    model, tok = golden_model
    prompts = random_prompts(8, tok.n_words, seed=10)
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=100 + i))
            for i, p in enumerate(prompts)]
    batch = Driver(model, tok, max_batch_size=8).run(reqs)
    for r, o in zip(reqs, batch):
        assert Driver(model, tok, max_batch_size=1).run([r])[0].token_ids == o.token_ids
    assert len({tuple(o.token_ids) for o in batch}) == 8
    again = Driver(model, tok, max_batch_size=8).run([reqs[0]] * 3)  # same seed, same tokens
    assert all(o.token_ids == batch[0].token_ids for o in again)


def test_top_k_1_is_greedy_and_unseeded_requests_still_sample(golden_model):
    model, tok = golden_model
    p = random_prompts(1, tok.n_words, seed=11)[0]
    g = Driver(model, tok).run([greedy(p, 12)])[0]
    k1 = Driver(model, tok).run([GenerationRequest(tuple(p), SamplingParams(max_tokens=12, temperature=1.0, top_k=1))])[0]
    assert k1.token_ids == g.token_ids
    hot = [GenerationRequest(tuple(p), SamplingParams(max_tokens=12, temperature=1.5, top_p=1.0))] * 4
    assert len({tuple(o.token_ids) for o in Driver(model, tok).run(hot)}) > 1


def test_logprobs_have_k_alternatives_best_first_and_include_the_choice_when_greedy(golden_model):
    model, tok = golden_model
    o = Driver(model, tok).run([greedy([1, 45, 74], 6, logprobs=3)])[0]
    assert len(o.logprobs) == len(o.top_logprobs) == len(o.token_ids)
    for t, lp, top in zip(o.token_ids, o.logprobs, o.top_logprobs):
        assert len(top) == 3 and [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
        assert top[0] == (t, pytest.approx(lp))  # greedy picks the most likely
        assert lp <= 0


def test_stop_string_cuts_the_text_and_ends_the_request(golden_model):
    model, tok = golden_model
    p = random_prompts(1, tok.n_words, seed=12)[0]
    full = Driver(model, tok).run([greedy(p, 24)])[0]
    assert len(full.text) > 8
    stop = full.text[5:8]
    cut = Driver(model, tok).run([greedy(p, 24, stop=(stop,))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(full.token_ids)


def test_every_stop_id_the_tokenizer_declares_ends_the_sequence_unreturned(golden_model):
    import copy

    model, tok = golden_model
    p = random_prompts(1, tok.n_words, seed=12)[0]
    full = Driver(model, tok).run([greedy(p, 24)])[0]
    assert tok.eos_id not in full.token_ids and len(full.token_ids) == 24
    other = copy.copy(tok)  # as Llama 3's <|eot_id|> beside <|end_of_text|>
    other.stop_ids = frozenset({tok.eos_id, full.token_ids[6]})
    cut = Driver(model, other).run([greedy(p, 24)])[0]
    first = full.token_ids.index(full.token_ids[6])
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:first]


def test_streamed_text_adds_up_to_the_decoded_tokens(golden_model):
    model, tok = golden_model
    d = Driver(model, tok)
    for i, p in enumerate(random_prompts(4, tok.n_words, seed=13)):
        d.submit(str(i), greedy(p, 30))
    d.drain()
    for i in range(4):
        deltas: list[StreamDelta] = d.deltas[str(i)]
        assert len(deltas) > 1 and all(x.finish_reason is None for x in deltas[:-1])
        assert "".join(x.text for x in deltas) == tok.decode([t for x in deltas for t in x.token_ids])


def test_abort_and_deadline_free_their_slots(golden_model):
    model, tok = golden_model
    p = random_prompts(3, tok.n_words, seed=14)
    d = Driver(model, tok, max_batch_size=2)
    d.submit("a", greedy(p[0], 60))
    d.submit("b", GenerationRequest(tuple(p[1]), SamplingParams(max_tokens=60, temperature=0), timeout_s=0.0))
    d.submit("c", greedy(p[2], 5))
    d.engine.step()
    d.engine.abort("a")
    d.drain()
    assert d.deltas["a"][-1].finish_reason == "abort"
    assert d.deltas["b"][-1].finish_reason == "timeout"
    assert d.output("c").finish_reason == "length" and len(d.output("c").token_ids) == 5
    assert d.engine.scheduler.free_slots == 2


def test_caller_mistakes_raise_at_submit_and_the_engine_goes_on(golden_model):
    model, tok = golden_model
    d = Driver(model, tok)
    with pytest.raises(ValueError, match="max_seq_len"):
        d.submit("x", greedy([1] * 96, 4))
    with pytest.raises(ValueError, match="vocabulary"):
        d.submit("y", greedy([1, tok.n_words], 4))
    with pytest.raises(ValueError, match="empty"):
        d.submit("z", greedy([], 4))
    assert Driver(model, tok).run([greedy([1, 5], 3)])[0].finish_reason in ("stop", "length")


def test_no_slot_leaks_after_200_mixed_requests(golden_model):
    model, tok = golden_model
    rng = random.Random(15)
    d = Driver(model, tok, max_batch_size=6, prefill_chunk=24)
    prompts = random_prompts(200, tok.n_words, seed=15, hi=50)
    ids = []
    for i, p in enumerate(prompts):
        kind = i % 5
        params = dict(max_tokens=rng.randrange(1, 30), temperature=0 if kind < 2 else 0.8, seed=i)
        if kind == 2:
            params["stop"] = ("e",)
        if kind == 3:
            params["logprobs"] = 2
            params["echo"] = True
        timeout = 0.0 if i % 17 == 0 else None
        d.submit(str(i), GenerationRequest(tuple(p), SamplingParams(**params), timeout_s=timeout))
        ids.append(str(i))
        if i % 11 == 0:
            d.engine.abort(str(i - 3)) if i >= 3 else None
        if i % 3 == 0:
            d.engine.step()
    d.drain()
    reasons = [d.deltas[r][-1].finish_reason for r in ids]
    assert all(r is not None for r in reasons)
    assert {"stop", "length", "timeout", "abort"} >= set(reasons) and "timeout" in reasons and "abort" in reasons
    assert all(sum(x.finish_reason is not None for x in d.deltas[r]) == 1 for r in ids)  # exactly one end each
    assert d.engine.scheduler.free_slots == 6 and not d.engine.scheduler.running and not d.engine.scheduler.waiting
    assert d.engine.runner.active == set() or d.engine.step() is False  # freed slots reach the next plan
    load = d.engine.load()
    assert load["finished"] == 200


def test_a_sink_that_fails_ends_its_request_not_the_engine(golden_model):
    model, tok = golden_model
    d = Driver(model, tok, max_batch_size=2)

    def broken(_delta) -> None:
        raise RuntimeError("the caller's queue is gone")

    d.engine.submit("gone", greedy([1, 5, 6], 40), broken)
    d.submit("ok", greedy([1, 7, 8], 10))
    d.drain()
    assert d.output("ok").finish_reason == "length" and d.engine.failure is None
    assert d.engine.scheduler.free_slots == 2 and d.engine.load()["finished"] == 2


def test_an_idle_driver_sends_heartbeat_plans_and_a_stop_plan_at_the_end(golden_model):
    import threading
    import time

    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine

    model, tok = golden_model
    plans = []
    engine = Engine(model, tok, EngineConfig(max_batch_size=2, max_seq_len=96, heartbeat_s=0.05), publish=plans.append)
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    time.sleep(0.5)
    stop.set()
    loop.join()
    assert len(plans) >= 3 and all(p.idle for p in plans) and plans[-1].stop


def test_choices_of_one_prompt_prefill_it_once_and_each_gives_its_tokens_alone(golden_model):
    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=16, lo=40, hi=41)[0]  # 41 tokens: 3 chunks of 16
    seeded = [GenerationRequest(tuple(prompt), SamplingParams(max_tokens=10, temperature=0.9, seed=s)) for s in range(4)]
    d = Driver(model, tok)
    out = d.run(seeded + [greedy(prompt, 10), greedy(prompt[:-1], 10, logprobs=1, echo=True)])
    stats = d.engine.stats
    # The first choice prefills 41 tokens; the next four wait for it, then take its two full
    # blocks (32 positions) and run the other 9; the echo request (another prompt, and it needs
    # its prompt's logits) prefills its own 40.
    assert d.engine.load()["prefix_cache_hit_tokens"] == 4 * 32
    assert stats.prefill_tokens == 41 + 4 * 9 + 40
    for r, o in zip(seeded + [greedy(prompt, 10)], out):
        assert o.token_ids == Driver(model, tok, max_batch_size=1).run([r])[0].token_ids
    assert len({tuple(o.token_ids) for o in out[:4]}) > 1
    assert d.engine.scheduler.free_slots == 4


def test_the_configured_request_timeout_applies_to_requests_that_bring_none(golden_model):
    model, tok = golden_model
    p = random_prompts(2, tok.n_words, seed=17)
    d = Driver(model, tok, request_timeout_s=1e-9)
    d.submit("late", greedy(p[0], 40))
    own = GenerationRequest(tuple(p[1]), SamplingParams(max_tokens=5, temperature=0), timeout_s=3600.0)
    d.submit("own", own)  # its own deadline wins over the configured one
    d.drain()
    assert d.deltas["late"][-1].finish_reason == "timeout"
    assert d.output("own").finish_reason in ("stop", "length")
    assert d.engine.scheduler.free_slots == 4

