"""Meta's checkpoints cut for several ranks, served through Ray Serve with another cut: Llama 3.1
(the embedding cut by its vocabulary, the real tokenizer, scaled rope) and Llama 2 (cut by its
width): Llama 3.1 as 4 files at model-parallel size 2 and in two pipeline stages of 2 ranks,
Llama 2's 4 files in two stages of 1 rank, and each as 2 files at size 4 (GET /cluster names
each rank's stage and layers; the library's and the gang's tiers run more splits). Completions give
Meta's reference's greedy tokens and logprobs (to 1e-4; tests/meta_reference.py, computed in
this process before Ray starts); chat's prompt is the reference formatter's (Llama 3) and its
answer the reference's answer; a streamed completion adds up to the whole one. A tool round
trip in Llama 3.1's tool format (Llama 2's chat format has none: a 400 that says so), its prompt
llama-models' ChatFormat's."""
from __future__ import annotations

import json
from datetime import date

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import streamed_tool_calls
from tests.meta_reference import META_DIALOG, META_MAX_GEN, META_PROMPTS
from tests.ray.serving import check_chat, check_completions, served

pytest.importorskip("llama_models")

MODEL = "llama-tiny"
# (Llama version, files, model-parallel size, pipeline stages)
LAYOUTS = [(3, 4, 2, 1), (3, 2, 4, 1), (2, 4, 1, 2), (2, 2, 4, 1), (3, 4, 2, 2)]


@pytest.fixture(scope="module", params=LAYOUTS,
                ids=[f"llama{v}-{n}files-mp{m}" + (f"-pp{p}" if p > 1 else "") for v, n, m, p in LAYOUTS])
def served_layout(request, meta_files, meta_references, ray_local):
    version, n, mp, pp = request.param
    with served(meta_files[version, n], MODEL, mp, max_seq_len=512, pp=pp) as client:  # room for the tools' prompt
        yield client, meta_references[version]


def test_completions_give_the_reference_tokens_and_logprobs(served_layout):
    client, (prompts, want) = served_layout
    check_completions(client, MODEL, META_PROMPTS, META_MAX_GEN, want[:len(META_PROMPTS)])


def test_chat_prompt_is_the_reference_formatters_and_the_answer_the_reference_answer(served_layout):
    client, (prompts, want) = served_layout
    check_chat(client, MODEL, META_DIALOG, META_MAX_GEN, prompts[-1], want[-1][0])


def test_cluster_shows_each_ranks_stage_and_its_layers(served_layout, request):
    _, _, mp, pp = request.node.callspec.params["served_layout"]
    client, _ = served_layout
    info = httpx.get(str(client.base_url).removesuffix("/v1/") + "/cluster", timeout=30).json()
    assert (info["world_size"], info["pipeline_parallel_size"], info["model_parallel_size"]) == (mp * pp, pp, mp)
    layers = [[0, 2]] if pp == 1 else [[0, 1], [1, 2]]  # the model's 2 layers, split evenly
    assert [(r["stage"], r["tp_rank"], r["layers"]) for r in info["ranks"]] == [
        (s, t, layers[s]) for s in range(pp) for t in range(mp)]


def test_a_streamed_completion_adds_up_to_the_whole_one(served_layout):
    client, _ = served_layout
    chunks = client.completions.create(model=MODEL, prompt=META_PROMPTS[2], max_tokens=META_MAX_GEN, temperature=0,
                                       stream=True)
    whole = client.completions.create(model=MODEL, prompt=META_PROMPTS[2], max_tokens=META_MAX_GEN, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]


def test_a_tool_round_trip_in_metas_format(served_layout, request):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from llama.tokenizers.llama3_tools import tool_list_prompt, tool_system_prompt
    from tests.tokenizer_files import llama3_tokenizer_model

    client, _ = served_layout
    if request.node.callspec.params["served_layout"][2:] not in ((2, 1), (1, 2)):  # Llama 3's, Llama 2's
        pytest.skip("the prompt and the parser do not depend on the ranks: run once for each Llama")
    kw = dict(model=MODEL, tools=[WEATHER], temperature=0, max_tokens=80)
    named = {"type": "function", "function": {"name": "get_weather"}}
    if client.models.list().data[0].model_extra["capabilities"]["chat_format"] == "llama2":
        with pytest.raises(openai.BadRequestError, match="Llama 2's .* has no tool calling"):
            client.chat.completions.create(messages=ASK, **kw)
        return
    first = client.chat.completions.create(messages=ASK, tool_choice=named, **kw).choices[0]
    assert first.finish_reason == "tool_calls", first
    (call,) = first.message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    streamed = streamed_tool_calls(client.chat.completions.create(messages=ASK, tool_choice=named, stream=True, **kw))
    assert streamed == ("", [{"name": "get_weather", "arguments": call.function.arguments}], "tool_calls")

    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    history = ASK + [first.message.model_dump(), result]
    answer = client.chat.completions.create(messages=history, tool_choice="none", **kw).choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    ours = httpx.post(f"{base}/tokenize", json={"messages": history, "tools": [WEATHER]}, timeout=60).json()["tokens"]
    meta = [RawMessage(role="system", content=tool_system_prompt("Be brief.", date.today())),
            RawMessage(role="user", content=tool_list_prompt([WEATHER])), RawMessage(role="user", content=ASK[1]["content"]),
            RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                       tool_calls=[ToolCall(call_id=call.id, tool_name="get_weather", arguments=args)]),
            RawMessage(role="tool", content=result["content"])]
    assert ours == ChatFormat(MetaTokenizer(llama3_tokenizer_model())).encode_dialog_prompt(meta).tokens
