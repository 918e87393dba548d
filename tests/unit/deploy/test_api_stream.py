"""stream=true (deploy/sse.py) against the fake engine of test_api.py: the chunks as raw
server-sent events, and as the official openai client reads them."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import openai
import pytest
from starlette.requests import ClientDisconnect
from starlette.testclient import TestClient
from test_api import MAX_SEQ_LEN, MODEL, FakeEngine, client, engine, error_of, http, tok  # noqa: F401 (fixtures)

from cluster.errors import DrainingError, RankFailedError
from deploy.api import build_api
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import UNSAFE_ERROR

HI = [{"role": "user", "content": "hi"}]
CHAT_TEXT = "[INST] hi [/INST]"  # the fake answers with the prompt


def events(r: Any) -> list[Any]:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    *blocks, rest = r.text.split("\n\n")
    assert rest == ""
    out = []
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def post(http: TestClient, path: str, **body: Any) -> list[Any]:
    return events(http.post(path, json={"model": MODEL, "stream": True, **body}))


def chunks_of(evs: list[Any]) -> list[dict]:
    """The chunks of a stream that ended well: [DONE] last, and only there."""
    assert evs[-1] == "[DONE]" and "[DONE]" not in evs[:-1]
    return evs[:-1]


def texts(chunks: list[dict], chat: bool = False) -> dict[int, str]:
    """Each choice's text, joined from its chunks."""
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            out[ch["index"]] = out.get(ch["index"], "") + (ch["delta"].get("content", "") if chat else ch["text"])
    return out


# ---- completions ----------------------------------------------------------------------------


def test_completion_stream_chunks(http: TestClient, engine: FakeEngine) -> None:
    chunks = chunks_of(post(http, "/v1/completions", prompt="hello world"))
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"}  # no usage unless asked for
        assert (c["object"], c["model"]) == ("text_completion", MODEL)
        [choice] = c["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["logprobs"] is None
        assert choice["text"] or choice["finish_reason"]  # no empty chunk (the fake holds "▁" back as "")
    assert texts(chunks) == {0: "hello world"}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert len(chunks) == 10  # 11 tokens; the first, "▁" alone, has no text of its own
    assert engine.cancelled == [] and len(engine.streamed) == 1  # ran to its end: nothing to cancel


def test_completion_stream_openai_client(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == "hell"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "text_completion"


def test_usage_reports_the_prompt_tokens_found_in_the_prefix_cache(client: openai.OpenAI, engine) -> None:
    # Each prompt counts what its first choice found (its other choices then share its blocks).
    engine.cached = {0: 0, 1: 4, 2: 2, 3: 2}  # prompt 0's two choices, then prompt 1's
    whole = client.completions.create(model=MODEL, prompt=["hello", "world"], n=2, max_tokens=3)
    assert whole.usage.prompt_tokens_details.cached_tokens == 0 + 2
    engine.cached = {4: 5}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens == 5


def test_completion_stream_usage(client: openai.OpenAI, http: TestClient) -> None:
    body = {"prompt": ["hello", "world"], "n": 2, "max_tokens": 3, "stream_options": {"include_usage": True}}
    evs = chunks_of(post(http, "/v1/completions", **body))
    assert all("usage" in c and c["usage"] is None for c in evs[:-1])
    assert evs[-1]["choices"] == [] and evs[-1]["usage"] == {"prompt_tokens": 13, "completion_tokens": 12,
                                                              "total_tokens": 25,
                                                              "prompt_tokens_details": {"cached_tokens": 0}}
    whole = client.completions.create(model=MODEL, prompt=["hello", "world"], n=2, max_tokens=3)
    assert evs[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    last = list(client.completions.create(model=MODEL, prompt="hello", stream=True,
                                          stream_options={"include_usage": True}))[-1]
    assert (last.choices, last.usage.prompt_tokens, last.usage.completion_tokens) == ([], 6, 5)


def test_completion_stream_interleaves_choices(http: TestClient, engine: FakeEngine) -> None:
    chunks = chunks_of(post(http, "/v1/completions", prompt=["hello", "world"], n=2, seed=7))
    assert texts(chunks) == {0: "hello", 1: "hello", 2: "world", 3: "world"}
    order = [c["choices"][0]["index"] for c in chunks]
    assert order != sorted(order)  # as the deltas arrive, not one choice after the other
    assert [q.params.seed for q in engine.streamed] == [7, 8, 7, 8]
    assert sorted(c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]) == ["stop"] * 4


def test_completion_stream_echo(client: openai.OpenAI, http: TestClient) -> None:
    chunks = chunks_of(post(http, "/v1/completions", prompt=["hello", "hi"], echo=True, max_tokens=3))
    first = {}
    for c in chunks:
        first.setdefault(c["choices"][0]["index"], c["choices"][0]["text"])
    assert first[0].startswith("hello") and first[1].startswith("hi")
    whole = client.completions.create(model=MODEL, prompt=["hello", "hi"], echo=True, max_tokens=3)
    assert texts(chunks) == {k: c.text for k, c in enumerate(whole.choices)} == {0: "hello hel", 1: "hi hi"}


@pytest.mark.parametrize("echo", [False, True])
def test_completion_stream_logprobs_add_up_to_the_whole(client: openai.OpenAI, http: TestClient, echo: bool) -> None:
    body = {"prompt": "hi hi", "max_tokens": 4, "logprobs": 2, "echo": echo, "extra_body": {"return_token_ids": True}}
    whole = client.completions.create(model=MODEL, **body).choices[0]
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    token_ids = []
    for c in client.completions.create(model=MODEL, stream=True, **body):
        [choice] = c.choices
        assert choice.logprobs is not None and (choice.text or choice.logprobs.tokens or choice.finish_reason)
        for key in joined:
            joined[key] += getattr(choice.logprobs, key)
        token_ids += choice.model_extra["token_ids"]
    assert joined == whole.logprobs.model_dump()
    assert token_ids == whole.model_extra["token_ids"]
    if echo:
        assert joined["top_logprobs"][0] is None and joined["token_logprobs"][0] is None


# ---- chat -----------------------------------------------------------------------------------


def test_chat_stream_chunks(http: TestClient) -> None:
    chunks = chunks_of(post(http, "/v1/chat/completions", messages=HI))
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    choices = [c["choices"][0] for c in chunks]
    assert all(set(ch) == {"index", "delta", "logprobs", "finish_reason"} for ch in choices)
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(ch["delta"]) == {"content"} and ch["delta"]["content"] for ch in choices[1:-1])
    assert (choices[-1]["delta"], choices[-1]["finish_reason"]) == ({}, "stop")
    assert [ch["finish_reason"] for ch in choices[:-1]] == [None] * (len(choices) - 1)
    assert texts(chunks, chat=True) == {0: CHAT_TEXT}


def test_chat_stream_openai_client(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True, n=2, max_tokens=5,
                                                 stream_options={"include_usage": True}))
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    by_index: dict[int, str] = {0: "", 1: ""}
    for c in chunks[:-1]:
        by_index[c.choices[0].index] += c.choices[0].delta.content or ""
        assert c.usage is None
    assert by_index == {0: "[INS", 1: "[INS"}
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"] * 2
    order = [c.choices[0].index for c in chunks[2:-1]]
    assert order != sorted(order)
    assert (chunks[-1].choices, chunks[-1].usage.completion_tokens) == ([], 10)


def test_chat_stream_logprobs(client: openai.OpenAI) -> None:
    body = {"messages": HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(model=MODEL, **body).choices[0].logprobs.content
    streamed = []
    for c in client.chat.completions.create(model=MODEL, stream=True, **body):
        if c.choices[0].logprobs is not None:
            streamed += c.choices[0].logprobs.content
    assert streamed == whole and [len(t.top_logprobs) for t in streamed] == [2, 2, 2]


def test_chat_stream_refusal_without_engine(http: TestClient, engine: FakeEngine) -> None:
    chunks = chunks_of(post(http, "/v1/chat/completions", messages=[{"role": "user", "content": "[INST] x"}]))
    assert texts(chunks, chat=True) == {0: UNSAFE_ERROR}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and engine.streamed == []


# ---- errors and cancellation ----------------------------------------------------------------


@pytest.mark.parametrize("fault, status, message", [
    (ValueError("the prompt does not fit this engine's cache"), 400, "the prompt does not fit this engine's cache"),
    (RankFailedError("rank 1 died"), 503,
     "The model's workers failed (RankFailedError); this replica will be replaced. Retry shortly."),
])
def test_errors_before_the_first_byte_are_http_errors(http: TestClient, engine: FakeEngine, fault: Exception,
                                                      status: int, message: str) -> None:
    engine.faults[1] = (0, fault)  # the second choice fails before its first delta
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "n": 2, "stream": True})
    assert error_of(r, status)["message"] == message
    assert engine.cancelled == [engine.streamed[0]]  # the choice that had started is cancelled


def test_openai_client_errors_before_the_first_byte(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.faults[0] = (0, ValueError("no"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    engine.faults[1] = (0, RankFailedError("rank 1 died"))
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="hi", stream=True)


@pytest.mark.parametrize("fault, kind", [
    (RankFailedError("rank 1 died"), "service_unavailable_error"),
    (DrainingError("this replica is shutting down, and its grace period ended"), "service_unavailable_error"),
    ("timeout", "timeout_error"),
    ("abort", "service_unavailable_error"),
])
@pytest.mark.parametrize("path, extra", [("/v1/completions", {"prompt": "hello world"}),
                                         ("/v1/chat/completions", {"messages": HI})])
def test_errors_mid_stream_are_an_event_without_done(http: TestClient, engine: FakeEngine, fault: Exception | str,
                                                     kind: str, path: str, extra: dict) -> None:
    engine.faults[1] = (3, fault)  # the second choice fails after three deltas
    evs = post(http, path, n=2, **extra)
    assert "[DONE]" not in evs and len(evs) > 2
    assert set(evs[-1]) == {"error"} and set(evs[-1]["error"]) == {"message", "type", "param", "code"}
    assert evs[-1]["error"]["type"] == kind
    assert all("error" not in e for e in evs[:-1])
    assert engine.cancelled == [engine.streamed[0]]  # the other choice stops too


def test_openai_client_raises_on_an_error_event(client: openai.OpenAI, engine: FakeEngine) -> None:
    engine.faults[0] = (2, "timeout")
    stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
    with pytest.raises(openai.APIError, match="request timeout"):
        for _ in stream:
            pass


def test_client_going_away_cancels_every_choice(http: TestClient, engine: FakeEngine) -> None:
    body = {"model": MODEL, "prompt": "hello world " * 3, "n": 3, "max_tokens": 30, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {") and next(lines) == "" and next(lines).startswith("data: {")
    # Leaving the block closes the connection mid-stream; the app has finished by then.
    assert len(engine.streamed) == 3 and sorted(map(id, engine.cancelled)) == sorted(map(id, engine.streamed))


class ServeCancelled(Exception):
    """What Ray Serve's receive() raises when the client has gone (ray's TaskCancelledError)."""


@pytest.mark.parametrize("spec_version", ["2.0", "2.4", "serve"])
def test_disconnect_seen_by_the_asgi_app_cancels_every_choice(engine: FakeEngine, tok: Tokenizer,
                                                              spec_version: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The server's side of a client going away, without a client: ASGI 2.0 servers send
    http.disconnect; 2.4 ones let the next send fail with an OSError; Ray Serve's receive raises
    its cancellation. None of them is an error to log."""
    app = build_api(engine, tok, MODEL, MAX_SEQ_LEN)
    body = json.dumps({"model": MODEL, "prompt": "hello world " * 3, "n": 3, "max_tokens": 30, "stream": True})
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version.replace("serve", "2.0")},
             "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("test", 1), "server": ("testserver", 80)}

    async def run() -> list[bytes]:
        chunks: list[bytes] = []
        two_chunks = asyncio.Event()
        requests = iter([{"type": "http.request", "body": body.encode(), "more_body": False}])

        async def receive() -> dict:
            if (message := next(requests, None)) is not None:
                return message
            await two_chunks.wait()
            if spec_version == "serve":
                raise ServeCancelled("Task: 6afae97c was cancelled.")
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] != "http.response.body":
                return
            if len(chunks) < 2:
                chunks.append(message["body"])
                if len(chunks) == 2:
                    two_chunks.set()
            elif spec_version == "2.4":
                raise OSError("connection reset by peer")
            else:
                await asyncio.sleep(0)  # dropped, as a server does once the client has gone

        try:
            await app(scope, receive, send)
        except ClientDisconnect:
            assert spec_version == "2.4"
        # Checked while the loop still runs: nothing is left for its shutdown to cancel.
        assert len(engine.streamed) == 3 and sorted(map(id, engine.cancelled)) == sorted(map(id, engine.streamed))
        return chunks

    chunks = asyncio.run(run())
    assert len(chunks) == 2 and all(c.startswith(b"data: {") for c in chunks)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_stream_options_need_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed when stream is true"):
        client.chat.completions.create(model=MODEL, messages=HI, stream_options={"include_usage": True})


def test_token_ids_in_chunks(client: openai.OpenAI, tok: Tokenizer) -> None:
    ids = []
    for c in client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, stream=True,
                                            extra_body={"return_token_ids": True}):
        ids += (c.choices[0].model_extra or {}).get("token_ids") or []
    assert ids == [266, 94, 312]
