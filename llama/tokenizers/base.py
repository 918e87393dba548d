"""Tokenizer: what the engine, the detokenizer and the HTTP layer ask of any tokenizer. Its
implementations (llama/tokenizers/sentencepiece.py, tiktoken.py, hf.py) import it; which one a
file needs is chosen apart, in llama/tokenizers/load.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal


class Tokenizer(ABC):
    path: Path  # names the file in messages
    n_words: int  # ids are 0..n_words-1, special tokens included
    bos_id: int
    eos_id: int  # what encode(eos=True) appends
    pad_id: int = -1
    # Every id that ends a sequence (not returned to the caller): eos_id and the model's other
    # end tokens (Llama 3's <|eot_id|> and <|eom_id|>, generation_config.json's eos_token_id).
    stop_ids: frozenset[int] = frozenset()
    # "sentencepiece": pieces with U+2581 for a space and <0xNN> byte fallbacks; decode drops the
    # text's first space. "bytelevel": each token is a run of raw bytes; decode joins them.
    kind: Literal["sentencepiece", "bytelevel"] = "sentencepiece"
    # How a chat is laid out: Meta's Llama 2 [INST] format, Meta's Llama 3 header format, or
    # the Jinja chat_template from tokenizer_config.json.
    chat_format: Literal["llama2", "llama3", "template"] = "llama2"
    chat_template: str | None = None
    special_tokens: dict[str, int] = {}  # text -> id of control tokens (bos/eos, headers ...)

    @abstractmethod
    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """`s` as plain text (a special token's text in it is text, never that token)."""

    @abstractmethod
    def decode(self, t: list[int]) -> str: ...

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes as they appear in the text: a sentencepiece word piece with its
        space, a byte fallback as that byte, a byte-level token's raw bytes; b"" for a control
        token."""

    def id_to_piece(self, token_id: int) -> str:
        """The token's piece, as sentencepiece names it (kind "sentencepiece" only)."""
        raise NotImplementedError(f"{type(self).__name__} has no sentencepiece pieces")

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`text` with special-token text in it as those tokens (a rendered chat template)."""
        raise ValueError(f"{self.path}: this tokenizer cannot read special-token text, so a chat template cannot be "
                         f"used with it; remove chat_template from tokenizer_config.json to use the Llama 2 chat "
                         f"format.")
