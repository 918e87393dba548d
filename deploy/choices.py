"""One choice of a response, shaped from its engine deltas: its text (with the echoed prompt),
tool calls, logprobs, token ids and finish reason, and the tokens it counts towards usage.

ChoiceShaper is the one place that does it, for whole responses (deploy/api.py: all of a
choice's deltas joined, shaped once) and for streams (deploy/sse.py: each delta, one chunk).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from deploy.logprobs import chat_logprobs, completion_logprobs, joined, prompt_logprobs
from deploy.responses import ChatLogprobs, CompletionLogprobs, FinishReason, Usage
from deploy.tool_calls import ToolCallParser
from deploy.tool_schemas import FunctionCallDelta, ToolCallDelta
from llama.engine.request import StreamDelta, TopLogprobs, join
from llama.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class ChoiceSpec:
    """What the request asked each of its choices to carry."""

    chat: bool  # chat's logprobs (ChatLogprobs), not the completions endpoint's (CompletionLogprobs)
    logprobs: bool  # completions: logprobs=N; chat: logprobs=true
    return_token_ids: bool


@dataclass(frozen=True)
class Echo:
    """A completion choice's prompt, which echo=true puts before its text."""

    tokens: list[int]  # as sent to the engine (with BOS, for a string prompt)
    text: str  # the prompt string as sent, or the token ids decoded


@dataclass(frozen=True)
class Piece:
    """What a choice says for one delta (a stream chunk) or for all of them (a whole response)."""

    text: str
    logprobs: CompletionLogprobs | ChatLogprobs | None  # None unless asked for
    token_ids: list[int] | None  # None unless return_token_ids
    finish_reason: FinishReason | None  # on the choice's last piece only
    # Something besides the finish reason for a chunk to carry: text, the echo, or tokens whose
    # logprobs or ids were asked for. A stream sends no chunk without it (the engine holds text
    # back that could start a stop string, so a delta may bring tokens and no text).
    has_content: bool
    tool_calls: list[ToolCallDelta] = field(default_factory=list)  # calls completed in this piece


class ChoiceShaper:
    """One choice's deltas, fed in order, as the pieces of its response."""

    def __init__(self, tokenizer: Tokenizer, spec: ChoiceSpec, echo: Echo | None = None, prompt: int = 0,
                 tool_calls: ToolCallParser | None = None) -> None:
        assert echo is None or not spec.chat, "chat completions have no echo"
        self._tok = tokenizer
        self._spec = spec
        self._echo = echo
        self._tool_calls = tool_calls  # reads the text for calls (a chat request with tools), or None
        self._first = True  # no piece made yet: the next one carries the echo
        # text_offset of the choice's next token. With echo the generation starts at the prompt
        # text's length, since the pieces of a string prompt need not add up to the string.
        self._offset = len(echo.text) if echo is not None else 0
        self._space: bool | None = None  # see _echo_text; None until the first generated token
        self.completion_tokens = 0  # generated so far, for usage
        self.prompt = prompt  # which of the request's prompts this choice continues
        self.cached_tokens: int | None = None  # of its prompt, found in the prefix cache (its first delta says)

    def whole(self, deltas: list[StreamDelta]) -> Piece:
        """The whole choice as one piece, from all its deltas."""
        assert self._first, "a whole choice is shaped from its first delta on"
        return self._shape(join(deltas), whole=True)

    def piece(self, delta: StreamDelta) -> Piece:
        """A stream's next delta as its chunk's piece."""
        return self._shape(delta, whole=False)

    def _shape(self, d: StreamDelta, whole: bool) -> Piece:
        assert d.finish_reason not in ("timeout", "abort"), "ChoiceStreams raises for an unfinished choice"
        first, self._first = self._first, False
        self.completion_tokens += len(d.token_ids)
        if d.cached_tokens is not None:
            self.cached_tokens = d.cached_tokens
        logprobs: CompletionLogprobs | ChatLogprobs | None = None
        if self._spec.logprobs:
            assert d.logprobs is not None, "the engine sent no logprobs"
            # An end token that finished the choice is listed last, as vLLM lists it, though it is
            # neither in the text nor in token_ids nor counted in usage.
            ids, lps, tops = d.token_ids, d.logprobs, d.top_logprobs
            if d.end_token is not None and d.end_token.logprob is not None:
                ids, lps = ids + [d.end_token.token_id], lps + [d.end_token.logprob]
                tops = (tops or []) + [d.end_token.top_logprobs or []]
            if self._spec.chat:
                logprobs = ChatLogprobs(content=chat_logprobs(self._tok, ids, lps, tops))
            else:
                logprobs = self._completion_logprobs(d, ids, lps, tops, first)
        text = d.text if self._echo is None else self._echo_text(self._echo, d, first, whole)
        calls: list[ToolCallDelta] = []
        finish_reason = d.finish_reason
        if self._tool_calls is not None:
            text, calls = self._read_calls(text, d.finish_reason is not None)
            if finish_reason == "stop" and self._tool_calls.calls:
                finish_reason = "tool_calls"
        asked_for_tokens = self._spec.logprobs or self._spec.return_token_ids
        return Piece(
            text=text,
            logprobs=logprobs,
            token_ids=d.token_ids if self._spec.return_token_ids else None,
            finish_reason=finish_reason,
            has_content=bool(text) or (first and self._echo is not None) or (bool(d.token_ids) and asked_for_tokens),
            tool_calls=calls,
        )

    def _read_calls(self, text: str, last: bool) -> tuple[str, list[ToolCallDelta]]:
        """The piece's text split into content and the calls it completes (all that is held
        back, on the choice's last piece)."""
        assert self._tool_calls is not None
        first_index = self._tool_calls.calls
        parsed = self._tool_calls.feed(text)
        if last:
            rest = self._tool_calls.finish()
            parsed.content += rest.content
            parsed.calls += rest.calls
        return parsed.content, [
            ToolCallDelta(index=first_index + k, id=f"call_{uuid.uuid4().hex[:24]}",
                          function=FunctionCallDelta(name=c.name, arguments=c.arguments))
            for k, c in enumerate(parsed.calls)]

    def _completion_logprobs(self, d: StreamDelta, token_ids: list[int], logprobs: list[float],
                             top: list[TopLogprobs] | None, first: bool) -> CompletionLogprobs:
        out = completion_logprobs(self._tok, token_ids, logprobs, top, self._offset)
        self._offset += sum(len(t) for t in out.tokens)
        if first and self._echo is not None:
            assert d.prompt_logprobs is not None, "the engine sent no prompt logprobs for echo"
            out = joined(prompt_logprobs(self._tok, self._echo.tokens, d.prompt_logprobs, d.prompt_top_logprobs), out)
        return out

    def _echo_text(self, echo: Echo, d: StreamDelta, first: bool, whole: bool) -> str:
        """Decoding the generation alone drops the space sentencepiece puts before its first word
        (not so byte-level tokenizers, whose decode keeps every byte).
        A whole choice decodes prompt and generation together, as Meta's reference's echo does
        (tests/ray/test_serve_http.py checks it against the reference's outputs); a stream cannot,
        since it sends the prompt before the generation exists, so it puts that space back itself,
        which gives the same text except in edge cases (a stop string cut the text, a string
        prompt that does not survive encode+decode)."""
        if whole:
            if d.text != self._tok.decode(d.token_ids):  # a stop string cut the text: keep the cut
                return echo.text + d.text
            return self._tok.decode([t for t in echo.tokens if t != self._tok.bos_id] + d.token_ids)
        text = d.text
        if self._space is None and d.token_ids:
            # sentencepiece's decode drops a text's first space; a byte-level decode keeps it
            self._space = (bool(echo.text) and self._tok.kind == "sentencepiece"
                           and self._tok.token_bytes(d.token_ids[0]).startswith(b" "))
        if self._space and text:
            text, self._space = " " + text, False
        return echo.text + text if first else text


def total_usage(prompt_tokens: int, shapers: list[ChoiceShaper]) -> Usage:
    """The request's usage. A prompt's cached tokens are what its first choice found (the n
    choices of one prompt share its blocks, prefilled once); summed over the prompts."""
    cached: dict[int, int] = {}
    for s in shapers:
        if s.cached_tokens is not None:
            cached[s.prompt] = min(cached.get(s.prompt, s.cached_tokens), s.cached_tokens)
    return Usage.of(prompt_tokens, sum(s.completion_tokens for s in shapers), sum(cached.values()))
