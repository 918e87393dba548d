"""TiktokenTokenizer: Meta's Llama 3 tokenizer.model (tiktoken's byte-pair ranks) with Llama 3's
split pattern and 256 special tokens, giving the same ids as Meta's reference
(llama_models/llama3/tokenizer.py), long inputs included."""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from llama.tokenizers.base import Tokenizer

# Meta's split pattern: contractions, words, numbers of up to 3 digits, punctuation runs, newlines, spaces.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call waits for its answer)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
NUM_SPECIAL_TOKENS = 256  # the named ones, then <|reserved_special_token_2|> onwards; ids follow the ranks
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # the reference's stop_tokens

# tiktoken panics on inputs over ~400k characters, and is quadratic in a run of more than
# ~25k whitespace or non-whitespace characters (openai/tiktoken#195); Meta cuts the text at
# these lengths before encoding, and the cuts change the ids, so we cut at the same places.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


class TiktokenTokenizer(Tokenizer):
    kind = "bytelevel"
    chat_format = "llama3"

    def __init__(self, path: str | Path, data: bytes):
        self.path = Path(path)
        ranks = parse_ranks(self.path, data)
        names = NAMED_SPECIAL_TOKENS + tuple(
            f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)))
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset(self.special_tokens[name] for name in STOP_TOKENS)
        self._special_ids = frozenset(self.special_tokens.values())

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        t = self._encode(s, allowed_special=set())
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`text` with each special token's text read as that token (a rendered chat template)."""
        return self._encode(text, allowed_special="all")

    def _encode(self, s: str, allowed_special: set[str] | str) -> list[int]:
        t: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=(): special-token text not allowed above is plain text, not an error
                t += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=())
        return t

    def decode(self, t: list[int]) -> str:
        return self.model.decode(t)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_ids:
            return b""
        return self.model.decode_single_token_bytes(token_id)


def parse_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """tiktoken's file format: one "base64-of-the-token's-bytes rank" per line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path} line {n} is {line[:80]!r}; a tiktoken tokenizer.model has one "
                             f"'base64-token rank' pair per line: is the file complete?") from None
    return ranks


def _long_run(max_run: int) -> re.Pattern[str]:
    """A run of more than `max_run` whitespace or non-whitespace characters, matched only from the
    run's start (the lookbehinds), so the search is linear in the text."""
    return re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (max_run + 1, max_run + 1))


_LONG_RUN = _long_run(MAX_NO_WHITESPACES_CHARS)


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """`s` cut so that no piece holds more than `max_run` consecutive whitespace or consecutive
    non-whitespace characters: a longer run is cut every `max_run` characters from its start
    (Meta's _split_whitespaces_or_nonwhitespaces, with a regex finding the runs)."""
    if len(s) <= max_run:  # most prompts
        yield s
        return
    long_run = _LONG_RUN if max_run == MAX_NO_WHITESPACES_CHARS else _long_run(max_run)
    start = 0
    for m in long_run.finditer(s):  # re's \s is str.isspace(), the reference's test
        for cut in range(m.start() + max_run, m.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]
