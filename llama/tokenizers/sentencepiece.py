"""SentencePieceTokenizer: sentencepiece's tokenizer.model (Llama 2 and open_llama; Meta's files
have bos 1, eos 2, pad -1)."""
from __future__ import annotations

import re
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from llama.tokenizers.base import Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _special_split(special_tokens: dict[str, int]) -> re.Pattern[str]:
    """Splits text around each special token's text, keeping it (longest first)."""
    names = sorted(special_tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    chat_format = "llama2"

    def __init__(self, path: str | Path, model_proto: bytes):
        self.path = Path(path)
        try:
            self.sp_model = SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse text
            raise ValueError(f"{self.path} is not a sentencepiece model ({e}).") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.stop_ids = frozenset({self.eos_id})
        self.special_tokens = {self.sp_model.id_to_piece(i): i for i in (self.bos_id, self.eos_id) if i >= 0}

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`text` with `<s>` and `</s>` read as BOS and EOS, and each run of text between them
        encoded alone (as transformers' legacy LlamaTokenizer does); no BOS or EOS besides."""
        if not self.special_tokens:
            return self.encode(text, bos=False, eos=False)
        t: list[int] = []
        for part in _special_split(self.special_tokens).split(text):
            if part in self.special_tokens:
                t.append(self.special_tokens[part])
            elif part:
                t += self.sp_model.encode(part)
        return t

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp_model.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        if self.sp_model.is_control(token_id):
            return b""
        piece = self.sp_model.id_to_piece(token_id)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # U+2581 is sentencepiece's space
