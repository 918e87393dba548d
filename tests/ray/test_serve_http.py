"""HTTP through Ray Serve with the official openai client: a replica owning a gang of two
gloo ranks serves the golden checkpoint; answers match Meta's reference token for token, and
callers' mistakes are OpenAI-shaped 4xx errors that leave every rank running. Each test runs
twice: HTTP straight to the gang's replica (the default app), and through LlamaIngress, whose
handle routes by prefix (`prefix_routing: true`, deploy/ingress.py)."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import engine_idle
from tests.ray.serving import golden_args, serving

MODEL = "llama-golden"


@pytest.fixture(scope="module", params=["direct", "prefix_routing"])
def base_url(ray_local, request):
    with serving({**golden_args(MODEL), "prefix_routing": request.param == "prefix_routing"}) as url:
        # The gang starts in the background: wait for it, so that each test (run alone, too) finds
        # GET /cluster's engine section, as the ones after a completion always did.
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the gang did not start within 120 s"
            time.sleep(0.2)
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_completions_match_the_reference(client, golden):
    c = golden["completions"]
    resp = client.completions.create(model=MODEL, prompt=c["prompts"], max_tokens=c["max_gen_len"], temperature=0,
                                     extra_body={"return_token_ids": True})
    assert [ch.index for ch in resp.choices] == list(range(len(c["prompts"])))
    assert [ch.model_extra["token_ids"] for ch in resp.choices] == c["generated_token_ids"]
    assert [ch.text for ch in resp.choices] == [r["generation"] for r in c["results"]]
    assert resp.usage.prompt_tokens == sum(len(p) for p in c["prompt_token_ids"])
    assert resp.usage.completion_tokens == sum(len(g) for g in c["generated_token_ids"])


def test_token_id_prompt_and_logprobs(client, golden):
    c = golden["completions"]
    resp = client.completions.create(model=MODEL, prompt=c["prompt_token_ids"][1], max_tokens=8, temperature=0, logprobs=1)
    lp = resp.choices[0].logprobs
    want = c["results"][1]["logprobs"][:8]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want)) < 1e-4
    assert resp.choices[0].finish_reason == "length"


def test_chat_matches_the_reference(client, golden):
    ch = golden["chats"]
    for dialog, want in zip(ch["dialogs"], ch["results"]):
        resp = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=ch["max_gen_len"], temperature=0)
        assert resp.choices[0].message.content == want["generation"]["content"]
        assert resp.choices[0].message.role == "assistant"


def test_seeded_n_choices_are_reproducible(client):
    kw = dict(model=MODEL, prompt="hello", max_tokens=6, temperature=1.0, n=3, seed=11)
    a = [ch.text for ch in client.completions.create(**kw).choices]
    b = [ch.text for ch in client.completions.create(**kw).choices]
    assert a == b and len(a) == 3


def test_vllms_sampling_extensions_through_serve_whole_and_streamed(client):
    # What `vllm bench serve` sends (repetition_penalty 1.0, ignore_eos), and a penalty that steers.
    kw = dict(model=MODEL, prompt="hello", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw, extra_body={"return_token_ids": True}).choices[0]
    bench = client.completions.create(**kw, extra_body={"repetition_penalty": 1.0, "ignore_eos": True,
                                                        "return_token_ids": True}).choices[0]
    assert bench.model_extra["token_ids"][:len(plain.model_extra["token_ids"])] == plain.model_extra["token_ids"]
    assert len(bench.model_extra["token_ids"]) == 12 and bench.finish_reason == "length"
    steer = {"repetition_penalty": 1.8, "min_tokens": 10, "bad_words": ["the"], "return_token_ids": True}
    whole = client.completions.create(**kw, extra_body=steer).choices[0]
    streamed = list(client.completions.create(**kw, stream=True, extra_body=steer))
    assert whole.model_extra["token_ids"] != plain.model_extra["token_ids"] and len(whole.model_extra["token_ids"]) >= 10
    assert [t for c in streamed for t in c.choices[0].model_extra["token_ids"]] == whole.model_extra["token_ids"]
    assert "".join(c.choices[0].text for c in streamed) == whole.text


def test_the_official_clients_parse_returns_a_parsed_object_and_streams_the_same_json(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog", "llama"]
        age: int = Field(ge=0, le=30)
        name: str = Field(pattern="^[A-Z][a-z]{1,7}$")

    ask = [{"role": "user", "content": "Describe a pet as JSON."}]
    for seed in (1, 2, 3):
        kw = dict(model=MODEL, messages=ask, max_tokens=60, temperature=1.0, seed=seed)
        parsed = client.chat.completions.parse(response_format=Pet, **kw).choices[0]
        assert isinstance(parsed.message.parsed, Pet) and parsed.finish_reason == "stop"
        with client.chat.completions.stream(response_format=Pet, **kw) as stream:  # the same schema, streamed
            text = "".join(e.delta for e in stream if e.type == "content.delta")
            final = stream.get_final_completion().choices[0]
        assert text == parsed.message.content and final.message.parsed == parsed.message.parsed
    answer = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=10, temperature=1.0, seed=4,
                                       extra_body={"structured_outputs": {"choice": ["left", "right"]}}).choices[0]
    assert answer.text in ("left", "right") and answer.finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"prompt": "a " * 200}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": [[1, 99999]]}, "prompt"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ],
)
def test_bad_requests_are_400(client, kwargs, param):
    kwargs.setdefault("max_tokens", 4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, **kwargs)
    err = e.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert param in (err["param"] or "") or param in err["message"]


def test_unknown_model_and_malformed_json(client, base_url):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    r = httpx.post(base_url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_ranks_survive_mistakes_and_cluster_shows_two(client, base_url, golden):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a " * 500, max_tokens=4)
    info = httpx.get(base_url + "/cluster").json()
    assert info["world_size"] == 2 and len(info["ranks"]) == 2 and info["backend"] == "gloo"
    assert len({r["pid"] for r in info["ranks"]}) == 2
    assert httpx.get(base_url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    c = golden["completions"]
    resp = client.completions.create(model=MODEL, prompt=c["prompts"][0], max_tokens=4, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert resp.choices[0].model_extra["token_ids"] == c["generated_token_ids"][0][:4]


def test_echo_matches_the_reference(client, golden):
    e = golden["completions_echo"]
    resp = client.completions.create(model=MODEL, prompt=e["prompts"], max_tokens=e["max_gen_len"], temperature=0,
                                     echo=True)
    assert [ch.text for ch in resp.choices] == [r["generation"] for r in e["results"]]


def test_streaming_completions_and_chat_match_the_reference(client, golden):
    c = golden["completions"]
    for prompt, want in zip(c["prompts"][:3], c["results"]):
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=c["max_gen_len"], temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert len(chunks) > 2 and chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
        assert "".join(ch.choices[0].text for ch in chunks[:-1]) == want["generation"]
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    ch = golden["chats"]
    stream = client.chat.completions.create(model=MODEL, messages=ch["dialogs"][0], max_tokens=ch["max_gen_len"],
                                            temperature=0, stream=True)
    parts = [k.choices[0].delta.content or "" for k in stream if k.choices]
    assert "".join(parts) == ch["results"][0]["generation"]["content"]


def test_streamed_n_choices_equal_the_non_streamed_ones(client):
    kw = dict(model=MODEL, prompt="hello", max_tokens=8, temperature=1.0, n=3, seed=5)
    whole = [ch.text for ch in client.completions.create(**kw).choices]
    texts = ["", "", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == whole


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, base_url, golden):
    aborted = httpx.get(base_url + "/cluster").json()["engine"]["aborted"]
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(x.startswith("data: {") for x in got)
        engine = httpx.get(base_url + "/cluster").json()["engine"]
        assert engine["running"] == 1  # still decoding when we leave
    for _ in range(200):
        engine = httpx.get(base_url + "/cluster").json()["engine"]
        if engine_idle(engine):
            break
        time.sleep(0.05)
    assert engine_idle(engine)
    assert engine["aborted"] == aborted + 1  # freed because the client left, not because it ran to its end
    c = golden["completions"]
    resp = client.completions.create(model=MODEL, prompt=c["prompts"][0], max_tokens=4, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert resp.choices[0].model_extra["token_ids"] == c["generated_token_ids"][0][:4]


def test_stop_strings_cut_whole_and_streamed_text_alike(client, golden):
    c = golden["completions"]
    full = c["results"][3]["generation"]  # random weights: byte pieces, "ça" repeated, then "çap"
    stop = "çap"
    assert full.find(stop) > full.find("ça") > 0
    kw = dict(model=MODEL, prompt=c["prompts"][3], max_tokens=c["max_gen_len"], temperature=0, stop=[stop])
    whole = client.completions.create(**kw).choices[0]
    assert whole.text == full[: full.find(stop)] and whole.finish_reason == "stop"
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == "stop"
