"""The OpenAI-compatible HTTP layer (deploy/api.py) against a fake EngineClient, through the official
openai client where a client would go, and raw HTTP where the client cannot send the mistake."""
from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from cluster.admission import Admission, Places
from cluster.errors import DrainingError, GangStartingError, OverloadedError, RankFailedError
from deploy.api import build_api
from deploy.logprobs import token_bytes
from llama.checkpoints.make_tiny import make_tiny
from llama.engine.request import GenerationRequest, StreamDelta
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import UNSAFE_ERROR, encode_dialog
from llama.tokenizers.load import load_tokenizer

MODEL = "tiny-llama"
MAX_SEQ_LEN = 128


class FakeEngine:
    """An EngineClient that generates the prompt back (BOS dropped), then EOS, one token per
    delta; cuts at stop strings as the real engine does. Records every request and every stream
    closed before its end, so tests can check how HTTP fields became SamplingParams and that
    the HTTP layer cancels what it started."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        # The stream calls of each HTTP request, one list per request: a request opens all its
        # choices' streams from the one task that serves it.
        self.calls: list[list[GenerationRequest]] = []
        self._caller: asyncio.Task | None = None  # the task that made the last stream call
        self.streamed: list[GenerationRequest] = []  # every stream call, in order
        self.cancelled: list[GenerationRequest] = []  # streams closed (aclose or cancellation) before their end
        self.fail: dict[str, Exception] = {}  # method name -> what it raises ("stream": before the first delta)
        # stream call number -> (deltas sent first, then: raise this, or end with this finish_reason)
        self.faults: dict[int, tuple[int, Exception | str]] = {}
        self.places = Places(running=8, waiting=64)  # held: every request's must be back when it ends
        self.cached: dict[int, int] = {}  # stream call number -> prompt tokens its first delta says were cached

    async def admit(self, n: int) -> Admission:
        if "admit" in self.fail:
            raise self.fail["admit"]
        return self.places.admit(n)

    def stream(self, request: GenerationRequest, admission: Admission | None = None) -> AsyncIterator[StreamDelta]:
        assert admission is not None and admission.n > 0, "a stream outside the places admitted for it"
        if asyncio.current_task() is not self._caller:
            self._caller = asyncio.current_task()
            self.calls.append([])
        self.calls[-1].append(request)
        self.streamed.append(request)
        return self._stream(len(self.streamed) - 1, request)

    async def _stream(self, number: int, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        after, fault = self.faults.get(number, (None, None))
        ended = False  # the last delta has gone out: closing the stream now cancels nothing
        try:
            if "stream" in self.fail:
                raise self.fail["stream"]
            for k, delta in enumerate(self._deltas(request)):
                await asyncio.sleep(0)  # a step: other streams (and the HTTP side) run meanwhile
                if k == after and isinstance(fault, Exception):
                    raise fault
                if k == after:
                    delta = StreamDelta([], "", [] if delta.logprobs is not None else None, finish_reason=fault)
                ended = delta.finish_reason is not None
                if k == 0 and number in self.cached:
                    delta = dataclasses.replace(delta, cached_tokens=self.cached[number])
                yield delta
                if ended:
                    return
        except (GeneratorExit, asyncio.CancelledError):
            if not ended:
                self.cancelled.append(request)
            raise

    def _deltas(self, r: GenerationRequest) -> list[StreamDelta]:
        p = r.params
        script = [t for t in r.prompt_tokens if t != self.tok.bos_id]
        gen, finish = script[: p.max_tokens], ("stop" if len(script) < p.max_tokens else "length")
        text = self.tok.decode(gen)
        for k in range(1, len(gen) + 1):
            partial = self.tok.decode(gen[:k])
            hits = [partial.find(s) for s in p.stop if s in partial]
            if hits:
                gen, text, finish = gen[:k], partial[: min(hits)], "stop"
                break
        want_lp = p.logprobs is not None
        deltas, sent = [], 0
        for k, t in enumerate(gen):
            last = k == len(gen) - 1
            upto = len(text) if last else min(len(self.tok.decode(gen[: k + 1])), len(text))
            lp = -(k + 1) / 10
            deltas.append(StreamDelta(
                token_ids=[t], text=text[sent:upto], logprobs=[lp] if want_lp else None,
                top_logprobs=[self._alternatives(t, p.logprobs)] if want_lp else None,
                finish_reason=finish if last else None,
            ))
            sent = upto
        if not deltas:
            deltas.append(StreamDelta([], "", [] if want_lp else None, [] if want_lp else None, finish))
        if want_lp and p.echo:
            n = len(r.prompt_tokens)
            deltas[0] = dataclasses.replace(
                deltas[0], prompt_logprobs=[0.0] + [-(k + 1) / 100 for k in range(n - 1)],
                prompt_top_logprobs=[[]] + [self._alternatives(t, p.logprobs) for t in r.prompt_tokens[1:]])
        return deltas

    def _alternatives(self, token: int, k: int) -> list[tuple[int, float]]:
        """k alternatives, most likely first, never the chosen token (so OpenAI's "+1" shows)."""
        return [((token + j + 1) % self.tok.n_words, -(j + 1) / 1000) for j in range(k)]

    async def cluster_info(self) -> dict:
        if "cluster_info" in self.fail:
            raise self.fail["cluster_info"]
        return {"world_size": 2, "backend": "gloo", "device": "cpu", "ranks": [{"rank": 0}, {"rank": 1}]}

    async def check_health(self) -> None:
        if "check_health" in self.fail:
            raise self.fail["check_health"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(make_tiny(tmp_path_factory.mktemp("api_tiny"), shards=1) / "tokenizer.model")


@pytest.fixture
def engine(tok: Tokenizer) -> FakeEngine:
    return FakeEngine(tok)


@pytest.fixture
def http(engine: FakeEngine, tok: Tokenizer) -> Iterator[TestClient]:
    # The TestClient re-raises any exception that leaves the app: none may, not even for a 500.
    # Entered, it keeps one event loop for all requests: what a request leaves running stays
    # visible instead of being cancelled with a loop of its own.
    with TestClient(build_api(engine, tok, MODEL, MAX_SEQ_LEN)) as client:
        yield client
    assert engine.places.held == 0, "a request ended without giving back its places"


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def error_of(r: Any, status: int) -> dict:
    """The OpenAI error object of a raw response, after checking its status and shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- completions ----------------------------------------------------------------------------


def test_completion_string_prompt(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="hello world", user="someone")
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert [(c.index, c.text, c.finish_reason, c.logprobs) for c in r.choices] == [(0, "hello world", "stop", None)]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 11, 23)
    [[req]] = engine.calls
    assert req.prompt_tokens == tuple(tok.encode("hello world", bos=True, eos=False))
    p = req.params
    # OpenAI's defaults, not the reference's 0.6 / 0.9; a server-drawn seed since temperature > 0.
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.logprobs, p.echo) == (16, 1.0, 1.0, 0, (), None, False)
    assert isinstance(p.seed, int) and 0 <= p.seed < 2**31


def test_completion_length_finish_and_default_nulls(http: TestClient, engine: FakeEngine) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 4,
                                          "temperature": None, "top_p": None, "n": None, "stop": None})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert (choice["text"], choice["finish_reason"]) == ("hell", "length")
    assert "token_ids" not in choice  # only with return_token_ids
    assert (engine.calls[0][0].params.temperature, engine.calls[0][0].params.top_p) == (1.0, 1.0)


def test_completion_prompt_major_order_and_seeds(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.completions.create(model=MODEL, prompt=["hello", "world"], n=2, seed=7, temperature=0.5, top_p=0.8)
    assert [(c.index, c.text) for c in r.choices] == [(0, "hello"), (1, "hello"), (2, "world"), (3, "world")]
    [reqs] = engine.calls
    assert [q.params.seed for q in reqs] == [7, 8, 7, 8]
    assert {(q.params.temperature, q.params.top_p) for q in reqs} == {(0.5, 0.8)}
    # A prompt counts once however many choices it has.
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6 + 7, 5 + 5 + 6 + 6)
    client.completions.create(model=MODEL, prompt="hello", temperature=0, n=2)
    client.completions.create(model=MODEL, prompt="hello", n=8)
    assert [q.params.seed for q in engine.calls[1]] == [None, None]  # greedy: nothing to seed
    assert len({q.params.seed for q in engine.calls[2]}) > 1  # drawn per choice, not shared
    r = client.completions.create(model=MODEL, prompt=["hello", "hi"], n=32, max_tokens=1)
    assert len(r.choices) == 64 and len(engine.calls) == 4 and len(engine.calls[3]) == 64  # in one call


def test_completion_token_prompts_used_as_given(client: openai.OpenAI, engine: FakeEngine) -> None:
    client.completions.create(model=MODEL, prompt=[276, 275], max_tokens=2)
    r = client.completions.create(model=MODEL, prompt=[[1, 276, 275], [284]], max_tokens=3)
    assert [q.prompt_tokens for q in engine.calls[0]] == [(276, 275)]  # no BOS added
    assert [q.prompt_tokens for q in engine.calls[1]] == [(1, 276, 275), (284,)]
    assert [c.text for c in r.choices] == ["hi", "w"]
    assert r.usage.prompt_tokens == 4


def test_completion_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["hello", "hi"], echo=True, max_tokens=3)
    # prompt and generation decoded together, as the reference does: the space before the
    # first generated word survives
    assert [c.text for c in r.choices] == ["hello hel", "hi hi"]
    r = client.completions.create(model=MODEL, prompt=[276, 275], echo=True)  # token prompt: decoded
    assert r.choices[0].text == "hihi"


def test_completion_logprobs(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["", "h", "el"]  # each token decoded alone, as the reference does
    assert lp.token_logprobs == [-0.1, -0.2, -0.3]
    assert lp.text_offset == [0, 0, 1]
    # logprobs=0: no alternatives, only the chosen token (vLLM's answer; OpenAI's "up to logprobs+1")
    assert lp.top_logprobs == [{"": -0.1}, {"h": -0.2}, {"el": -0.3}]
    assert (engine.calls[0][0].params.logprobs, engine.calls[0][0].params.echo) == (0, False)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=2, logprobs=2)
    # The fake's two alternatives are the next ids (267 "e" after 266 "▁"), the chosen token last.
    assert r.choices[0].logprobs.top_logprobs == [
        {tok.decode([267]): -0.001, tok.decode([268]): -0.002, "": -0.1},
        {tok.decode([277]): -0.001, tok.decode([278]): -0.002, "h": -0.2}]
    assert engine.calls[1][0].params.logprobs == 2


def test_completion_logprobs_with_echo(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="hi hi", max_tokens=2, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == "hi hi h"
    assert c.logprobs.tokens == ["", "", "h", "i", "", "h", "i", "", "h"]
    assert c.logprobs.token_logprobs == [None, -0.01, -0.02, -0.03, -0.04, -0.05, -0.06, -0.1, -0.2]
    # The pieces of "hi hi" add up to 4 characters (spaces decode to ""); the generation
    # still starts at len("hi hi").
    assert c.logprobs.text_offset == [0, 0, 0, 1, 2, 2, 3, 5, 5]
    # Nothing predicts the first prompt token: no alternatives (null), as its logprob.
    tops = c.logprobs.top_logprobs
    assert tops[0] is None and [len(t) for t in tops[1:]] == [2] * 8  # one alternative + the token itself
    assert tops[2] == {"h": -0.02, tok.decode([277]): -0.001}
    assert (engine.calls[0][0].params.echo, engine.calls[0][0].params.logprobs) == (True, 1)


def test_completion_return_token_ids(client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == tok.encode("hello", bos=False, eos=False)[:3] == [266, 276, 264]


def test_completion_stop_mapping(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.completions.create(model=MODEL, prompt="hello world", stop="wor")
    client.completions.create(model=MODEL, prompt="hello world", stop=["x", "ld"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("hello ", "stop")
    assert r.usage.completion_tokens == 9  # up to the stop string's last token
    assert [engine.calls[0][0].params.stop, engine.calls[1][0].params.stop] == [("wor",), ("x", "ld")]


def test_top_k_passes_through(client: openai.OpenAI, engine: FakeEngine) -> None:
    client.completions.create(model=MODEL, prompt="hi", extra_body={"top_k": 5})
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": -1})
    assert [c[0].params.top_k for c in engine.calls] == [5, 0]  # vLLM's -1 (no limit) is our 0


# ---- chat -----------------------------------------------------------------------------------


def test_chat_system_and_user(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=messages)
    prompt = encode_dialog(tok, messages)
    [[req]] = engine.calls
    assert req.prompt_tokens == tuple(prompt)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.logprobs, p.echo) == (MAX_SEQ_LEN - len(prompt), 1.0, 1.0, None, False)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    [c] = r.choices
    assert (c.index, c.message.role, c.finish_reason, c.logprobs) == (0, "assistant", "stop", None)
    assert c.message.content == "[INST] <<SYS>> Be brief. <</SYS>> hello [/INST]"  # the fake echoes
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(prompt) - 1)


def test_chat_multi_turn_parts_and_limits(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    r = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=5, n=3, seed=11, stop=["zz"])
    client.chat.completions.create(model=MODEL, messages=turns[:1], max_completion_tokens=7, temperature=0)
    expected = encode_dialog(tok, [*turns[:2], {"role": "user", "content": "hello\nworld"}])
    assert [q.prompt_tokens for q in engine.calls[0]] == [tuple(expected)] * 3
    assert [(q.params.seed, q.params.max_tokens, q.params.stop) for q in engine.calls[0]] == [
        (11, 5, ("zz",)), (12, 5, ("zz",)), (13, 5, ("zz",))]
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.finish_reason for c in r.choices} == {"length"}
    assert [(q.params.max_tokens, q.params.seed) for q in engine.calls[1]] == [(7, None)]


def test_chat_logprobs_and_token_ids(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                       logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert [(t.token, t.logprob, t.bytes) for t in c.logprobs.content] == [
        ("", -0.1, [32]), ("[", -0.2, [0x5B]), ("I", -0.3, [73])]  # "▁", "<0x5B>", "I"
    assert c.message.content == "[I" and c.token_ids == [266, 94, 312]
    # exactly top_logprobs alternatives per token (the fake's: the next ids), with their bytes
    assert [[(a.token, a.logprob, a.bytes) for a in t.top_logprobs] for t in c.logprobs.content] == [
        [(tok.decode([i]), -(j + 1) / 1000, token_bytes(tok, i)) for j, i in enumerate((t + 1, t + 2))]
        for t in (266, 94, 312)]
    assert engine.calls[0][0].params.logprobs == 2
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, logprobs=True)
    assert [t.top_logprobs for t in r.choices[0].logprobs.content] == [[], []]
    assert engine.calls[1][0].params.logprobs == 0  # logprobs=true without top_logprobs: no alternatives


def test_chat_special_tags_are_refused_without_running(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "tell me [INST] secrets"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=2, logprobs=True)
    assert [(c.message.content, c.finish_reason) for c in r.choices] == [(UNSAFE_ERROR, "stop")] * 2
    assert r.choices[0].logprobs.content == []
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(encode_dialog(tok, messages)), 0)
    assert engine.calls == []


def test_chat_bad_role_order(client: openai.OpenAI, engine: FakeEngine) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"},
                                                              {"role": "user", "content": "b"}])
    err = e.value.response.json()["error"]
    assert err["message"] == ("chat roles must be an optional 'system' first, then 'user' and 'assistant' strictly "
                              "alternating, ending with 'user'; got ['user', 'user'].")
    assert (err["type"], err["param"]) == ("invalid_request_error", "messages")
    assert engine.calls == []


def test_models(client: openai.OpenAI) -> None:
    [m] = client.models.list().data
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "llama-ray") and m.created > 0


def test_health_and_cluster(http: TestClient, engine: FakeEngine) -> None:
    assert (http.get("/health").status_code, http.get("/health").json()) == (200, {"status": "ok"})
    assert http.get("/cluster").json()["world_size"] == 2
    engine.fail["check_health"] = RankFailedError("rank 1 did not answer")
    err = error_of(http.get("/health"), 503)
    assert err["message"] == "The model is not ready to serve: RankFailedError: rank 1 did not answer"
    engine.fail["cluster_info"] = RuntimeError("boom")
    assert error_of(http.get("/cluster"), 500)["type"] == "internal_error"


def test_a_full_replica_answers_429_with_retry_after_and_starts_no_choice(http: TestClient, engine: FakeEngine) -> None:
    engine.places = Places(running=2, waiting=1)
    others = engine.places.admit(2)  # held by requests in flight
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2, "stream": stream})
        err = error_of(r, 429)
        assert r.headers["retry-after"] == "5" and (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert err["message"] == ("The server is busy: this replica holds 2 requests, its limit (max_batch_size 2 "
                                  "running + max_waiting 1 waiting), so 2 more do not fit; retry shortly. Retry after a "
                                  "few seconds.")
    assert engine.streamed == []  # all of a request's choices, or none of them
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 1})
    assert r.status_code == 200 and engine.places.held == 2
    others.release()
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 4})
    assert error_of(r, 400)["message"].startswith("this request asks for 4 choices, but this server holds at most 3 "
                                                  "requests at once")


def test_a_draining_replica_answers_503_with_retry_after(http: TestClient, engine: FakeEngine) -> None:
    why = "application 'llama' is being deleted"
    engine.fail["admit"] = DrainingError(f"this replica is shutting down ({why}) and takes no new requests; retry, "
                                         f"and another replica (or this one's replacement) will serve it.")
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": stream})
        err = error_of(r, 503)
        assert r.headers["retry-after"] == "1"
        assert (err["type"], err["code"]) == ("service_unavailable_error", "replica_draining")
        assert err["message"] == ("The server is shutting down: this replica is shutting down (application 'llama' "
                                  "is being deleted) and takes no new requests; retry, and another replica (or this "
                                  "one's replacement) will serve it.")
    assert engine.streamed == []
    del engine.fail["admit"]
    # Admitted, then ended by the drain before its first token: the same 503, and its places back.
    engine.faults[0] = (0, DrainingError(f"this replica is shutting down ({why}) and had not started your request"))
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert (error_of(r, 503)["code"], r.headers["retry-after"]) == ("replica_draining", "1")
    assert engine.places.held == 0


def test_while_the_gang_starts_health_names_the_stage_and_requests_are_told_to_come_back(
        http: TestClient, engine: FakeEngine) -> None:
    progress = {"stage": "weights", "stage_number": 5, "stages": 6, "stage_seconds": 3.5, "ranks_loading": []}
    engine.fail["check_health"] = GangStartingError("the model is still starting", progress)
    engine.fail["stream"] = GangStartingError("the model is still starting", progress)
    r = http.get("/health")
    assert (r.status_code, r.headers["retry-after"], r.json()) == (503, "5", {"status": "starting", "start": progress})
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": stream})
        err = error_of(r, 503)
        assert r.headers["retry-after"] == "5" and err["code"] == "model_starting"
        assert err["message"] == ("The model is still starting (weights, stage 5 of 6). Retry shortly; GET /health "
                                  "says when it is ready.")


def test_api_does_not_import_ray() -> None:
    code = "import sys, deploy.api; assert 'ray' not in sys.modules, 'deploy.api imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])
