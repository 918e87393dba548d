"""Scoring (max_tokens 0 with echo), presence/frequency penalties, logit_bias and user through the
HTTP layer against the fake engine of test_api.py: what each becomes in SamplingParams, and the
scoring answer, whole and streamed. Their effect in the engine: test_engine_scoring.py and
test_engine_penalties.py."""
from __future__ import annotations

import openai
from starlette.testclient import TestClient
from test_api import MODEL, FakeEngine, client, engine, http, tok  # noqa: F401 (fixtures)
from test_api_stream import chunks_of, post

from llama.tokenizers.base import Tokenizer

HI = [{"role": "user", "content": "hi"}]


def test_scoring_returns_each_prompt_tokens_logprobs_and_generates_nothing(client: openai.OpenAI, engine: FakeEngine,
                                                                          tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt=[[1, 276, 275], [284, 276]], max_tokens=0, echo=True,
                                  logprobs=2, temperature=0)
    assert [(c.text, c.finish_reason) for c in r.choices] == [("hi", "length"), ("wh", "length")]
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in (1, 276, 275)] and lp.text_offset == [0, 0, 1]
    assert lp.token_logprobs == [None, -0.01, -0.02]  # the first token: null, as OpenAI sends it
    assert lp.top_logprobs[0] is None and [len(t) for t in lp.top_logprobs[1:]] == [3, 3]  # 2 + the token itself
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 0)
    assert [(q.params.max_tokens, q.params.echo, q.params.logprobs) for q in engine.calls[0]] == [(0, True, 2)] * 2
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=0, echo=True)  # echo alone: the text
    assert (r.choices[0].text, r.choices[0].logprobs, r.usage.completion_tokens) == ("hello", None, 0)


def test_scoring_streams_one_chunk_with_the_prompt_then_the_end(http: TestClient, client: openai.OpenAI) -> None:
    body = {"prompt": "hi hi", "max_tokens": 0, "echo": True, "logprobs": 1, "stream_options": {"include_usage": True}}
    [chunk, usage] = chunks_of(post(http, "/v1/completions", **body))
    [choice] = chunk["choices"]
    whole = client.completions.create(model=MODEL, prompt="hi hi", max_tokens=0, echo=True, logprobs=1).choices[0]
    assert (choice["text"], choice["finish_reason"]) == ("hi hi", "length")
    assert choice["logprobs"] == whole.logprobs.model_dump()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 0


def test_penalties_logit_bias_and_user_reach_sampling_params_on_both_routes(client: openai.OpenAI,
                                                                             engine: FakeEngine) -> None:
    steer = {"presence_penalty": 0.5, "frequency_penalty": -1.5, "logit_bias": {"5": 100, "7": -100.0, "12": 0.25},
             "user": "someone"}
    client.completions.create(model=MODEL, prompt="hi", n=2, **steer)
    client.chat.completions.create(model=MODEL, messages=HI, **steer)
    client.chat.completions.create(model=MODEL, messages=HI, user="someone")
    for call in engine.calls[:2]:
        for q in call:
            assert (q.params.presence_penalty, q.params.frequency_penalty) == (0.5, -1.5)
            assert q.params.logit_bias == ((5, 100.0), (7, -100.0), (12, 0.25))
    p = engine.calls[2][0].params
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias, p.adjusts_logits) == (0.0, 0.0, (), False)


def test_nulls_and_empty_logit_bias_are_no_steering(http: TestClient, engine: FakeEngine) -> None:
    body = {"model": MODEL, "messages": HI, "presence_penalty": None, "frequency_penalty": 0, "logit_bias": {},
            "user": None}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert engine.calls[0][0].params.adjusts_logits is False
