"""Llama 3.1 in Meta's format served through Ray Serve at model-parallel size 2 (the one-shard
checkpoint resharded), against Meta's reference (`llama-models`) run in this process on the same
files: completions give the reference's greedy tokens and logprobs (to 1e-4); chat's prompt is
the reference chat formatter's, so its answer is the reference's answer to that prompt."""
from __future__ import annotations

import pytest

from tests.meta_reference import make_tiny_llama3, reference_chat_ids, reference_greedy
from tests.ray.serving import check_chat, check_completions, served

pytest.importorskip("llama_models")

MODEL = "llama-3-tiny"
PROMPTS = ["The capital of France is", "Hello, world! <|eot_id|> stays text here", "日本語のテキスト 🦙"]
DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a llama."},
          {"role": "assistant", "content": "Lola."}, {"role": "user", "content": " And another? "}]
MAX_GEN = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_llama3(tmp_path_factory.mktemp("llama3"), shards=1)


@pytest.fixture(scope="module")
def reference(ckpt):
    """What Meta's code answers, computed before Ray starts (a one-process group, as the unit tier)."""
    import torch.distributed as dist

    from llama.distributed import init_model_parallel, init_single_process_group
    from llama.tokenizer import load_tokenizer

    if not dist.is_initialized():
        init_single_process_group("gloo")
    init_model_parallel(1)
    tok = load_tokenizer(ckpt / "tokenizer.model")
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    chat = reference_chat_ids(ckpt / "tokenizer.model", DIALOG)
    return {"completions": reference_greedy(ckpt, prompts, MAX_GEN), "chat_ids": chat,
            "chat": reference_greedy(ckpt, [chat], MAX_GEN)[0]}


@pytest.fixture(scope="module")
def client(reference, ckpt, ray_local):
    with served(ckpt, MODEL) as c:
        yield c


def test_completions_give_the_reference_tokens_and_logprobs_at_mp2(client, reference):
    check_completions(client, MODEL, PROMPTS, MAX_GEN, reference["completions"])


def test_chat_prompt_is_the_reference_formatters_and_the_answer_the_reference_answer(client, reference):
    check_chat(client, MODEL, DIALOG, MAX_GEN, reference["chat_ids"], reference["chat"][0])


def test_a_streamed_completion_adds_up_to_the_whole_one(client, reference):
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_GEN, temperature=0, stream=True)
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_GEN, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
