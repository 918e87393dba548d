"""stream=true: one HTTP request's engine streams (one per choice) merged as their deltas arrive
and sent as OpenAI's chunks in server-sent events, `data: {json}\n\n`, ending `data: [DONE]\n\n`.

The first delta of every choice is pulled before the response starts, so a request the engine
refuses is still a plain HTTP error. A failure after that is one event carrying the error body
deploy/errors.py would send, and no [DONE]. However the response ends (its last chunk, an
error, the client going away), every engine stream of the request is closed, which cancels
what is still running and frees its engine slot.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from deploy.engine import Engine
from deploy.errors import as_api_error, unfinished_error
from deploy.logprobs import chat_logprobs, completion_logprobs, joined, prompt_logprobs
from deploy.schemas import (
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    CompletionChunk,
    CompletionChunkChoice,
    Usage,
)
from llama.request import GenerationRequest, StreamDelta
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


# ---- the engine side: one stream per choice -------------------------------------------------


class ChoiceStreams:
    """The engine streams of one HTTP request, one per choice, each already past its first delta."""

    def __init__(self, streams: list[AsyncIterator[StreamDelta]], firsts: list[StreamDelta]) -> None:
        self._streams = streams
        self._firsts = firsts
        self._pending: dict[asyncio.Task[StreamDelta], int] = {}  # next-delta pull -> choice index

    def __len__(self) -> int:
        return len(self._streams)

    @classmethod
    async def open(cls, engine: Engine, requests: list[GenerationRequest]) -> ChoiceStreams:
        """Start every choice and wait for each one's first delta, concurrently. Whatever fails here
        (a ValueError for a request the engine cannot serve, a ClusterError) closes all the
        streams and is raised before the response starts."""
        streams: list[AsyncIterator[StreamDelta]] = []
        tasks: list[asyncio.Task[StreamDelta]] = []
        try:
            for r in requests:
                streams.append(engine.stream(r))
            tasks = [asyncio.ensure_future(_next(s)) for s in streams]
            firsts = await asyncio.gather(*tasks)
        except BaseException:
            await _cancel(tasks)
            await _close(streams)
            raise
        return cls(streams, list(firsts))

    @classmethod
    def finished(cls, deltas: list[StreamDelta]) -> ChoiceStreams:
        """Choices answered without the engine: each delta is its choice's only, final one."""
        assert all(d.finish_reason is not None for d in deltas)
        return cls([_nothing() for _ in deltas], deltas)

    async def deltas(self) -> AsyncGenerator[tuple[int, StreamDelta], None]:
        """(choice index, delta): the first deltas in choice order, then the others as they
        arrive. Each stream's next delta is pulled while the previous one is being sent."""
        for i, d in enumerate(self._firsts):
            self._pull_after(i, d)
            yield i, d
        while self._pending:
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=self._pending.__getitem__):
                i = self._pending.pop(task)
                d = task.result()  # the engine's error, if it failed mid-stream
                self._pull_after(i, d)
                yield i, d

    async def aclose(self) -> None:
        """Cancel the pulls in flight and close every stream: the engine cancels the requests that
        have not finished. Safe to call more than once."""
        tasks = list(self._pending)
        self._pending.clear()
        await _cancel(tasks)
        await _close(self._streams)

    def _pull_after(self, i: int, delta: StreamDelta) -> None:
        if delta.finish_reason is None:
            self._pending[asyncio.ensure_future(_next(self._streams[i]))] = i


async def _next(stream: AsyncIterator[StreamDelta]) -> StreamDelta:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise RuntimeError("an engine stream ended without a delta that has a finish_reason") from None


async def _nothing() -> AsyncIterator[StreamDelta]:
    return
    yield  # an async generator that yields nothing


async def _cancel(tasks: list[asyncio.Task[StreamDelta]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # waits until each stream has seen it


async def _close(streams: list[AsyncIterator[StreamDelta]]) -> None:
    closes = [s.aclose() for s in streams if hasattr(s, "aclose")]
    for result in await asyncio.gather(*closes, return_exceptions=True):
        if isinstance(result, Exception):
            logger.warning("closing an engine stream failed: %s: %s", type(result).__name__, result)


# ---- the HTTP side: chunks and events -------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """What shapes a response's chunks besides the deltas."""

    id: str
    created: int
    model: str
    where: str  # "POST /v1/completions", for the log
    prompt_tokens: int  # for the usage chunk; each prompt counts once however many choices it has
    include_usage: bool  # stream_options.include_usage
    logprobs: bool  # logprobs were asked for (completions: logprobs=N; chat: logprobs=true)
    return_token_ids: bool


def completion_stream(
    streams: ChoiceStreams, tokenizer: Tokenizer, spec: StreamSpec, echo: list[tuple[list[int], str]] | None
) -> EventStream:
    """`echo`: per choice, the prompt's tokens and text, which its first chunk carries."""
    return EventStream(_events(_completion_chunks(streams, tokenizer, spec, echo), spec), streams)


def chat_stream(streams: ChoiceStreams, tokenizer: Tokenizer, spec: StreamSpec) -> EventStream:
    return EventStream(_events(_chat_chunks(streams, tokenizer, spec), spec), streams)


class EventStream(StreamingResponse):
    """A text/event-stream response that closes its engine streams however it ends: Starlette
    leaves the body iterator suspended when the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], streams: ChoiceStreams) -> None:
        # no-cache and X-Accel-Buffering keep proxies (nginx) from holding chunks back
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # the client's leaving cancelled the response
                await self._events.aclose()
                await self._streams.aclose()


async def _events(chunks: AsyncGenerator[BaseModel, None], spec: StreamSpec) -> AsyncGenerator[str, None]:
    exclude = None if spec.include_usage else {"usage"}  # "usage": null on every chunk, if asked for
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"
    except Exception as e:
        # The status line has gone out: the error travels as an event, and no [DONE] follows.
        yield f"data: {json.dumps(as_api_error(e, spec.where).body())}\n\n"
        return
    yield DONE


def _check_finished(delta: StreamDelta) -> None:
    if delta.finish_reason in ("timeout", "abort"):
        raise unfinished_error(delta.finish_reason)


async def _completion_chunks(
    streams: ChoiceStreams, tok: Tokenizer, spec: StreamSpec, echo: list[tuple[list[int], str]] | None
) -> AsyncGenerator[CompletionChunk, None]:
    n = len(streams)
    offsets = [0] * n  # text_offset of each choice's next token
    to_echo = [echo is not None] * n  # the choice's first chunk has not gone out yet
    # Decoding the generation alone drops the space sentencepiece puts before its first word;
    # echoed after the prompt, that space goes back in front of the first text (as decoding
    # prompt and generation together would). None: the first generated token is still to come.
    space: list[bool | None] = [None if echo is not None else False] * n
    completion_tokens = 0
    async with aclosing(streams.deltas()) as deltas:
        async for i, d in deltas:
            _check_finished(d)
            completion_tokens += len(d.token_ids)
            text, logprobs = d.text, None
            if to_echo[i]:
                assert echo is not None
                prompt_tokens, prompt_text = echo[i]
                offsets[i] = len(prompt_text)  # as in a whole response: the generation starts after the prompt
            if spec.logprobs:
                assert d.logprobs is not None, "the engine sent no logprobs"
                logprobs = completion_logprobs(tok, d.token_ids, d.logprobs, d.top_logprobs, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs.tokens)
            if space[i] is None and d.token_ids:
                space[i] = bool(echo and echo[i][1]) and tok.id_to_piece(d.token_ids[0]).startswith("\u2581")
            if space[i] and text:
                text, space[i] = " " + text, False
            if to_echo[i]:
                text = prompt_text + text
                if logprobs is not None:
                    assert d.prompt_logprobs is not None, "the engine sent no prompt logprobs for echo"
                    logprobs = joined(prompt_logprobs(tok, prompt_tokens, d.prompt_logprobs,
                                                      d.prompt_top_logprobs), logprobs)
            elif not (text or d.finish_reason or (d.token_ids and (spec.logprobs or spec.return_token_ids))):
                continue  # nothing to say (text held back, nothing else asked for)
            to_echo[i] = False
            yield CompletionChunk(id=spec.id, created=spec.created, model=spec.model, choices=[
                CompletionChunkChoice(index=i, text=text, logprobs=logprobs, finish_reason=d.finish_reason,
                                      token_ids=d.token_ids if spec.return_token_ids else None),
            ])
    if spec.include_usage:
        yield CompletionChunk(id=spec.id, created=spec.created, model=spec.model, choices=[],
                              usage=Usage.of(spec.prompt_tokens, completion_tokens))


async def _chat_chunks(streams: ChoiceStreams, tok: Tokenizer, spec: StreamSpec) -> AsyncGenerator[ChatChunk, None]:
    def chunk(i: int, delta: ChatDelta, logprobs: ChatLogprobs | None = None, finish: str | None = None,
              token_ids: list[int] | None = None) -> ChatChunk:
        choice = ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish, token_ids=token_ids)
        return ChatChunk(id=spec.id, created=spec.created, model=spec.model, choices=[choice])

    for i in range(len(streams)):
        yield chunk(i, ChatDelta(role="assistant", content=""))
    completion_tokens = 0
    async with aclosing(streams.deltas()) as deltas:
        async for i, d in deltas:
            _check_finished(d)
            completion_tokens += len(d.token_ids)
            if d.text or (d.token_ids and (spec.logprobs or spec.return_token_ids)):
                logprobs = None
                if spec.logprobs:
                    assert d.logprobs is not None, "the engine sent no logprobs"
                    logprobs = ChatLogprobs(content=chat_logprobs(tok, d.token_ids, d.logprobs, d.top_logprobs))
                yield chunk(i, ChatDelta(content=d.text), logprobs,
                            token_ids=d.token_ids if spec.return_token_ids else None)
            if d.finish_reason is not None:
                yield chunk(i, ChatDelta(), finish=d.finish_reason)
    if spec.include_usage:
        yield ChatChunk(id=spec.id, created=spec.created, model=spec.model, choices=[],
                        usage=Usage.of(spec.prompt_tokens, completion_tokens))
