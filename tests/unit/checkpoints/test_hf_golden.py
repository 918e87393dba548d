"""Hugging Face-format Llama folders at model-parallel size 1 against transformers on the same
files: sharded safetensors with GQA and Llama 3's tokenizer.json, Llama 3.1 rope scaling with
tied embeddings, and open_llama's layout (a sentencepiece tokenizer.model): the same greedy
tokens, logprobs to 1e-4 in float32; the layout and tokenizer recognised from the files."""
from __future__ import annotations

import pytest

from llama.checkpoints.load import inspect_checkpoint
from tests.hf_reference import CASES, make_hf_checkpoint, transformers_greedy

pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "Hello, world! <|eot_id|> [INST] stays text", "naïve café 😀 日本語"]
MAX_NEW = 10


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_ckpt(request, tmp_path_factory):
    return request.param, make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def test_layout_and_tokenizer_are_recognised_from_the_files(hf_ckpt):
    case, path = hf_ckpt
    info = inspect_checkpoint(path, model_parallel_size=2)
    tok = info.tokenizer()
    assert info.layout == "hf" and info.tied == CASES[case][1].get("tie_word_embeddings", False)
    if CASES[case][0] == "llama3":
        assert (type(tok).__name__, tok.kind, tok.chat_format) == ("HFTokenizer", "bytelevel", "template")
        assert info.tokenizer_path.name == "tokenizer.json" and len(info.shard_paths) > (case == "llama3-sharded-gqa")
    else:
        assert (type(tok).__name__, tok.chat_format, info.tokenizer_path.name) == ("SentencePieceTokenizer", "llama2",
                                                                                   "tokenizer.model")


def test_greedy_tokens_and_logprobs_match_transformers(hf_ckpt, mp1):
    from llama.reference_api import Llama

    case, path = hf_ckpt
    info = inspect_checkpoint(path)
    ours = Llama.build(str(path), str(info.tokenizer_path), max_seq_len=64, max_batch_size=len(PROMPTS))
    prompts = [ours.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = ours.generate(prompts, MAX_NEW, temperature=0, logprobs=True)
    want = transformers_greedy(path, prompts, MAX_NEW)
    assert tokens == [t for t, _ in want]
    for got, (_, ref) in zip(logprobs, want):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
