"""HFTokenizer: a Hugging Face tokenizer.json read with the `tokenizers` library, with bos/eos
named by tokenizer_config.json. Two layouts are known: Llama 3's byte-level BPE and Llama 2's
sentencepiece-style BPE (U+2581 for a space, <0xNN> byte fallbacks)."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any, Literal

import tokenizers

from llama.tokenizers.base import Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece
_SPACE_PIECE = "\u2581"  # sentencepiece's space
# Used where tokenizer_config.json does not name the token at all (a bare tokenizer.json).
_BOS_FALLBACKS = ("<|begin_of_text|>", "<s>")
_EOS_FALLBACKS = ("<|end_of_text|>", "</s>")


class HFTokenizer(Tokenizer):
    def __init__(self, path: str | Path, data: bytes, config: dict[str, Any]):
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_buffer(data)
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({e}).") from None
        self.kind = _kind(self.path, self._tok)
        # A file may ask for truncation or padding; the engine checks lengths itself and never pads.
        self._tok.no_truncation()
        self._tok.no_padding()
        # encode() reads special-token text as plain text; encode_with_special_tokens flips this
        # under the lock, so concurrent callers never see the other setting.
        self._tok.encode_special_tokens = True
        self._lock = threading.Lock()

        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        # Added tokens may reuse model ids (Llama 2's <s>) or follow them (Llama 3's 256)
        self.n_words = max(self._tok.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        bos, self.bos_id = self._config_token(config, "bos_token", _BOS_FALLBACKS)
        eos, self.eos_id = self._config_token(config, "eos_token", _EOS_FALLBACKS)
        # bos/eos are control tokens even where a file forgets to mark them special
        self.special_tokens.update({text: i for text, i in ((bos, self.bos_id), (eos, self.eos_id)) if text})
        self.stop_ids = frozenset({self.eos_id} - {-1})
        self._control_ids = frozenset(self.special_tokens.values())
        # Without a chat_template (load_tokenizer sets "template" when there is one), lay chats
        # out the way the file's model family was trained.
        self.chat_format = "llama3" if "<|start_header_id|>" in self.special_tokens else "llama2"

    def _config_token(self, config: dict[str, Any], key: str, fallbacks: tuple[str, ...]) -> tuple[str | None, int]:
        """The text and id of tokenizer_config.json's `key` (a str, or an AddedToken dict with
        "content"); where the key is missing, the first of `fallbacks` in the vocabulary; (None, -1)
        where the config sets it to null or no fallback is there."""
        if key in config:
            value = config[key]
            text = value.get("content") if isinstance(value, dict) else value
            if text is None:
                return None, -1
            token_id = self._tok.token_to_id(text) if isinstance(text, str) else None
            if token_id is None:
                raise ValueError(f"tokenizer_config.json beside {self.path} gives {key} {value!r}, which is not a "
                                 f"token of {self.path}: use the tokenizer_config.json that came with it.")
            return text, token_id
        for text in fallbacks:
            token_id = self._tok.token_to_id(text)
            if token_id is not None:
                return text, token_id
        return None, -1

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        with self._lock:
            # add_special_tokens=False: no BOS from the file's post-processor; we add our own below
            t = self._tok.encode(s, add_special_tokens=False).ids
        if bos:
            t.insert(0, self._required(self.bos_id, "bos_token", _BOS_FALLBACKS))
        if eos:
            t.append(self._required(self.eos_id, "eos_token", _EOS_FALLBACKS))
        return t

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`text` with each added token's text read as that token (a rendered chat template); no
        BOS or EOS is added beyond those written in `text`."""
        with self._lock:
            self._tok.encode_special_tokens = False
            try:
                return self._tok.encode(text, add_special_tokens=False).ids
            finally:
                self._tok.encode_special_tokens = True

    def _required(self, token_id: int, key: str, fallbacks: tuple[str, ...]) -> int:
        if token_id < 0:
            raise ValueError(f"{self.path} has no {key} (tokenizer_config.json beside it sets none, or without one "
                             f"none of {fallbacks} is in the vocabulary): set {key} in tokenizer_config.json.")
        return token_id

    def decode(self, t: list[int]) -> str:
        return self._tok.decode(t, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._control_ids:
            return b""
        piece = self._piece(token_id)
        if self.kind == "bytelevel":
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:  # an added token's text, kept as is (so does the ByteLevel decoder)
                return piece.encode("utf-8")
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace(_SPACE_PIECE, " ").encode("utf-8")

    def id_to_piece(self, token_id: int) -> str:
        if self.kind != "sentencepiece":
            return super().id_to_piece(token_id)
        return self._piece(token_id)

    def _piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in {self.path} (ids are 0..{self.n_words - 1}).")
        return piece


def _kind(path: Path, tok: tokenizers.Tokenizer) -> Literal["sentencepiece", "bytelevel"]:
    """Byte-level when the decoder or pre-tokenizer is ByteLevel (Llama 3, GPT-2 family);
    sentencepiece-style when they use U+2581 for a space (Llama 2: Metaspace, or a Replace of
    U+2581 with a space, usually beside ByteFallback)."""
    # A component's pickled state is its tokenizer.json entry (cheaper than parsing the whole file).
    spec = [json.loads(part.__getstate__()) for part in (tok.decoder, tok.pre_tokenizer) if part is not None]
    steps = [step for part in spec for step in _steps(part)]
    types = {step.get("type") for step in steps}
    if "ByteLevel" in types:
        return "bytelevel"
    if types & {"Metaspace", "ByteFallback"} or any(
            step.get("type") == "Replace" and step.get("pattern") == {"String": _SPACE_PIECE} for step in steps):
        return "sentencepiece"
    raise ValueError(f"{path} decodes with {sorted(t for t in types if t) or 'nothing'}; expected a ByteLevel "
                     f"decoder (Llama 3) or a sentencepiece-style one (Metaspace, or Replace('\u2581', ' ') with "
                     f"ByteFallback: Llama 2). Use a Llama tokenizer.json, or the checkpoint's tokenizer.model.")


def _steps(node: Any) -> list[dict[str, Any]]:
    """A decoder or pre-tokenizer and, for a Sequence, each step inside it."""
    if not isinstance(node, dict):
        return []
    inner = node.get("decoders") or node.get("pretokenizers") or []
    return [node] + [step for child in inner for step in _steps(child)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: the printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
