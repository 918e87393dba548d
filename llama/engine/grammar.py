"""Structured outputs: a grammar that a sequence's generated tokens must follow, enforced while
sampling as a token mask on the driver (so followers never see it, and seeded draws stay the
same at any model-parallel size and batch).

The grammar library is llguidance (a Rust core with no Python dependencies): it computes the
mask from the tokens' own bytes, so one adapter serves every tokenizer this project reads
(sentencepiece, tiktoken, tokenizer.json); it reads JSON schemas, regular expressions, choices
and grammars (Lark, or llama.cpp's GBNF); and it is one of vLLM's and SGLang's grammar backends. xgrammar, the other
common one, needs transformers (serving must not). Each grammar is compiled once per tokenizer,
when its first request is submitted (on the caller's thread, not the engine's step), and cached.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llama.tokenizers.base import Tokenizer

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]
# JSON as json.dumps writes it: ", " between items, ": " after keys, no other whitespace. A weak
# model is not free to spend its tokens on whitespace, and a strong one writes JSON this way.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class Grammar:
    """What a request's output must match. `text`: the JSON schema (as JSON text), the regular
    expression, the choices (a JSON list of strings) or the grammar (Lark, or llama.cpp's GBNF)."""

    kind: GrammarKind
    text: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> "Grammar":
        return cls("json_schema", json.dumps(schema))  # key order kept: the properties come out in the schema's order

    @classmethod
    def choice(cls, choices: list[str]) -> "Grammar":
        return cls("choice", json.dumps(list(choices)))


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency of the project: only a broken install lacks it
        raise RuntimeError("structured outputs need the llguidance package (a dependency of this project): "
                           "pip install llguidance") from e
    return llguidance


def _source(g: Grammar) -> str:
    """The grammar in llguidance's terms; ValueError naming what is wrong with it."""
    llg = _llguidance()
    if g.kind == "json_schema":
        return llg.LLMatcher.grammar_from_json_schema(g.text, defaults=JSON_OPTIONS)
    if g.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(g.text)
    if g.kind == "grammar":
        return llg.grammar_from("grammar", g.text)
    if g.kind == "choice":
        choices = json.loads(g.text)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("the choices must be a non-empty list of strings")
        return llg.grammar_from("choice", g.text)
    raise ValueError(f"unknown grammar kind {g.kind!r}; use one of json_schema, regex, choice, grammar")


def check_grammar(g: Grammar) -> None:
    """Raise ValueError saying what the library refuses in this grammar (which part, where)."""
    what = {"json_schema": "the JSON schema", "regex": "the regular expression", "choice": "the choices",
            "grammar": "the grammar"}.get(g.kind, "the grammar")
    try:
        source = _source(g)
    except ValueError as e:
        raise ValueError(f"{what} cannot be used: {e}") from None
    error = _llguidance().LLMatcher.validate_grammar(source)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"{what} cannot be used: {error.strip()}")


class _Vocabulary:
    """What llguidance asks of a tokenizer (llguidance.TokenizerWrapper's fields): every token's
    bytes, special tokens as 0xFF + their name, the end token, and an encoder. The encoder is a
    longest match over the tokens' bytes rather than the tokenizer's own (sentencepiece would put
    its dummy-prefix space before any text): llguidance only encodes the bytes a grammar forces,
    and any tokens that spell them are right."""

    def __init__(self, tok: Tokenizer) -> None:
        names = {i: text for text, i in tok.special_tokens.items()}
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id if tok.bos_id >= 0 else None
        self.special_token_ids = sorted(names)
        self.tokens = [b"\xff" + names[i].encode() if i in names else tok.token_bytes(i) for i in range(tok.n_words)]
        self._ids: dict[bytes, int] = {}
        for i, b in enumerate(self.tokens):
            if b and i not in names:
                self._ids.setdefault(b, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        out, k = [], 0
        while k < len(data):
            for n in range(min(self._longest, len(data) - k), 0, -1):
                token = self._ids.get(data[k : k + n])
                if token is not None:
                    out.append(token)
                    k += n
                    break
            else:  # no token holds this byte (no byte fallback): llguidance then cannot force it
                k += 1
        return out


class GrammarCompiler:
    """Compiles grammars for one tokenizer, once each (an LRU cache), and makes each sequence's
    matcher. Thread-safe: requests are submitted from the caller's threads."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._lltok = None
        self._cache: OrderedDict[Grammar, str] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        if self._lltok is None:
            llg = _llguidance()
            end = sorted(self._tokenizer.stop_ids or {self._tokenizer.eos_id})
            self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(self._tokenizer)), eos_token=end)
        return self._lltok

    def compile(self, g: Grammar) -> str:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            check_grammar(g)
            source = _source(g)
            self._cache[g] = source
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return source

    def matcher(self, g: Grammar) -> "GrammarMatcher":
        source = self.compile(g)
        with self._lock:
            lltok = self._llg_tokenizer()
        return GrammarMatcher(_llguidance().LLMatcher(lltok, source, log_level=0), self._tokenizer.n_words)


class GrammarMatcher:
    """One sequence's place in its grammar: the tokens allowed next, and each token taken."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._m = matcher
        self._vocab = vocab_size
        self._bits = torch.arange(8, dtype=torch.uint8)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool, on the host: the tokens the grammar allows next (the end tokens once it
        is complete)."""
        packed = torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.uint8)
        return ((packed.unsqueeze(1) >> self._bits) & 1).flatten()[: self._vocab].bool()

    def take(self, token: int) -> None:
        """The sampled token (one allowed() allowed). A token it refuses (only a caller can
        bring one, by biasing an end token it cannot yet take) puts it in its error state,
        which allows nothing: the engine then ends the sequence."""
        self._m.consume_token(token)

    @property
    def failed(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None
