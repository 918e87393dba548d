"""Tool calling through the HTTP layer with the official openai client, against test_api.py's fake
engine made to answer a scripted text, on Meta's Llama 3 tokenizer (Llama 3.1's tool format):
the tools reach the prompt, tool_choice becomes the grammar it should, answers come back as
OpenAI's tool_calls (whole and streamed, the same), and each mistake is a 400 that says what to
change. The prompts themselves: tests/unit/tokenizers/test_tool_format.py; a real model through
Serve: tests/ray/test_hf_checkpoints.py and tests/ray/test_meta_files_http.py."""
from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from starlette.testclient import TestClient
from test_api import MAX_SEQ_LEN, MODEL, FakeEngine, error_of, tok  # noqa: F401 (fixtures)

from deploy.api import build_api
from llama.engine.request import GenerationRequest, StreamDelta
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.load import load_tokenizer
from tests.conftest import streamed_tool_calls

pytest.importorskip("llama_models")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'


class ScriptedEngine(FakeEngine):
    """The fake engine, answering `reply` (token by token) instead of the prompt."""

    reply = ""

    def _deltas(self, r: GenerationRequest) -> list[StreamDelta]:
        return super()._deltas(GenerationRequest(tuple(self.tok.encode(self.reply, bos=False, eos=False)), r.params))


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    from tests.tokenizer_files import llama3_tokenizer_model

    return load_tokenizer(llama3_tokenizer_model())


@pytest.fixture
def engine(llama3: Tokenizer) -> ScriptedEngine:
    return ScriptedEngine(llama3)


@pytest.fixture
def http(engine: ScriptedEngine, llama3: Tokenizer) -> Iterator[TestClient]:
    with TestClient(build_api(engine, llama3, MODEL, 4096)) as client:
        yield client
    assert engine.places.held == 0


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def test_auto_reads_a_call_out_of_the_answer_whole_and_streamed_alike(client, engine, llama3):
    engine.reply = "<|python_tag|>" + CALL.replace('"name"', '"type": "function", "name"')
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, NOW], max_tokens=64)
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    content, calls, finish = streamed_tool_calls(client.chat.completions.create(**kw, stream=True))
    assert (content, finish) == ("", "tool_calls")
    assert calls == [{"name": "get_weather", "arguments": call.function.arguments}]
    prompt = llama3.decode(list(engine.calls[0][0].prompt_tokens))
    assert "Environment: ipython" in prompt and '"name": "get_weather"' in prompt and '"name": "now"' in prompt
    assert engine.calls[0][0].params.grammar is None  # auto: the model is free


def test_the_clients_own_answer_goes_back_into_the_history(client, engine):
    engine.reply = CALL
    kw = dict(model=MODEL, tools=[WEATHER], max_tokens=64)
    message = client.chat.completions.create(messages=ASK, **kw).choices[0].message  # with its nulls (refusal, ...)
    engine.reply = "Sunny."
    history = ASK + [message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21 C"}]
    assert client.chat.completions.create(messages=history, **kw).choices[0].message.content == "Sunny."


def test_auto_leaves_an_answer_that_is_no_call_as_content(client, engine):
    engine.reply = "It is sunny in Paris."
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=64)
    whole = client.chat.completions.create(**kw).choices[0]
    assert (whole.message.content, whole.message.tool_calls, whole.finish_reason) == (engine.reply, None, "stop")
    assert streamed_tool_calls(client.chat.completions.create(**kw, stream=True)) == (engine.reply, [], "stop")


def test_parallel_calls_each_get_their_index_and_id(client, engine):
    engine.reply = CALL + '; {"name": "now", "parameters": {}}'
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, NOW], max_tokens=64, n=2, temperature=1.0, seed=3)
    for choice in client.chat.completions.create(**kw).choices:
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "now"]
        assert len({c.id for c in choice.message.tool_calls}) == 2
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in one.message.tool_calls] == ["get_weather"]
    assert one.message.content == '{"name": "now", "parameters": {}}'  # past the one call: text


@pytest.mark.parametrize("choice, parallel, kind, names", [
    ("required", True, "grammar", ["get_weather", "now"]),
    ("required", False, "json_schema", ["get_weather", "now"]),
    ({"type": "function", "function": {"name": "now"}}, True, "json_schema", ["now"]),
])
def test_required_and_named_choices_become_the_calls_grammar(client, engine, choice, parallel, kind, names):
    engine.reply = '{"type": "function", "name": "now", "parameters": {}}'
    resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, NOW], tool_choice=choice,
                                          parallel_tool_calls=parallel, max_tokens=32).choices[0]
    assert resp.finish_reason == "tool_calls" and resp.message.tool_calls[0].function.name == "now"
    g = engine.calls[0][0].params.grammar
    assert g.kind == kind and all(f'"const": "{n}"' in g.text for n in names)
    assert '"type": {"const": "function"}' in g.text  # Meta's format writes the call's type first
    assert ('"; "' in g.text) == (kind == "grammar")  # parallel calls, separated as the parser reads them


def test_none_shows_the_tools_and_reads_no_calls(client, engine, llama3):
    engine.reply = CALL
    resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=64).choices[0]
    assert (resp.message.content, resp.finish_reason) == (CALL, "stop")
    assert '"name": "get_weather"' in llama3.decode(list(engine.calls[0][0].prompt_tokens))


def test_a_history_of_calls_and_results_reaches_the_prompt(client, engine, llama3):
    engine.reply = "Sunny, 21 C."
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments":
                                                             '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": [{"type": "text", "text": '{"temp": 21}'}]}]
    resp = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=64).choices[0]
    assert (resp.message.content, resp.finish_reason) == ("Sunny, 21 C.", "stop")
    prompt = llama3.decode(list(engine.calls[0][0].prompt_tokens))
    assert prompt.endswith('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'
                           '<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
                           '<|start_header_id|>assistant<|end_header_id|>\n\n')


CALLED = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                               "function": {"name": "get_weather", "arguments": "[1]"}}]}


@pytest.mark.parametrize("extra, param, says", [
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "names the function 'nope', which is not among the tools (get_weather)"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools have the same function name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "send one of them"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", None),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", None),
    ({"messages": ASK + [CALLED, {"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages",
     "has a tool call whose function.arguments is not a JSON object's text ('[1]')"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages[1]", "needs content"),
    ({"messages": ASK + [{**CALLED, "role": "user", "content": "x"}]}, "messages[1]", "only assistant messages"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages", "one 'tool' message"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "the parameters of the function 'f' cannot be enforced: the JSON schema "
                                           "cannot be used: Invalid type: nonsense"),
])
def test_mistakes_are_400s_that_say_what_to_change(http, engine, extra, param, says):
    err = error_of(http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra}), 400)
    assert err["param"] == param or param is None, err
    assert says is None or says in err["message"], err
    assert not engine.calls


def test_a_llama2_model_refuses_tools_and_says_why(tok):  # test_api.py's tiny sentencepiece model
    engine = FakeEngine(tok)
    with TestClient(build_api(engine, tok, MODEL, MAX_SEQ_LEN)) as http:
        err = error_of(http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": [WEATHER]}),
                       400)
        assert err["param"] == "tools" and "Llama 2's [INST]) has no tool calling" in err["message"]
        ok = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4})
        assert ok.status_code == 200


def test_the_model_list_says_what_each_model_takes(client, tok):
    card = client.models.list().data[0].model_extra
    assert card["capabilities"] == {"chat_format": "llama3", "tool_choice": ["none", "auto", "required", "function"],
                                    "structured_outputs": ["json_object", "json_schema", "regex", "choice", "grammar"],
                                    "parallel_tool_calls": True}
    assert card["max_model_len"] == 4096
    with TestClient(build_api(FakeEngine(tok), tok, MODEL, MAX_SEQ_LEN)) as http:
        llama2 = http.get("/v1/models").json()["data"][0]["capabilities"]
    assert llama2["chat_format"] == "llama2" and llama2["tool_choice"] == [] and not llama2["parallel_tool_calls"]


def test_enforced_calls_close_the_objects_a_schema_leaves_open(client, engine):
    # Left open, a weak model wanders into keys of its own and never ends the call (xgrammar's
    # strict mode, vLLM's default, reads schemas this way too).
    engine.reply = '{"type": "function", "name": "f", "parameters": {}}'
    nested = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"const": {"properties": {}}}}},
        "open": {"type": "object", "properties": {"b": {}}, "additionalProperties": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {"c": {"type": "integer"}}}}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": nested}}
    client.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], tool_choice="required", max_tokens=8,
                                   parallel_tool_calls=False)
    call = json.loads(engine.calls[0][0].params.grammar.text)["properties"]["parameters"]
    assert call["additionalProperties"] is False and set(call["properties"]) == {"properties", "open", "list"}
    inner = call["properties"]["properties"]
    assert inner["additionalProperties"] is False and inner["properties"]["a"] == {"const": {"properties": {}}}
    assert call["properties"]["open"]["additionalProperties"] is True
    assert call["properties"]["list"]["items"]["additionalProperties"] is False
