"""Structured outputs through the HTTP layer against the fake engine of test_api.py: OpenAI's
response_format, vLLM's structured_outputs and its older guided_* fields each become one Grammar
in SamplingParams, on both routes; two constraints, or one the grammar library refuses, are a
400 that says which. What the engine makes of them: tests/unit/engine/test_engine_grammar.py;
end to end with the official client through Serve: tests/ray/test_serve_http.py."""
from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel
from starlette.testclient import TestClient
from test_api import MODEL, FakeEngine, client, engine, error_of, http, tok  # noqa: F401 (fixtures)

from llama.engine.grammar import Grammar

HI = [{"role": "user", "content": "hi"}]
ROUTES = [("/v1/completions", {"prompt": "hi there"}), ("/v1/chat/completions", {"messages": HI})]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

SPELLINGS = [
    ({"response_format": {"type": "json_object"}}, Grammar.json_schema({"type": "object"})),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     Grammar.json_schema(SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "any"}}}, Grammar.json_schema({})),
    ({"structured_outputs": {"json": SCHEMA}}, Grammar.json_schema(SCHEMA)),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, Grammar.json_schema(SCHEMA)),
    ({"structured_outputs": {"regex": "[a-z]+"}}, Grammar("regex", "[a-z]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, Grammar.choice(["yes", "no"])),
    ({"structured_outputs": {"grammar": 'start: "a"+'}}, Grammar("grammar", 'start: "a"+')),
    ({"structured_outputs": {"json_object": True}}, Grammar.json_schema({"type": "object"})),
    ({"guided_json": SCHEMA}, Grammar.json_schema(SCHEMA)),
    ({"guided_regex": "[0-9]{3}"}, Grammar("regex", "[0-9]{3}")),
    ({"guided_choice": ["a", "b"]}, Grammar.choice(["a", "b"])),
    ({"guided_grammar": 'root ::= "x"'}, Grammar("grammar", 'root ::= "x"')),
    ({"response_format": {"type": "text"}}, None),
]


@pytest.mark.parametrize("path, base", ROUTES)
@pytest.mark.parametrize("fields, grammar", SPELLINGS)
def test_each_spelling_becomes_one_grammar_on_both_routes(http: TestClient, engine: FakeEngine, path, base, fields,
                                                          grammar) -> None:
    r = http.post(path, json={"model": MODEL, **base, "max_tokens": 4, "n": 2, **fields})
    assert r.status_code == 200, r.text
    assert [q.params.grammar for q in engine.calls[0]] == [grammar, grammar]


def test_the_official_clients_parse_sends_its_pydantic_models_schema(client: openai.OpenAI, engine: FakeEngine) -> None:
    class Answer(BaseModel):
        city: str
        population: int

    with pytest.raises(Exception):  # the fake engine echoes the prompt, which is no JSON: the client says so
        client.chat.completions.parse(model=MODEL, messages=HI, response_format=Answer, max_tokens=4)
    g = engine.calls[0][0].params.grammar
    assert g.kind == "json_schema" and json.loads(g.text)["properties"].keys() == {"city", "population"}


@pytest.mark.parametrize("fields, says", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "this request sets guided_regex and guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "this request sets response_format and structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a(", }}, "the regular expression cannot be used"),
    ({"guided_json": {"type": "nonsense"}}, "the JSON schema cannot be used: Invalid type: nonsense"),
    ({"guided_json": "{not json"}, "the JSON schema is not JSON"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structural_tag"),
    ({"response_format": {"type": "json_schema"}}, 'type "json_schema" needs json_schema'),
    ({"guided_choice": []}, "guided_choice"),
])
def test_a_constraint_that_cannot_be_used_is_a_400_that_says_why(http: TestClient, engine: FakeEngine, fields,
                                                                  says) -> None:
    for path, base in ROUTES:
        err = error_of(http.post(path, json={"model": MODEL, **base, **fields}), 400)
        assert says in err["message"], err
    assert not engine.calls
