"""Tokenizer: what the engine, the detokenizer and the HTTP layer ask of any tokenizer, and
load_tokenizer, which recognises a tokenizer file by its content.

Three kinds of file exist among Llama checkpoints: sentencepiece's tokenizer.model (Llama 2,
open_llama; llama/sentencepiece_tokenizer.py), tiktoken's tokenizer.model (Llama 3 in Meta's
format; llama/tiktoken_tokenizer.py) and Hugging Face's tokenizer.json
(llama/hf_tokenizer.py). Beside a tokenizer in a Hugging Face folder, tokenizer_config.json
may give a chat template and generation_config.json more ids that end a sequence.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

# Files read beside the tokenizer (Hugging Face folders); carried with it to machines without them.
# transformers 5 and newer Hub folders keep the chat template in chat_template.jinja.
SIBLINGS = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


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


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """The tokenizer file's bytes under its own name, and each of SIBLINGS beside it that exists."""
    path = Path(path)
    files = {path.name: path.read_bytes()}
    for name in SIBLINGS:
        if (path.parent / name).is_file():
            files[name] = (path.parent / name).read_bytes()
    return files


def load_tokenizer(path: str | Path, files: dict[str, bytes] | None = None) -> Tokenizer:
    """The tokenizer at `path` (tokenizer.model of either kind, or tokenizer.json), from `files`
    (read_tokenizer_files' result) where given: on a machine without the checkpoint, `path` only
    names it. Raises ValueError naming the file and what it expected."""
    path = Path(path)
    if files is None:
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer not found at {path}: pass the tokenizer.model or tokenizer.json that came with the "
                f"checkpoint (tokenizer_path).")
        files = read_tokenizer_files(path)
    data = files[path.name]
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    if path.suffix == ".json":
        from llama.hf_tokenizer import HFTokenizer

        tok: Tokenizer = HFTokenizer(path, data, config)
    elif _looks_like_tiktoken(data):
        from llama.tiktoken_tokenizer import TiktokenTokenizer

        tok = TiktokenTokenizer(path, data)
    else:
        from llama.sentencepiece_tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(path, data)
    template = _chat_template(config, files)
    if template is not None:
        tok.chat_template, tok.chat_format = template, "template"
    if "generation_config.json" in files:
        eos = json.loads(files["generation_config.json"]).get("eos_token_id")
        more = [eos] if isinstance(eos, int) else list(eos or [])
        tok.stop_ids = frozenset(tok.stop_ids | {i for i in more if isinstance(i, int)})
    return tok


def _chat_template(config: dict, files: dict[str, bytes]) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a
    string, or a list of named templates of which "default" is the chat one)."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _looks_like_tiktoken(data: bytes) -> bool:
    """tiktoken's format is text, one 'base64-token rank' per line; sentencepiece's is protobuf."""
    first = data.split(b"\n", 1)[0]
    parts = first.split(b" ")
    return len(parts) == 2 and parts[1].isdigit() and all(c in _B64 for c in parts[0])


_B64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
