"""Meta's checkpoints cut for several ranks, served through Ray Serve with another cut: Llama 3.1
(the embedding cut by its vocabulary, the real tokenizer, scaled rope) and Llama 2 (cut by its
width), each as 4 files at model-parallel size 2 and as 2 files at size 4. Completions give
Meta's reference's greedy tokens and logprobs (to 1e-4; tests/meta_reference.py, computed in
this process before Ray starts); chat's prompt is the reference formatter's (Llama 3) and its
answer the reference's answer; a streamed completion adds up to the whole one."""
from __future__ import annotations

import pytest

from tests.meta_reference import META_DIALOG, META_MAX_GEN, META_PROMPTS
from tests.ray.serving import check_chat, check_completions, served

pytest.importorskip("llama_models")

MODEL = "llama-tiny"
LAYOUTS = [(3, 4, 2), (3, 2, 4), (2, 4, 2), (2, 2, 4)]  # (Llama version, files, model-parallel size)


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"llama{v}-{n}files-mp{m}" for v, n, m in LAYOUTS])
def served_layout(request, meta_files, meta_references, ray_local):
    version, n, mp = request.param
    with served(meta_files[version, n], MODEL, mp) as client:
        yield client, meta_references[version]


def test_completions_give_the_reference_tokens_and_logprobs(served_layout):
    client, (prompts, want) = served_layout
    check_completions(client, MODEL, META_PROMPTS, META_MAX_GEN, want[:len(META_PROMPTS)])


def test_chat_prompt_is_the_reference_formatters_and_the_answer_the_reference_answer(served_layout):
    client, (prompts, want) = served_layout
    check_chat(client, MODEL, META_DIALOG, META_MAX_GEN, prompts[-1], want[-1][0])


def test_a_streamed_completion_adds_up_to_the_whole_one(served_layout):
    client, _ = served_layout
    chunks = client.completions.create(model=MODEL, prompt=META_PROMPTS[2], max_tokens=META_MAX_GEN, temperature=0,
                                       stream=True)
    whole = client.completions.create(model=MODEL, prompt=META_PROMPTS[2], max_tokens=META_MAX_GEN, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
