"""Tokenizer: Meta's ids (bos 1, eos 2, pad -1), encode/decode, and a clear error for a missing file."""
from __future__ import annotations

import pytest

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.load import load_tokenizer
from tests.conftest import GOLDEN_CKPT


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(GOLDEN_CKPT / "tokenizer.model")


def test_meta_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 400)
    assert tok.encode("hello", bos=True, eos=False) == [1, 285]
    assert tok.encode("hello", bos=True, eos=True) == [1, 285, 2]
    assert tok.decode([285]) == "hello"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "tokenizer.model")
