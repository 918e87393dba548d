"""Hugging Face-format Llama folders at model-parallel size 2, against transformers run in this
process on the same files. Every test case (sharded safetensors with Llama 3's tokenizer.json;
Llama 3.1 rope scaling with tied embeddings; open_llama's sentencepiece layout) through a gang:
transformers' greedy tokens and logprobs (to 1e-4). The first, with Meta's Llama 3.1 chat
template, through Ray Serve as well: completions the same, and chat's prompt apply_chat_template's,
so its answer is transformers'; a tool round trip with the official client (the call enforced,
whole and streamed alike, its result sent back, the answer transformers' answer)."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from llama.engine.request import GenerationRequest, SamplingParams
from tests.conftest import gang_config, streamed_tool_calls
from tests.hf_reference import CASES, make_hf_checkpoint, transformers_chat_ids, transformers_greedy
from tests.ray.serving import check_chat, check_completions, served
from tests.tokenizer_files import LLAMA31_CHAT_TEMPLATE

pytest.importorskip("transformers")

MODEL = "hf-tiny"
PROMPTS = ["The capital of France is", "Hello, world! <|eot_id|> stays text", "naïve café 😀"]
DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a llama."},
          {"role": "assistant", "content": "Lola."}, {"role": "user", "content": "And another?"}]
MAX_NEW = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf"), "llama3-sharded-gqa", LLAMA31_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def reference(ckpt):
    from llama.tokenizers.load import load_tokenizer

    tok = load_tokenizer(ckpt / "tokenizer.json")
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    chat = transformers_chat_ids(ckpt, DIALOG)
    return {"completions": transformers_greedy(ckpt, prompts, MAX_NEW), "chat_ids": chat,
            "chat": transformers_greedy(ckpt, [chat], MAX_NEW)[0]}


@pytest.fixture(scope="module")
def client(reference, ckpt, ray_local):
    with served(ckpt, MODEL, max_seq_len=512) as c:  # room for the tools' prompt
        yield c


def test_completions_give_transformers_tokens_and_logprobs_at_mp2(client, reference):
    check_completions(client, MODEL, PROMPTS, MAX_NEW, reference["completions"])


def test_chat_prompt_is_the_templates_and_the_answer_transformers_answer(client, reference):
    check_chat(client, MODEL, DIALOG, MAX_NEW, reference["chat_ids"], reference["chat"][0])


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]},
                                                    "days": {"type": "integer", "minimum": 0, "maximum": 30}},
                   "required": ["city", "unit"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_a_tool_round_trip_through_serve_gives_transformers_answer(client, ckpt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ckpt)
    kw = dict(model=MODEL, tools=[WEATHER, NOW], temperature=0, max_tokens=40)
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(messages=ASK, tool_choice=named, **kw)
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # a random model's
    assert first.usage.prompt_tokens == len(hf.apply_chat_template(ASK, tools=[WEATHER, NOW], add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False))
    streamed = streamed_tool_calls(client.chat.completions.create(messages=ASK, tool_choice=named, stream=True, **kw))
    assert streamed == ("", [{"name": "get_weather", "arguments": call.function.arguments}], "tool_calls")

    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    answer = client.chat.completions.create(messages=ASK + [first.choices[0].message, result], tool_choice="none",
                                            extra_body={"return_token_ids": True}, **kw).choices[0]
    theirs = ASK + [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": json.loads(call.function.arguments)}}]}, result]
    prompt = hf.apply_chat_template(theirs, tools=[WEATHER, NOW], add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    ours = httpx.post(f"{base}/tokenize", json={"messages": ASK + [first.choices[0].message.model_dump(), result],
                                                "tools": [WEATHER, NOW]}, timeout=60).json()["tokens"]
    assert ours == list(prompt)
    assert answer.model_extra["token_ids"] == transformers_greedy(ckpt, [list(prompt)], 40)[0][0]


def test_required_parallel_calls_validate_at_any_seed_through_serve(client):
    resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, NOW], tool_choice="required",
                                          temperature=1.0, seed=5, n=4, max_tokens=120)
    for choice in resp.choices:  # calls until the model ends them, or until max_tokens cuts one short
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            schema = {"get_weather": WEATHER, "now": NOW}[call.function.name]["function"].get("parameters", {})
            jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_layout_at_mp2_gives_transformers_tokens_and_logprobs(case, tmp_path, ray_local):
    from cluster.group import RankGroup

    ckpt = make_hf_checkpoint(tmp_path / case, case)
    config = gang_config(ckpt, 2, max_batch_size=4, cpus_per_rank=1.0)
    tok = config.checkpoint.tokenizer()
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    want = transformers_greedy(ckpt, prompts, MAX_NEW)
    group = RankGroup.start(config)
    try:
        out = group.generate([GenerationRequest(tuple(p), SamplingParams(max_tokens=MAX_NEW, temperature=0, logprobs=0))
                              for p in prompts])
    finally:
        group.shutdown()
    assert [o.token_ids for o in out] == [t for t, _ in want]
    for o, (_, ref) in zip(out, want):
        assert max(abs(a - b) for a, b in zip(o.logprobs, ref)) < 1e-4
