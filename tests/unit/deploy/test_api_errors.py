"""The HTTP layer's errors (deploy/errors.py) against the fake engine of test_api.py: OpenAI's
error shape and status for a caller's mistakes, engine refusals and failures, and requests the
engine ended unfinished."""
from __future__ import annotations

import logging

import openai
import pytest
from starlette.testclient import TestClient

from cluster.errors import RankFailedError
from test_api import MODEL, FakeEngine, error_of
from test_api import client, engine, http, tok  # noqa: F401 (fixtures)

# ---- errors ---------------------------------------------------------------------------------

CTX = "This model's maximum context length is 128 tokens. However, "


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "The model `gpt-4` does not exist; this server serves `tiny-llama`."),
    ({"prompt": "hi"}, 400, "model", "Missing required parameter: 'model'."),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens",
     "Invalid value for 'max_tokens': max_tokens 0 generates nothing, so it is only allowed with echo=true (to score "
     "the prompt); send max_tokens >= 1, or echo=true with logprobs for the prompt's logprobs."),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0, "echo": False, "logprobs": 1}, 400, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1, "echo": True}, 400, "max_tokens",
     "Invalid value for 'max_tokens': Input should be greater than or equal to 0."),
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
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "Invalid value for 'stream_options': stream_options is only allowed when stream is true."),
    ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400,
     "stream_options.x", "Unrecognized request argument supplied: stream_options.x."),
    ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats", "Invalid value for 'stream_options.continuous_usage_stats': "
     "continuous_usage_stats is not supported by this server; use include_usage for the usage of the whole "
     "request in a last chunk, or leave it out."),
    ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", "Invalid value for 'stream_options.include_usage': Input should be a valid "
     "boolean."),
    ({"model": MODEL, "prompt": "hi", "top_k": -2}, 400, "top_k", "Invalid value for 'top_k': top_k must be a "
     "positive number of tokens to sample among, or 0 or -1 for no limit; got -2."),
    ({"model": MODEL, "prompt": "hi", "top_k": 2.5}, 400, "top_k", None),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": MODEL, "prompt": "hi", "stop": ""}, 400, "stop", None),
    ({"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs", None),
    ({"model": MODEL, "prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty",
     "Invalid value for 'frequency_penalty': Input should be less than or equal to 2."),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": -2.01}, 400, "presence_penalty", None),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": "1"}, 400, "presence_penalty", None),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 100.5}}, 400, "logit_bias",
     "Invalid value for 'logit_bias': the bias for token 5 must be between -100 and 100, got 100.5."),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"hello": 1}}, 400, "logit_bias",
     "Invalid value for 'logit_bias': logit_bias keys must be token ids (non-negative integers, as strings), "
     "got 'hello'."),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"-3": 1}}, 400, "logit_bias", None),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1, "320": -100}}, 400, "logit_bias",
     "logit_bias has token id 320; this model's ids are 0..319."),
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
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", None),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "Invalid value for 'messages[0]': a tool "
     "message needs tool_call_id (the id of the call it answers), and only it has one."),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content", None),
    ({"max_tokens": 110}, "messages", CTX + "you requested 129 tokens (19 in the messages, 110 for the completion). "
     "Please reduce the length of the prompt or of the completion (max_tokens)."),
    ({"messages": [{"role": "user", "content": "x" * 130}]}, "messages", None),
    ({"top_logprobs": 2}, "top_logprobs", "Invalid value for 'top_logprobs': top_logprobs needs logprobs=true."),
    ({"logprobs": 1}, "logprobs", "Invalid value for 'logprobs': Input should be a valid boolean."),
    ({"stream": False, "stream_options": {"include_usage": False}}, "stream_options", None),
    ({"stream": "yes"}, "stream", None),
    ({"n": 65}, "n", "This request asks for 65 choices; at most 64 fit in one request. Lower n."),
    ({"max_tokens": 0}, "max_tokens", None),  # no echo in chat, so no scoring either
    ({"frequency_penalty": -3}, "frequency_penalty", None),
    ({"logit_bias": {"100000": 1}}, "logit_bias", "logit_bias has token id 100000; this model's ids are 0..319."),
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
        client.completions.create(model=MODEL, prompt="hi", stream_options={"include_usage": True})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci-002", prompt="hi")


class FakeRayTaskError(Exception):
    """Like Ray's: str() is the remote traceback, .cause the original exception."""

    def __init__(self, cause: Exception) -> None:
        super().__init__("Traceback (most recent call last): ... ray internals ...")
        self.cause = cause


def test_engine_value_errors_are_400(client: openai.OpenAI, http: TestClient, engine: FakeEngine) -> None:
    engine.fail["stream"] = ValueError("32 prompts in one batch; this model was built for max_batch_size 8.")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi")
    assert error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 400)["message"] == (
        "32 prompts in one batch; this model was built for max_batch_size 8.")
    # Ray re-raises a remote ValueError as a class that is both RayTaskError and ValueError.
    ray_style = type("RayTaskError(ValueError)", (FakeRayTaskError, ValueError), {})
    engine.fail["stream"] = ray_style(ValueError("prompt 0 is empty: send at least one token."))
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert error_of(r, 400)["message"] == "prompt 0 is empty: send at least one token."


def test_engine_failures_are_5xx_without_prompt_text(http: TestClient, engine: FakeEngine,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    engine.fail["stream"] = RuntimeError("CUDA error while running 'my secret prompt'")
    with caplog.at_level(logging.ERROR, logger="deploy.errors"):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "my secret prompt"})
    err = error_of(r, 500)
    assert err["type"] == "internal_error" and "RuntimeError" in err["message"] and "secret" not in r.text
    assert any(rec.exc_info for rec in caplog.records)  # the traceback is in the log for the operator
    engine.fail["stream"] = RankFailedError("the gang failed during generation: rank 1 died")
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 503)
    assert err["message"] == "The model's workers failed (RankFailedError); this replica will be replaced. Retry shortly."


@pytest.mark.parametrize("reason, status, kind, message", [
    ("timeout", 504, "timeout_error", "The request took longer than this server's request timeout and was stopped. "
     "Lower max_tokens (or n), or ask the operator to raise request_timeout_s."),
    ("abort", 503, "service_unavailable_error", "The request was cancelled in the engine before it finished (the "
     "replica may be shutting down). Retry shortly."),
])
def test_unfinished_requests_are_errors(http: TestClient, engine: FakeEngine, reason: str, status: int, kind: str,
                                        message: str) -> None:
    engine.faults[1] = (2, reason)  # the second of two choices ends early
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "n": 2}), status)
    assert (err["type"], err["message"]) == (kind, message)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b"}' % MODEL),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "stop": ["\\udfff"]}' % MODEL),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d"}]}' % MODEL),
    ("/tokenize", '{"prompt": "\\ud800", "add_special_tokens": false}'),
])
def test_text_with_an_unpaired_surrogate_is_a_400_not_a_tokenizer_crash(http: TestClient, engine: FakeEngine,
                                                                         path: str, body: str) -> None:
    r = http.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    err = error_of(r, 400)
    assert "not valid Unicode" in err["message"] and "send valid UTF-8 text" in err["message"]
    assert engine.calls == []
    # A whole pair is one character, and fine.
    ok = http.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text
