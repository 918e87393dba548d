"""vLLM's POST /tokenize, POST /detokenize and GET /tokenizer_info (their request and response
shapes, and what they answer), and the chat prompt's tokens that /v1/chat/completions and
/tokenize share.

Clients use them to count a prompt's tokens against max_model_len before sending it, and to
turn token ids back into text; lm-evaluation-harness's remote tokenizer (its local-completions
model) tokenizes through them instead of loading the model's tokenizer itself. The routes
themselves are wired in deploy/api.py.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from deploy.errors import APIError
from deploy.schemas import ChatMessage, StrictRequest
from deploy.tool_schemas import Tool
from deploy.tools import tool_use
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import Dialog, Message, encode_dialog


class TokenizeRequest(StrictRequest):
    model: str | None = None  # optional, as in vLLM; when given, it must be the served model
    prompt: str | None = None  # text: encoded as /v1/completions encodes a string prompt
    messages: list[ChatMessage] | None = None  # a chat: the prompt /v1/chat/completions would run
    tools: list[Tool] | None = None  # with messages: the tools that chat offers (they are in its prompt)
    # Text only. True: the text as /v1/completions encodes a string prompt (BOS, then the text,
    # in which special-token text such as "</s>" stays text). False: as vLLM's /tokenize reads
    # it, no BOS, and special-token text as those tokens; lm-eval's remote tokenizer finds the
    # BOS and EOS ids this way. A chat's prompt has its format's own.
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # prompt and generation together, per sequence (the engine's max_seq_len)
    tokens: list[int]


class TokenizerInfo(BaseModel):
    """vLLM's GET /tokenizer_info fields that clients read (lm-eval's remote tokenizer needs
    eos_token, bos_token and pad_token), plus the ids, which need no second request."""
    tokenizer_class: str
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    pad_token: str | None = None  # the engine pads nothing a client sees
    chat_template: str | None  # the Jinja template the chat route renders, when the model has one
    model_max_length: int  # the engine's max_seq_len


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def chat_prompt(tokenizer: Tokenizer, messages: list[ChatMessage],
                tools: list[dict[str, Any]] | None = None) -> tuple[Dialog, list[int]]:
    """The dialog and its prompt's token ids, with `tools` (OpenAI's shape) where the request
    offers them; a dialog the chat format refuses (roles out of order) is a 400 on `messages`."""
    dialog = [_message(m, i) for i, m in enumerate(messages)]
    try:
        return dialog, encode_dialog(tokenizer, dialog, tools)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None


def _message(m: ChatMessage, i: int) -> Message:
    out: Message = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": _arguments(c.function.arguments, i)}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _arguments(text: str, i: int) -> dict[str, Any]:
    """A call's arguments in the history, as the chat formats write them: a JSON object."""
    try:
        args = json.loads(text)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise APIError(400, f"messages[{i}] has a tool call whose function.arguments is not a JSON object's text "
                            f"({text[:40]!r}); send the arguments as the model gave them, a JSON object.",
                       param="messages")
    return args


def tokenize(body: TokenizeRequest, tokenizer: Tokenizer, max_seq_len: int) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send either prompt (text) or messages (a chat) to tokenize, not both and not neither.",
                       param="prompt")
    if body.messages is not None:
        _, tokens = chat_prompt(tokenizer, body.messages, tool_use(body.tools, None, True, tokenizer).tools)
    elif body.add_special_tokens:
        tokens = tokenizer.encode(body.prompt or "", bos=True, eos=False)
    else:
        tokens = tokenizer.encode_with_special_tokens(body.prompt or "")
    return TokenizeResponse(count=len(tokens), max_model_len=max_seq_len, tokens=tokens)


def tokenizer_info(tokenizer: Tokenizer, max_seq_len: int) -> TokenizerInfo:
    names = {i: text for text, i in tokenizer.special_tokens.items()}
    bos, eos = names.get(tokenizer.bos_id), names.get(tokenizer.eos_id)
    return TokenizerInfo(tokenizer_class=type(tokenizer).__name__,
                         bos_token=bos, bos_token_id=tokenizer.bos_id if bos is not None else None,
                         eos_token=eos, eos_token_id=tokenizer.eos_id if eos is not None else None,
                         chat_template=tokenizer.chat_template, model_max_length=max_seq_len)


def detokenize(body: DetokenizeRequest, tokenizer: Tokenizer) -> DetokenizeResponse:
    check_token_ids(body.tokens, tokenizer, "tokens", param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


def check_token_ids(ids: list[int], tokenizer: Tokenizer, which: str, param: str) -> None:
    """A 400 on `param` naming the first id outside the vocabulary, before any tokenizer or
    engine sees it. `which` names the ids in the message ("prompt 0", "logit_bias")."""
    bad = [t for t in ids if not 0 <= t < tokenizer.n_words]
    if bad:
        raise APIError(400, f"{which} has token id {bad[0]}; this model's ids are 0..{tokenizer.n_words - 1}.",
                       param=param)


MAX_BAD_WORDS = 128  # token sequences after encoding, as vLLM's VLLM_MAX_NUM_BAD_WORDS


def bad_words_token_ids(words: list[str], tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """vLLM's bad_words as token-id sequences, encoded as vLLM encodes them: each word as it is
    (leading spaces stripped), and again after a space when that gives another first token of the
    same length (the word in the middle of text)."""
    out: list[tuple[int, ...]] = []
    for word in dict.fromkeys(words):
        for prefix in ("", " "):
            ids = tuple(tokenizer.encode(prefix + word.lstrip(), bos=False, eos=False))
            if not ids:
                if not prefix:
                    raise APIError(400, f"bad_words entry {word!r} encodes to no tokens; send words with text in "
                                        f"them.", param="bad_words")
                continue
            if not prefix or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    if len(out) > MAX_BAD_WORDS:
        raise APIError(400, f"bad_words encode to {len(out)} token sequences; at most {MAX_BAD_WORDS} are "
                            f"allowed. Send fewer words.", param="bad_words")
    return tuple(out)
