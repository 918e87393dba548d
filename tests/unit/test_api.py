"""The OpenAI-compatible HTTP layer (deploy/api.py) against a fake engine, through the official
openai client where a client would go, and raw HTTP where the client cannot send the mistake."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from cluster.errors import RankFailedError
from deploy.api import build_api
from llama.chat_format import UNSAFE_ERROR, encode_dialog
from llama.make_tiny import make_tiny
from llama.request import GenerationOutput, GenerationRequest
from llama.tokenizer import Tokenizer

MODEL = "tiny-llama"
MAX_SEQ_LEN = 128


class FakeEngine:
    """Generates the prompt back (BOS dropped), then EOS; cuts at stop strings as the real loop
    does. Records every call so tests can check how HTTP fields became SamplingParams."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.calls: list[list[GenerationRequest]] = []
        self.fail: dict[str, Exception] = {}  # method name -> what it raises

    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        self.calls.append(requests)
        if "generate" in self.fail:
            raise self.fail["generate"]
        return [self._one(r) for r in requests]

    def _one(self, r: GenerationRequest) -> GenerationOutput:
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
        return GenerationOutput(
            prompt_tokens=list(r.prompt_tokens),
            token_ids=gen,
            text=text,
            finish_reason=finish,
            logprobs=[-(k + 1) / 10 for k in range(len(gen))] if p.logprobs else None,
            prompt_logprobs=[0.0] + [-(k + 1) / 100 for k in range(len(r.prompt_tokens) - 1)]
            if p.logprobs and p.echo else None,
        )

    async def cluster_info(self) -> dict:
        if "cluster_info" in self.fail:
            raise self.fail["cluster_info"]
        return {"world_size": 2, "backend": "gloo", "device": "cpu", "ranks": [{"rank": 0}, {"rank": 1}]}

    async def check_health(self) -> None:
        if "check_health" in self.fail:
            raise self.fail["check_health"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(make_tiny(tmp_path_factory.mktemp("api_tiny"), shards=1) / "tokenizer.model")


@pytest.fixture
def engine(tok: Tokenizer) -> FakeEngine:
    return FakeEngine(tok)


@pytest.fixture
def http(engine: FakeEngine, tok: Tokenizer) -> TestClient:
    # The TestClient re-raises any exception that leaves the app: none may, not even for a 500.
    return TestClient(build_api(engine, tok, MODEL, MAX_SEQ_LEN))


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
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.logprobs, p.echo) == (16, 1.0, 1.0, (), False, False)
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


def test_completion_logprobs(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["", "h", "el"]  # each token decoded alone, as the reference does
    assert lp.token_logprobs == [-0.1, -0.2, -0.3]
    assert lp.text_offset == [0, 0, 1]
    assert lp.top_logprobs is None
    assert (engine.calls[0][0].params.logprobs, engine.calls[0][0].params.echo) == (True, False)


def test_completion_logprobs_with_echo(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.completions.create(model=MODEL, prompt="hi hi", max_tokens=2, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == "hi hi h"
    assert c.logprobs.tokens == ["", "", "h", "i", "", "h", "i", "", "h"]
    assert c.logprobs.token_logprobs == [None, -0.01, -0.02, -0.03, -0.04, -0.05, -0.06, -0.1, -0.2]
    # The pieces of "hi hi" add up to 4 characters (spaces decode to ""); the generation
    # still starts at len("hi hi").
    assert c.logprobs.text_offset == [0, 0, 0, 1, 2, 2, 3, 5, 5]
    assert engine.calls[0][0].params.echo is True


def test_completion_return_token_ids(client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == tok.encode("hello", bos=False, eos=False)[:3] == [266, 276, 264]


def test_completion_stop_mapping(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.completions.create(model=MODEL, prompt="hello world", stop="wor")
    client.completions.create(model=MODEL, prompt="hello world", stop=["x", "ld"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("hello ", "stop")
    assert r.usage.completion_tokens == 9  # up to the stop string's last token
    assert [engine.calls[0][0].params.stop, engine.calls[1][0].params.stop] == [("wor",), ("x", "ld")]


# ---- chat -----------------------------------------------------------------------------------


def test_chat_system_and_user(client: openai.OpenAI, engine: FakeEngine, tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=messages)
    prompt = encode_dialog(tok, messages)
    [[req]] = engine.calls
    assert req.prompt_tokens == tuple(prompt)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.logprobs, p.echo) == (MAX_SEQ_LEN - len(prompt), 1.0, 1.0, False, False)
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


def test_chat_logprobs_and_token_ids(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert [(t.token, t.logprob, t.bytes, t.top_logprobs) for t in c.logprobs.content] == [
        ("", -0.1, [32], []), ("[", -0.2, [0x5B], []), ("I", -0.3, [73], [])]  # "▁", "<0x5B>", "I"
    assert c.message.content == "[I" and c.token_ids == [266, 94, 312]


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


# ---- errors ---------------------------------------------------------------------------------

CTX = "This model's maximum context length is 128 tokens. However, "


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "The model `gpt-4` does not exist; this server serves `tiny-llama`."),
    ({"prompt": "hi"}, 400, "model", "Missing required parameter: 'model'."),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens",
     "Invalid value for 'max_tokens': Input should be greater than or equal to 1."),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "16"}, 400, "max_tokens",
     "Invalid value for 'max_tokens': Input should be a valid integer."),
    ({"model": MODEL, "prompt": "hi", "temperature": -0.1}, 400, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n", None),
    ({"model": MODEL, "prompt": ["a", "b"], "n": 33}, 400, "n",
     "This request asks for 66 choices (2 prompt(s) x n=33); at most 64 fit in one request. Lower n or split the "
     "prompts across requests."),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "prompt must not be empty: send a string or at least one token id."),
    ({"model": MODEL, "prompt": [[1], []]}, 400, "prompt", "prompt 1 is an empty token list: send at least one token id."),
    ({"model": MODEL, "prompt": [1, 320]}, 400, "prompt", "prompt 0 has token id 320; this model's ids are 0..319."),
    ({"model": MODEL, "prompt": [-1]}, 400, "prompt", "prompt 0 has token id -1; this model's ids are 0..319."),
    ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", "Invalid value for 'prompt': expected a string, a list of "
     "strings, a list of token ids or a list of token-id lists."),
    ({"model": MODEL, "prompt": [1] * 120, "max_tokens": 10}, 400, "prompt", CTX + "you requested 130 tokens (120 in "
     "the prompt, 10 for the completion). Please reduce the length of the prompt or of the completion (max_tokens)."),
    ({"model": MODEL, "prompt": [1] * 128}, 400, "prompt", CTX + "the prompt is 128 tokens, which leaves no room for "
     "the completion. Please reduce the length of the prompt."),
    ({"model": MODEL, "prompt": ["hi", "x" * 130]}, 400, "prompt", None),
    ({"model": MODEL, "prompt": "hi", "stream": True}, 400, "stream",
     "Invalid value for 'stream': streaming is not supported yet; send stream=false or leave it out."),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": MODEL, "prompt": "hi", "stop": ""}, 400, "stop", None),
    ({"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs", None),
    ({"model": MODEL, "prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty", None),
    ({"model": MODEL, "prompt": "hi", "tools": []}, 400, "tools", "Unrecognized request argument supplied: tools."),
])
def test_completion_errors(http: TestClient, engine: FakeEngine, body: dict, status: int, param: str,
                           message: str | None) -> None:
    err = error_of(http.post("/v1/completions", json=body), status)
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    if message is not None:
        assert err["message"] == message
    assert engine.calls == []
    assert err["code"] == {404: "model_not_found"}.get(status, "context_length_exceeded" if "context" in
                                                      err["message"] else None)


@pytest.mark.parametrize("extra, param, message", [
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content", None),
    ({"max_tokens": 110}, "messages", CTX + "you requested 129 tokens (19 in the messages, 110 for the completion). "
     "Please reduce the length of the prompt or of the completion (max_tokens)."),
    ({"messages": [{"role": "user", "content": "x" * 130}]}, "messages", None),
    ({"top_logprobs": 2}, "top_logprobs", "Invalid value for 'top_logprobs': top_logprobs needs logprobs=true."),
    ({"logprobs": 1}, "logprobs", "Invalid value for 'logprobs': Input should be a valid boolean."),
    ({"stream": True}, "stream", None),
    ({"n": 65}, "n", "This request asks for 65 choices; at most 64 fit in one request. Lower n."),
])
def test_chat_errors(http: TestClient, engine: FakeEngine, extra: dict, param: str, message: str | None) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    if message is not None:
        assert err["message"] == message
    assert engine.calls == []


@pytest.mark.parametrize("content, message", [
    (b'{"model": "tiny-llama", "prompt": ', "We could not parse the JSON body of your request (Expecting value). "
                                            "Send a JSON object."),
    (b"", "The request body is empty: send a JSON object with the request's parameters."),
    (b"[1, 2]", "The request body must be a JSON object with the request's parameters: Input should be a valid "
                "dictionary or object to extract fields from."),
])
def test_malformed_json(http: TestClient, content: bytes, message: str) -> None:
    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert error_of(r, 400)["message"] == message


def test_unknown_route_and_method(http: TestClient) -> None:
    assert error_of(http.get("/v1/nothing"), 404)["message"] == "Invalid URL (GET /v1/nothing)."
    assert error_of(http.get("/v1/completions"), 405)["message"] == "Method GET is not allowed for /v1/completions."


def test_client_sees_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci-002", prompt="hi")


class FakeRayTaskError(Exception):
    """Like Ray's: str() is the remote traceback, .cause the original exception."""

    def __init__(self, cause: Exception) -> None:
        super().__init__("Traceback (most recent call last): ... ray internals ...")
        self.cause = cause


def test_engine_value_errors_are_400(client: openai.OpenAI, http: TestClient, engine: FakeEngine) -> None:
    engine.fail["generate"] = ValueError("32 prompts in one batch; this model was built for max_batch_size 8.")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi")
    assert error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 400)["message"] == (
        "32 prompts in one batch; this model was built for max_batch_size 8.")
    # Ray re-raises a remote ValueError as a class that is both RayTaskError and ValueError.
    ray_style = type("RayTaskError(ValueError)", (FakeRayTaskError, ValueError), {})
    engine.fail["generate"] = ray_style(ValueError("prompt 0 is empty: send at least one token."))
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert error_of(r, 400)["message"] == "prompt 0 is empty: send at least one token."


def test_engine_failures_are_5xx_without_prompt_text(http: TestClient, engine: FakeEngine,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    engine.fail["generate"] = RuntimeError("CUDA error while running 'my secret prompt'")
    with caplog.at_level(logging.ERROR, logger="deploy.errors"):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "my secret prompt"})
    err = error_of(r, 500)
    assert err["type"] == "internal_error" and "RuntimeError" in err["message"] and "secret" not in r.text
    assert any(rec.exc_info for rec in caplog.records)  # the traceback is in the log for the operator
    engine.fail["generate"] = RankFailedError("the gang failed during generation: rank 1 died")
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 503)
    assert err["message"] == "The model's workers failed (RankFailedError); this replica will be replaced. Retry shortly."


def test_api_does_not_import_ray() -> None:
    code = "import sys, deploy.api; assert 'ray' not in sys.modules, 'deploy.api imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
