"""load_tokenizer: recognises a tokenizer file by its content and builds the implementation it
needs; read_tokenizer_files: the bytes to carry to machines without the checkpoint.

Three kinds of file exist among Llama checkpoints: sentencepiece's tokenizer.model (Llama 2,
open_llama; llama/tokenizers/sentencepiece.py), tiktoken's tokenizer.model (Llama 3 in Meta's
format; llama/tokenizers/tiktoken.py) and Hugging Face's tokenizer.json
(llama/tokenizers/hf.py). Beside a tokenizer in a Hugging Face folder, tokenizer_config.json
may give a chat template and generation_config.json more ids that end a sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.hf import HFTokenizer
from llama.tokenizers.sentencepiece import SentencePieceTokenizer
from llama.tokenizers.tiktoken import TiktokenTokenizer

# Files read beside the tokenizer (Hugging Face folders); carried with it to machines without them.
# transformers 5 and newer Hub folders keep the chat template in chat_template.jinja.
SIBLINGS = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


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
        tok: Tokenizer = HFTokenizer(path, data, config)
    elif _looks_like_tiktoken(data):
        tok = TiktokenTokenizer(path, data)
    else:
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
