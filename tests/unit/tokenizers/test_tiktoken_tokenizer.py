"""TiktokenTokenizer against Meta's Llama 3 tokenizer (llama_models) on its real tokenizer.model:
the same ids, text and control ids, token bytes that join to the text, and Meta's cuts of long
inputs (checked against Meta's own splitter on random text)."""
from __future__ import annotations

import random

import pytest

from llama.tokenizers.load import load_tokenizer
from llama.tokenizers.sentencepiece import SentencePieceTokenizer
from llama.tokenizers.tiktoken import PAT_STR, TiktokenTokenizer, split_long_runs
from tests.conftest import GOLDEN_CKPT
from tests.tokenizer_files import llama3_tokenizer_model

_rng = random.Random(0)
TEXTS = [
    "",
    "hello world",
    "Hello, World! It's 2024; we'll see.",
    "héllo café naïve Ångström",
    "日本語のテキストと中文文本",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "digits 1234567890 3.14159 -42",
    "tabs\tand\nnewlines\r\n\n  and   runs      of spaces",
    " " * 300 + "x" + "\n" * 50,
    "plain text <|eot_id|> and <|begin_of_text|> and <|start_header_id|>user<|end_header_id|>",
    "<|reserved_special_token_5|><|eom_id|>",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "a" * 30_000,  # one run past MAX_NO_WHITESPACES_CHARS, cut at 25000
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(60_000)) + " end",
    " " * 26_000 + "tail",  # a long whitespace run
    "word " * 80_001,  # past TIKTOKEN_MAX_ENCODE_CHARS: chunks of 400000 characters
]
TEXT_IDS = [f"{i}:{t[:12]!r}" for i, t in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_model())


@pytest.fixture(scope="module")
def tok() -> TiktokenTokenizer:
    tok = load_tokenizer(llama3_tokenizer_model())
    assert isinstance(tok, TiktokenTokenizer)
    return tok


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_encode_matches_meta(tok, meta, text):
    assert tok.encode(text, bos=False, eos=False) == meta.encode(text, bos=False, eos=False)
    assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)


@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_decode_and_token_bytes(tok, meta, text):
    ids = meta.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == meta.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_decode_of_control_and_partial_tokens(tok, meta):
    ids = meta.encode("🙂 ok", bos=True, eos=True)
    assert tok.decode(ids) == meta.decode(ids) == "<|begin_of_text|>🙂 ok<|end_of_text|>"
    assert tok.decode(ids[1:2]) == meta.decode(ids[1:2])  # half of the emoji's bytes: U+FFFD
    assert (tok.token_bytes(tok.bos_id), tok.token_bytes(tok.special_tokens["<|eot_id|>"])) == (b"", b"")


def test_special_tokens_and_control_ids(tok, meta):
    assert tok.special_tokens == meta.special_tokens
    assert PAT_STR == meta.pat_str
    assert len(tok.special_tokens) == 256
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (128256, 128000, 128001, -1)
    assert tok.stop_ids == set(meta.stop_tokens) == {128001, 128008, 128009}
    assert (tok.kind, tok.chat_format) == ("bytelevel", "llama3")


def test_encode_with_special_tokens_reads_them(tok, meta):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = tok.encode_with_special_tokens(text)
    assert ids == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert ids[0] == 128006 and ids[-1] == 128009


@pytest.mark.parametrize("seed", range(20))
def test_long_run_cuts_match_meta(meta, seed):
    """Meta's splitter with a small limit, on random text of short and long runs: same pieces."""
    rng = random.Random(seed)
    text = "".join(rng.choice(["a", "b", " ", "\n", "\u3000", "é"]) * rng.choice([1, 2, 7, 15]) for _ in range(60))
    assert list(split_long_runs(text, 5)) == list(meta._split_whitespaces_or_nonwhitespaces(text, 5))


def test_load_tokenizer_tells_the_formats_apart():
    assert isinstance(load_tokenizer(llama3_tokenizer_model()), TiktokenTokenizer)
    assert isinstance(load_tokenizer(GOLDEN_CKPT / "tokenizer.model"), SentencePieceTokenizer)


def test_damaged_file_is_a_clear_error(tmp_path):
    data = llama3_tokenizer_model().read_bytes()[:5000] + b"\nnot-base64!! 7\n"
    with pytest.raises(ValueError, match=r"line \d+ is .*'base64-token rank'"):
        TiktokenTokenizer(tmp_path / "tokenizer.model", data)
