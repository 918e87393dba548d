"""ToolCallParser: a recorded tool-call answer (Meta's own, from llama-models' Llama 3.1 prompt
format page) and others, cut every possible way (whole, one token per piece, every split in
two or three pieces, inside the JSON or not), give the same content and calls; what is not a
call stays content."""
from __future__ import annotations

import importlib.resources
import json
import re

import pytest

from deploy.tool_calls import ParsedCall, ToolCallParser

NAMES = frozenset({"trending_songs", "get_weather", "now"})


def metas_answer() -> str:
    """The model's answer in llama-models' "JSON based tool calling" example, its end token cut."""
    pytest.importorskip("llama_models")
    page = (importlib.resources.files("llama_models") / "llama3_1" / "prompt_format.md").read_text(encoding="utf-8")
    section = page[page.index("## JSON based tool calling"):]
    answer = re.search(r"##### Model Response Format\n```\n(.*?)```", section, re.S).group(1)
    return answer.rstrip("\n").removesuffix("<|eom_id|>")


def parse(pieces: list[str], names: frozenset[str] = NAMES, parallel: bool = True) -> tuple[str, list[ParsedCall]]:
    p = ToolCallParser(names, parallel)
    content, calls = "", []
    for piece in pieces:
        out = p.feed(piece)
        content, calls = content + out.content, calls + out.calls
    out = p.finish()
    return content + out.content, calls + out.calls


def cuts(text: str) -> list[list[str]]:
    """Every way to cut `text` in two or three pieces, and in single characters."""
    out = [[text], list(text)]
    for i in range(len(text) + 1):
        out.append([text[:i], text[i:]])
        for j in range(i, len(text) + 1, 3):
            out.append([text[:i], text[i:j], text[j:]])
    return out


PARALLEL = ('{"name": "get_weather", "parameters": {"city": "Paris; \\"Île\\" {de} [France]", "unit": "C"}}; '
            '{"name": "now", "parameters": {}}')
ANSWERS = [
    # (text, parallel, content, calls)
    (metas_answer, True, "", [ParsedCall("trending_songs", '{"n": "10", "genre": "all"}')]),
    (lambda: PARALLEL, True, "", [ParsedCall("get_weather", '{"city": "Paris; \\"Île\\" {de} [France]", "unit": "C"}'),
                                  ParsedCall("now", "{}")]),
    (lambda: PARALLEL, False, '{"name": "now", "parameters": {}}',
     [ParsedCall("get_weather", '{"city": "Paris; \\"Île\\" {de} [France]", "unit": "C"}')]),
    (lambda: '  {"name": "now", "arguments": {}} and that is all.', True, "and that is all.", [ParsedCall("now", "{}")]),
    (lambda: 'It is {"name": "now"}', True, 'It is {"name": "now"}', []),
    (lambda: '{"name": "nobody", "parameters": {}}; {"name": "now"}', True,
     '{"name": "nobody", "parameters": {}}; {"name": "now"}', []),
    (lambda: '{"name": "now", "parameters": {"unclosed": [1, 2}', True, '{"name": "now", "parameters": {"unclosed": [1, 2}',
     []),
    (lambda: '\n{"a": 1}', True, '\n{"a": 1}', []),  # JSON content, not a call
    (lambda: "<|python_", True, "<|python_", []),
    (lambda: " ", True, " ", []),
]


@pytest.mark.parametrize("answer, parallel, content, calls", ANSWERS)
def test_every_way_of_cutting_an_answer_gives_the_same_content_and_calls(answer, parallel, content, calls):
    text = answer()
    for pieces in cuts(text):
        assert parse(pieces, parallel=parallel) == (content, calls), pieces


def test_one_token_per_piece_as_a_stream_brings_them(tmp_path):
    pytest.importorskip("llama_models")
    from llama.tokenizers.load import load_tokenizer
    from tests.tokenizer_files import llama3_tokenizer_model

    tok = load_tokenizer(llama3_tokenizer_model())
    for text in (metas_answer(), PARALLEL):
        ids = tok.encode_with_special_tokens(text)
        pieces = [tok.decode(ids[:k + 1])[len(tok.decode(ids[:k])):] for k in range(len(ids))]
        assert "".join(pieces) == text and len(pieces) > 10
        assert parse(pieces) == parse([text]) and parse([text])[1]


def test_content_is_sent_as_it_comes_and_a_call_once_it_closes():
    p = ToolCallParser(NAMES, True)
    assert p.feed("  ").content == ""  # a call may still come
    assert p.feed("Hello").content == "  Hello"
    assert p.feed(" {there").content == " {there"
    p = ToolCallParser(NAMES, True)
    assert p.feed('{"name": "now", "parameters": {').calls == []
    done = p.feed("}}; ")
    assert done.calls == [ParsedCall("now", "{}")] and p.calls == 1
    assert json.loads(done.calls[0].arguments) == {}
