"""Hugging Face-format Llama folders at model-parallel size 2, against transformers run in this
process on the same files. Every test case (sharded safetensors with Llama 3's tokenizer.json;
Llama 3.1 rope scaling with tied embeddings; open_llama's sentencepiece layout) through a gang:
transformers' greedy tokens and logprobs (to 1e-4). The first through Ray Serve as well:
completions the same, and chat's prompt apply_chat_template's, so its answer is transformers'."""
from __future__ import annotations

import pytest

from llama.engine.request import GenerationRequest, SamplingParams
from tests.conftest import gang_config
from tests.hf_reference import CASES, make_hf_checkpoint, transformers_chat_ids, transformers_greedy
from tests.ray.serving import check_chat, check_completions, served

pytest.importorskip("transformers")

MODEL = "hf-tiny"
PROMPTS = ["The capital of France is", "Hello, world! <|eot_id|> stays text", "naïve café 😀"]
DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a llama."},
          {"role": "assistant", "content": "Lola."}, {"role": "user", "content": "And another?"}]
MAX_NEW = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf"), "llama3-sharded-gqa")


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
    with served(ckpt, MODEL) as c:
        yield c


def test_completions_give_transformers_tokens_and_logprobs_at_mp2(client, reference):
    check_completions(client, MODEL, PROMPTS, MAX_NEW, reference["completions"])


def test_chat_prompt_is_the_templates_and_the_answer_transformers_answer(client, reference):
    check_chat(client, MODEL, DIALOG, MAX_NEW, reference["chat_ids"], reference["chat"][0])


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
