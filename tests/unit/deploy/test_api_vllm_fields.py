"""vLLM's request extensions through the HTTP layer against the fake engine of test_api.py: what
each implemented one becomes in SamplingParams (or in the prompt) on both routes, the vocabulary
checks, bad_words encoded as vLLM encodes them, and every vLLM field this server does not
implement refused by name unless it is sent at its "off" value. Their effect in the engine:
tests/unit/engine/test_engine_vllm_sampling.py."""
from __future__ import annotations

import openai
import pytest
from starlette.testclient import TestClient
from test_api import MODEL, MAX_SEQ_LEN, FakeEngine, client, engine, error_of, http, tok  # noqa: F401 (fixtures)

from deploy.schemas import ChatCompletionRequest, CompletionRequest
from deploy.tokenization import bad_words_token_ids
from llama.tokenizers.base import Tokenizer

HI = [{"role": "user", "content": "hi"}]
ROUTES = [("/v1/completions", {"prompt": "hi there"}), ("/v1/chat/completions", {"messages": HI})]


def test_each_extension_reaches_sampling_params_on_both_routes(client: openai.OpenAI, engine: FakeEngine) -> None:
    extra = {"min_p": 0.25, "repetition_penalty": 1.3, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [7, 9],
             "allowed_token_ids": [5, 6, 7], "bad_words": ["hello"], "include_stop_str_in_output": True,
             "skip_special_tokens": False}
    client.completions.create(model=MODEL, prompt="hi", max_tokens=8, extra_body=extra)
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, extra_body=extra)
    for call in engine.calls:
        p = call[0].params
        assert (p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos) == (0.25, 1.3, 2, True)
        assert (p.stop_token_ids, p.allowed_token_ids) == ((7, 9), (5, 6, 7))
        assert p.bad_words and (p.include_stop_str_in_output, p.skip_special_tokens) == (True, False)


def test_left_out_they_take_vllms_defaults(client: openai.OpenAI, engine: FakeEngine) -> None:
    client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
    p = engine.calls[0][0].params
    assert (p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos, p.stop_token_ids, p.allowed_token_ids,
            p.bad_words, p.include_stop_str_in_output, p.skip_special_tokens) == (0, 1, 0, False, (), None, (),
                                                                                  False, True)
    assert not p.adjusts_logits


def test_what_vllm_bench_serve_sends_is_served(http: TestClient, engine: FakeEngine) -> None:
    # vllm/benchmarks/lib/endpoint_request_func.py, async_request_openai_completions (vLLM 0.32.0)
    body = {"model": MODEL, "prompt": "hi there", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    assert engine.calls[0][0].params.ignore_eos


@pytest.mark.parametrize("path, base", ROUTES)
@pytest.mark.parametrize("field", ["stop_token_ids", "allowed_token_ids"])
def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_field(http: TestClient, engine: FakeEngine,
                                                                     tok: Tokenizer, path, base, field) -> None:
    err = error_of(http.post(path, json={"model": MODEL, **base, field: [3, tok.n_words]}), 400)
    assert err["param"] == field and str(tok.n_words) in err["message"] and not engine.calls


@pytest.mark.parametrize("body, param", [({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
                                         ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                                         ({"allowed_token_ids": []}, "allowed_token_ids"),
                                         ({"bad_words": [""]}, "bad_words"),
                                         ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")])
def test_out_of_range_values_are_a_400_naming_the_field(http: TestClient, engine: FakeEngine, body, param) -> None:
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", **body}), 400)
    assert param in (err["param"] or "") + err["message"] and not engine.calls


def test_truncate_prompt_tokens_keeps_the_last_tokens_and_echoes_what_ran(client: openai.OpenAI, engine: FakeEngine,
                                                                          tok: Tokenizer) -> None:
    ids = list(range(10, 30))
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True,
                                  extra_body={"truncate_prompt_tokens": 5})
    assert list(engine.calls[0][0].prompt_tokens) == ids[-5:]
    assert r.choices[0].text.startswith(tok.decode(ids[-5:])) and r.usage.prompt_tokens == 5
    long_ids = [10 + k % 200 for k in range(MAX_SEQ_LEN + 40)]  # longer than the model: -1 keeps what fits
    client.completions.create(model=MODEL, prompt=long_ids, max_tokens=1, extra_body={"truncate_prompt_tokens": -1})
    assert list(engine.calls[1][0].prompt_tokens) == long_ids[-(MAX_SEQ_LEN - 1):]
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, extra_body={"truncate_prompt_tokens": 3})
    assert len(engine.calls[2][0].prompt_tokens) == 3


def test_bad_words_are_encoded_as_vllm_encodes_them(tok: Tokenizer) -> None:
    def vllm_rule(words):  # vllm/sampling_params.py, SamplingParams.update_from_tokenizer (0.32.0), written out
        out = []
        for word in words:
            for add_prefix_space in (False, True):
                ids = tok.encode((" " if add_prefix_space else "") + word.lstrip(), bos=False, eos=False)
                if not add_prefix_space or (ids and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                    out.append(tuple(ids))
        return tuple(out)

    words = ["hello", " world", "the cat", "naïve", "x"]
    assert bad_words_token_ids(words, tok) == vllm_rule(words)
    assert bad_words_token_ids(["hello", "hello"], tok) == vllm_rule(["hello"])  # repeats once


UNSUPPORTED = sorted(set(CompletionRequest.VLLM_UNSUPPORTED) | set(ChatCompletionRequest.VLLM_UNSUPPORTED))


def _value_other_than(off):
    if isinstance(off, bool):
        return not off
    if isinstance(off, (int, float)):
        return off + 1
    return "something-else" if isinstance(off, str) else {"json": {"type": "object"}}


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_every_vllm_field_not_implemented_is_refused_by_name_and_its_off_value_accepted(
        http: TestClient, engine: FakeEngine, field) -> None:
    for path, base in ROUTES:
        table = (CompletionRequest if "chat" not in path else ChatCompletionRequest).VLLM_UNSUPPORTED
        if field not in table:
            err = error_of(http.post(path, json={"model": MODEL, **base, field: 1}), 400)  # not vLLM's on this route
            assert field in err["message"]
            continue
        off = table[field]
        err = error_of(http.post(path, json={"model": MODEL, **base, field: _value_other_than(off)}), 400)
        assert f"{field} is a vLLM extension this server does not support" in err["message"], err
        assert http.post(path, json={"model": MODEL, **base, field: off}).status_code == 200
    assert all(len(call) == 1 for call in engine.calls)


def test_a_field_vllm_does_not_have_is_still_an_unknown_field(http: TestClient) -> None:
    err = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "repetiton_penalty": 1.1}), 400)
    assert "repetiton_penalty" in err["message"] and "vLLM" not in err["message"]
