"""Tokenizer: Meta's sentencepiece tokenizer.model (bos 1, eos 2, pad -1 in Meta's files)."""
from __future__ import annotations

from pathlib import Path

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path: str | Path, model_proto: bytes | None = None):
        """From the file at model_path, or from its bytes (model_proto) where the file is not
        on this machine; the path then only names it in messages."""
        path = Path(model_path)
        if model_proto is None and not path.is_file():
            raise FileNotFoundError(
                f"tokenizer not found at {path}: pass the sentencepiece tokenizer.model that came "
                f"with the checkpoint (tokenizer_path)."
            )
        try:
            self.sp_model = (SentencePieceProcessor(model_proto=model_proto) if model_proto is not None
                             else SentencePieceProcessor(model_file=str(path)))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse text
            raise ValueError(f"{path} is not a sentencepiece model ({e}).") from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.path = path

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp_model.id_to_piece(token_id)
