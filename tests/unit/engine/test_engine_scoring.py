"""Scoring a prompt (max_tokens 0 with echo), as lm-evaluation-harness's loglikelihood asks: in
the engine, a prefill with the prompt's logprobs that finishes without sampling; through the HTTP
layer, lm-eval's payload against the real engine. Its logprobs must be those the engine gives the
same prompt in an echo request with max_tokens 1, and Meta's reference's."""
from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

import pytest
from starlette.testclient import TestClient
from test_engine import Driver, golden_model, greedy, random_prompts, step_mode  # noqa: F401 (fixtures)

from cluster.admission import Admission, Places
from deploy.api import build_api
from llama.engine.request import GenerationOutput, GenerationRequest, SamplingParams, StreamDelta


def score(prompt: list[int], k: int = 3) -> GenerationRequest:
    return greedy(prompt, 0, logprobs=k, echo=True)


def assert_same_prompt_logprobs(got: GenerationOutput, want: GenerationOutput) -> None:
    """Exactly equal: the same prompt run the same way gives the same floats."""
    assert got.prompt_logprobs == want.prompt_logprobs
    assert got.prompt_top_logprobs == want.prompt_top_logprobs


def test_max_tokens_0_gives_exactly_the_prompt_logprobs_of_an_echo_with_max_tokens_1(golden_model):
    model, tok = golden_model
    for prompt in random_prompts(4, tok.n_words, seed=20, lo=2, hi=40):
        scored = Driver(model, tok).run([score(prompt)])[0]
        echoed = Driver(model, tok).run([greedy(prompt, 1, logprobs=3, echo=True)])[0]
        assert_same_prompt_logprobs(scored, echoed)
        assert (scored.token_ids, scored.text, scored.finish_reason, scored.logprobs) == ([], "", "length", [])
        assert len(scored.prompt_logprobs) == len(prompt) and scored.prompt_logprobs[0] == 0.0
        assert scored.prompt_top_logprobs[0] == [] and all(len(t) == 3 for t in scored.prompt_top_logprobs[1:])
        assert len(echoed.token_ids) == 1  # the echo did generate; scoring did not


def test_max_tokens_0_matches_the_references_echo_logprobs_across_prefill_chunks(golden_model, golden):
    model, tok = golden_model
    e = golden["completions_echo"]
    prompts = [tok.encode(p, bos=True, eos=False) for p in e["prompts"]]
    d = Driver(model, tok, prefill_chunk=3)
    out = d.run([score(p, k=2) for p in prompts])
    for p, o, want in zip(prompts, out, e["results"]):
        assert len(o.prompt_logprobs) == len(p)
        assert max(abs(a - b) for a, b in zip(o.prompt_logprobs, want["logprobs"][: len(p)])) < 1e-4
        assert o.token_ids == [] and o.finish_reason == "length"
    assert d.engine.stats.generated_tokens == 0 and d.engine.scheduler.free_slots == 4


def test_scoring_beside_generating_requests_in_chunks_frees_every_slot_and_changes_no_tokens(golden_model):
    model, tok = golden_model
    prompts = random_prompts(12, tok.n_words, seed=21, lo=20, hi=60)
    reqs = [score(p) if i % 2 else greedy(p, 8) for i, p in enumerate(prompts)]
    d = Driver(model, tok, max_batch_size=3, prefill_chunk=7)  # prompts span several steps, slots run out
    together = d.run(reqs)
    for r, o in zip(reqs, together):
        alone = Driver(model, tok, max_batch_size=1, prefill_chunk=64).run([r])[0]
        assert o.token_ids == alone.token_ids and o.finish_reason == alone.finish_reason
        if r.params.max_tokens == 0:
            assert o.prompt_logprobs == pytest.approx(alone.prompt_logprobs, abs=1e-5)  # other batch, other sums
    for rid, r in d.requests.items():
        if r.params.max_tokens == 0:
            [delta] = d.deltas[rid]  # one delta: the prompt's logprobs and the end
            assert delta.finish_reason == "length" and len(delta.prompt_logprobs) == len(r.prompt_tokens)
    assert d.engine.stats.generated_tokens == sum(len(o.token_ids) for o in together)
    assert d.engine.scheduler.free_slots == 3 and not d.engine.scheduler.running and not d.engine.scheduler.waiting


def test_a_scoring_request_ends_in_the_step_that_prefills_its_last_chunk(golden_model):
    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=22, lo=40, hi=41)[0]  # 41 tokens: chunks of 16, 16, 9
    d = Driver(model, tok)
    d.submit("s", score(prompt))
    lag = int(Driver.overlap)  # overlapped, a step's results are read back in the step() after it
    assert [d.engine.step() for _ in range(3 + lag)] == [True] * (3 + lag) and len(d.deltas["s"]) == 1
    assert d.engine.step() is False and d.engine.scheduler.free_slots == 4


def test_echo_without_logprobs_and_max_tokens_0_runs_nothing(golden_model):
    model, tok = golden_model
    d = Driver(model, tok)
    d.submit("e", GenerationRequest((1, 50, 60), SamplingParams(max_tokens=0, temperature=0, echo=True)))
    assert d.engine.step() is False  # answered at intake: the prompt's text is all it asks for
    [delta] = d.deltas["e"]
    assert (delta.token_ids, delta.finish_reason, delta.prompt_logprobs) == ([], "length", None)
    assert d.engine.stats.prefill_tokens == 0 and d.engine.scheduler.free_slots == 4


# ---- through the HTTP layer -----------------------------------------------------------------


class InProcessEngine:
    """An EngineClient over a real Engine, stepped on the event loop's thread until the stream
    being read has its next delta (no Ray, no engine thread)."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self._ids = itertools.count()

    async def admit(self, n: int) -> Admission:
        return Places(running=64, waiting=0).admit(n)

    def stream(self, request: GenerationRequest, admission: Admission | None = None) -> AsyncIterator[StreamDelta]:
        rid = f"http{next(self._ids)}"
        self.driver.submit(rid, request)
        return self._stream(self.driver.deltas[rid])

    async def _stream(self, deltas: list[StreamDelta]) -> AsyncIterator[StreamDelta]:
        sent = 0
        while True:
            while len(deltas) == sent:
                assert self.driver.engine.step(), "the engine went idle before the request finished"
            await asyncio.sleep(0)
            sent += 1
            yield deltas[sent - 1]
            if deltas[sent - 1].finish_reason is not None:
                return

    async def cluster_info(self) -> dict:
        return {}

    async def check_health(self) -> None:
        return None


def test_lm_eval_loglikelihood_payload_gets_the_engines_prompt_logprobs(golden_model, golden):
    model, tok = golden_model
    prompts = [tok.encode(p, bos=True, eos=False) for p in golden["completions_echo"]["prompts"]]
    with TestClient(build_api(InProcessEngine(Driver(model, tok, prefill_chunk=5)), tok, "golden", 96)) as http:
        # what lm-evaluation-harness's local-completions model sends for loglikelihood
        body = {"model": "golden", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                "temperature": 0, "seed": 1234}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        chunks = http.post("/v1/completions", json={**body, "prompt": prompts[0], "stream": True}).text
    engine = Driver(model, tok, prefill_chunk=5).run([greedy(p, 1, logprobs=1, echo=True) for p in prompts])
    choices = r.json()["choices"]
    assert r.json()["usage"]["completion_tokens"] == 0
    for p, c, own, want in zip(prompts, choices, engine, golden["completions_echo"]["results"]):
        lp = c["logprobs"]
        assert c["finish_reason"] == "length" and c["text"] == tok.decode(p)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
        assert lp["token_logprobs"][1:] == own.prompt_logprobs[1:]
        for top, (best, best_lp) in zip(lp["top_logprobs"][1:], [t[0] for t in own.prompt_top_logprobs[1:]]):
            assert next(iter(top.items())) == (tok.decode([best]), best_lp)  # the most likely first
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want["logprobs"][1 : len(p)])) < 1e-4
    # stream=true: one chunk with the echoed prompt, its logprobs and the end, then [DONE]
    events = [e.removeprefix("data: ") for e in chunks.split("\n\n") if e]
    assert len(events) == 2 and events[-1] == "[DONE]"
    [streamed] = json.loads(events[0])["choices"]
    assert streamed == choices[0]  # the same text, logprobs and finish as the whole response's


def test_an_end_token_that_finishes_the_choice_is_listed_last_in_its_logprobs_as_vllm_lists_it(golden_model):
    """lm-eval's real loglikelihood payload has max_tokens 1 and drops the last logprobs entry as
    the generated token's: when that token is EOS, its entry must be there. logit_bias makes EOS
    the draw; the logprobs stay the model's own."""
    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=23, lo=10, hi=11)[0]
    body = {"model": "golden", "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
            "logit_bias": {str(tok.eos_id): 100}}
    with TestClient(build_api(InProcessEngine(Driver(model, tok)), tok, "golden", 96)) as http:
        whole = http.post("/v1/completions", json=body).json()
        chunks = http.post("/v1/completions", json={**body, "stream": True}).text
    scored = Driver(model, tok).run([score(prompt + [tok.eos_id], k=1)])[0]  # EOS's logprob after the prompt
    [c] = whole["choices"]
    assert (c["finish_reason"], c["text"], whole["usage"]["completion_tokens"]) == ("stop", tok.decode(prompt), 0)
    lp = c["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["tokens"][-1] == tok.decode([tok.eos_id])
    assert lp["token_logprobs"][1:] == pytest.approx(scored.prompt_logprobs[1:], abs=1e-5)
    assert lp["text_offset"][-1] == len(c["text"])
    streamed = [json.loads(x[6:]) for x in chunks.split("\n\n") if x.startswith("data: {")]
    tail = [ch for ch in streamed if ch["choices"] and ch["choices"][0]["logprobs"]]
    assert sum((ch["choices"][0]["logprobs"]["token_logprobs"] for ch in tail), []) == lp["token_logprobs"]
