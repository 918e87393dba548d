"""Tools in chat prompts: Meta's Llama 3.1 JSON tool format (against the prompt Meta's llama-models
documents in its llama3_1/prompt_format.md, and against its ChatFormat for calls and tool
results), a Hugging Face folder's chat template given tools (against transformers'
apply_chat_template with Meta's Llama 3.1 template), id for id; Llama 2 refuses tools; the
role order with tool messages."""
from __future__ import annotations

import importlib.resources
import re
from datetime import date

import pytest

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import encode_dialog
from llama.tokenizers.load import load_tokenizer
from tests.conftest import GOLDEN_CKPT

pytest.importorskip("llama_models")

# The tool of Meta's own example, as an OpenAI client sends it.
TRENDING = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "description": "The number of songs to return"},
        "genre": {"type": "string", "description": "The genre of the songs to return"}}, "required": ["n"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Its name"},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
NO_ARGS = {"type": "function", "function": {"name": "now"}}
CALL = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
ROUND_TRIP = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1"},
]


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    from tests.tokenizer_files import llama3_tokenizer_model

    return load_tokenizer(llama3_tokenizer_model())


def _meta_example(title: str) -> str:
    """The input prompt of one of the examples in llama-models' Llama 3.1 prompt format page."""
    page = (importlib.resources.files("llama_models") / "llama3_1" / "prompt_format.md").read_text(encoding="utf-8")
    section = page[page.index(f"## {title}"):]
    block = re.search(r"##### Input Prompt Format\n```\n(.*?)```", section, re.S).group(1)
    return block[:-1]  # the page puts a line break after the prompt, which ends "\n\n"


def test_the_tool_prompt_is_metas_json_tool_calling_example(llama3):
    dialog = [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "Use tools to get latest trending songs"}]
    ids = encode_dialog(llama3, dialog, [TRENDING], today=date(2024, 9, 21))
    assert llama3.decode(ids) == _meta_example("JSON based tool calling")
    assert ids == llama3.encode_with_special_tokens(_meta_example("JSON based tool calling"))


def test_calls_and_tool_results_are_encoded_as_metas_chat_format_encodes_them(llama3):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from llama.tokenizers.llama3_tools import tool_list_prompt, tool_system_prompt
    from tests.tokenizer_files import llama3_tokenizer_model

    today = date(2026, 1, 5)
    two_calls = {**ROUND_TRIP[2], "content": "Checking.", "tool_calls": [CALL, {**CALL, "id": "call_2"}]}
    dialog = ROUND_TRIP[:2] + [two_calls, ROUND_TRIP[3], {**ROUND_TRIP[3], "tool_call_id": "call_2"},
                               {"role": "assistant", "content": "21 C."}, {"role": "user", "content": "Thanks"}]
    tools = [WEATHER, NO_ARGS, TRENDING]
    meta = [RawMessage(role="system", content=tool_system_prompt("You are terse.", today)),
            RawMessage(role="user", content=tool_list_prompt(tools))]
    for m in dialog[1:]:
        calls = [ToolCall(call_id=c["id"], tool_name=c["name"], arguments=c["arguments"]) for c in m.get("tool_calls", ())]
        meta.append(RawMessage(role=m["role"], content=m["content"], tool_calls=calls,
                               stop_reason=StopReason.end_of_message if calls else StopReason.end_of_turn))
    want = ChatFormat(MetaTokenizer(llama3_tokenizer_model())).encode_dialog_prompt(meta).tokens
    assert encode_dialog(llama3, dialog, tools, today=today) == want
    text = llama3.decode(want)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temperature\": 21}<|eot_id|>" in text
    assert 'Checking.{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}' in text
    assert '"required": ["city", "unit"]' in text and '"properties": [\n            ],' in text  # now() has none


def test_without_tools_the_llama3_prompt_has_no_tool_preamble(llama3):
    plain = [{"role": "user", "content": "hi"}]
    assert encode_dialog(llama3, plain, None) == encode_dialog(llama3, plain, []) == encode_dialog(llama3, plain)
    assert "Environment" not in llama3.decode(encode_dialog(llama3, plain))


@pytest.fixture(scope="module")
def llama31_template(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.tokenizer_files import LLAMA31_CHAT_TEMPLATE, write_hf_tokenizer

    path = write_hf_tokenizer(tmp_path_factory.mktemp("llama31"), "llama3", chat_template=LLAMA31_CHAT_TEMPLATE)
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path.parent)


def _transformers_message(m: dict) -> dict:
    """A message as transformers takes it (a call's arguments as a dict, as vLLM passes them)."""
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]
    return out


@pytest.mark.parametrize("dialog, tools", [
    (ROUND_TRIP[:2], [WEATHER]),
    (ROUND_TRIP[1:2], [WEATHER, NO_ARGS, TRENDING]),
    (ROUND_TRIP, [WEATHER, TRENDING]),
    (ROUND_TRIP + [{"role": "assistant", "content": "21 C."}, {"role": "user", "content": "And Rome?"}], [WEATHER]),
    (ROUND_TRIP, None),  # a history with calls, and no tools offered now
])
def test_a_templates_tool_prompt_is_transformers(llama31_template, dialog, tools):
    ours, theirs = llama31_template
    want = theirs.apply_chat_template([_transformers_message(m) for m in dialog], tools=tools,
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_dialog(ours, dialog, tools) == want


def test_llama2_has_no_tool_format():
    tok = load_tokenizer(GOLDEN_CKPT / "tokenizer.model")
    with pytest.raises(ValueError, match="Llama 2's .* has no way to show tools"):
        encode_dialog(tok, ROUND_TRIP[1:2], [WEATHER])
    with pytest.raises(ValueError, match="has no way to show tools"):
        encode_dialog(tok, ROUND_TRIP[1:])


@pytest.mark.parametrize("roles", [
    ["user", "assistant*", "user"],  # calls left unanswered
    ["user", "tool"],  # a result nobody asked for
    ["user", "assistant", "tool"],
    ["user", "assistant*", "tool", "user", "user"],
])
def test_tool_messages_follow_the_calls_they_answer(llama3, roles):
    dialog = [{"role": r.rstrip("*"), "content": "x", **({"tool_calls": [CALL]} if r.endswith("*") else {}),
               **({"tool_call_id": "call_1"} if r == "tool" else {})} for r in roles]
    with pytest.raises(ValueError, match="one 'tool' message per call"):
        encode_dialog(llama3, dialog, [WEATHER])


def test_a_dialog_may_go_on_after_tool_results(llama3):
    roles = ["system", "user", "assistant*", "tool", "tool", "assistant*", "tool", "assistant", "user"]
    dialog = [{"role": r.rstrip("*"), "content": "x", **({"tool_calls": [CALL]} if r.endswith("*") else {}),
               **({"tool_call_id": "call_1"} if r == "tool" else {})} for r in roles]
    for end in (4, 5, 7, 9):
        assert encode_dialog(llama3, dialog[:end], [WEATHER])
