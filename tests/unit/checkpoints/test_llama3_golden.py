"""Llama 3.1 in Meta's format at model-parallel size 1 against Meta's own reference
(`llama-models`) on the same tiny checkpoint (random weights, the real Llama 3 tokenizer,
scaled rope): the same greedy tokens, logprobs to 1e-4; the checkpoint's version recognised
from its files; every stop token the model declares ends a sequence."""
from __future__ import annotations

import pytest

from llama.checkpoints.load import inspect_checkpoint
from tests.meta_reference import make_tiny_llama3, reference_greedy

pytest.importorskip("llama_models")

PROMPTS = ["The capital of France is", "Hello, world! <|eot_id|> stays text here", "日本語のテキスト 🦙",
           "Llamas live in the Andes and eat grass. " * 8]
MAX_GEN = 12
MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory):
    return make_tiny_llama3(tmp_path_factory.mktemp("llama3"), shards=1)


def test_the_checkpoint_is_recognised_as_llama3_from_its_files(llama3_ckpt):
    info = inspect_checkpoint(llama3_ckpt)
    tok = info.tokenizer()
    assert (info.args.vocab_size, info.args.rope_theta, info.args.use_scaled_rope) == (128256, 500000.0, True)
    assert (type(tok).__name__, tok.kind, tok.chat_format, tok.n_words) == ("TiktokenTokenizer", "bytelevel", "llama3", 128256)
    assert tok.stop_ids == {tok.special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}


def test_greedy_tokens_and_logprobs_match_meta_reference(llama3_ckpt, mp1):
    from llama.reference_api import Llama

    ours = Llama.build(str(llama3_ckpt), str(llama3_ckpt / "tokenizer.model"), max_seq_len=MAX_SEQ_LEN,
                       max_batch_size=len(PROMPTS))
    prompts = [ours.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = ours.generate(prompts, MAX_GEN, temperature=0, logprobs=True)
    want = reference_greedy(llama3_ckpt, prompts, MAX_GEN, MAX_SEQ_LEN)
    assert tokens == [t for t, _ in want]
    for got, (_, ref) in zip(logprobs, want):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
