"""Meta's reference outputs on the golden checkpoint (cut for 2 ranks), reproduced at model
parallel size 1 in a plain process: token ids exactly, logprobs to 1e-4."""
from __future__ import annotations

import pytest

from tests.conftest import GOLDEN_CKPT


@pytest.fixture(scope="module")
def generator(mp1, golden):
    from llama import Llama

    return Llama.build(str(GOLDEN_CKPT), str(GOLDEN_CKPT / "tokenizer.model"), golden["max_seq_len"], golden["max_batch_size"])


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_prompt_encoding(generator, golden):
    c = golden["completions"]
    assert [generator.tokenizer.encode(p, bos=True, eos=False) for p in c["prompts"]] == c["prompt_token_ids"]


def test_generate_token_ids(generator, golden):
    c = golden["completions"]
    tokens, lps = generator.generate(c["prompt_token_ids"], c["max_gen_len"], temperature=0)
    assert tokens == c["generated_token_ids"]
    assert lps is None


def test_text_completion_with_logprobs(generator, golden):
    c = golden["completions"]
    got = generator.text_completion(c["prompts"], temperature=0, max_gen_len=c["max_gen_len"], logprobs=True)
    for g, want in zip(got, c["results"]):
        assert g["generation"] == want["generation"]
        assert g["tokens"] == want["tokens"]
        assert _close(g["logprobs"], want["logprobs"])


def test_echo(generator, golden):
    e = golden["completions_echo"]
    got = generator.text_completion(e["prompts"], temperature=0, max_gen_len=e["max_gen_len"], logprobs=True, echo=True)
    for g, want in zip(got, e["results"]):
        assert g["generation"] == want["generation"]
        assert g["tokens"] == want["tokens"]
        assert _close(g["logprobs"], want["logprobs"])
        assert g["logprobs"][0] == 0.0  # nothing predicts the first token
    tokens, _ = generator.generate(
        [generator.tokenizer.encode(p, bos=True, eos=False) for p in e["prompts"]], e["max_gen_len"], temperature=0, echo=True
    )
    assert tokens == e["token_ids"]


def test_chat(generator, golden):
    ch = golden["chats"]
    got = generator.chat_completion(ch["dialogs"], temperature=0, max_gen_len=ch["max_gen_len"], logprobs=True)
    for g, want in zip(got, ch["results"]):
        assert g["generation"] == want["generation"]
        assert g["tokens"] == want["tokens"]
        assert _close(g["logprobs"], want["logprobs"])


def test_batch_composition_does_not_change_greedy_tokens(generator, golden):
    c = golden["completions"]
    together, _ = generator.generate(c["prompt_token_ids"], c["max_gen_len"], temperature=0)
    alone = [generator.generate([p], c["max_gen_len"], temperature=0)[0][0] for p in c["prompt_token_ids"]]
    assert alone == together


def test_inputs_given_as_tensors_are_moved_to_the_model(generator, golden):
    import torch

    c = golden["completions"]
    as_tensors = [torch.tensor(p, dtype=torch.int32) for p in c["prompt_token_ids"][:2]]
    tokens, _ = generator.generate(as_tensors, c["max_gen_len"], temperature=0)
    assert tokens == c["generated_token_ids"][:2]


def test_seeded_sampling_is_reproducible(generator, golden):
    import torch

    c = golden["completions"]
    torch.manual_seed(7)
    a, _ = generator.generate(c["prompt_token_ids"], 8, temperature=0.8, top_p=0.9)
    torch.manual_seed(7)
    b, _ = generator.generate(c["prompt_token_ids"], 8, temperature=0.8, top_p=0.9)
    assert a == b
    assert a != c["generated_token_ids"]  # it did sample


def test_caller_mistakes_are_value_errors(generator, golden):
    with pytest.raises(ValueError, match="max_batch_size"):
        generator.generate([[1, 2]] * (golden["max_batch_size"] + 1), 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generator.generate([[1] * golden["max_seq_len"]], 4)
    with pytest.raises(ValueError, match="vocabulary"):
        generator.generate([[1, 99999]], 4)
    with pytest.raises(ValueError, match="temperature"):
        generator.generate([[1, 2]], 4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generator.generate([[1, 2]], 4, top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        generator.generate([[1, 2]], 0)


def test_max_gen_len_defaults_to_what_fits(generator, golden):
    # The reference's default: max_seq_len - 1 new tokens, cut by max_seq_len in all.
    (out,) = generator.text_completion([golden["completions"]["prompts"][0]], temperature=0)
    (want,) = generator.text_completion([golden["completions"]["prompts"][0]], temperature=0,
                                        max_gen_len=golden["max_seq_len"] - 1)
    assert out == want and out["generation"]
