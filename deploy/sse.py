"""stream=true: a request's choices sent as OpenAI's chunks in server-sent events,
`data: {json}\n\n`, ending `data: [DONE]\n\n`; each delta's piece (deploy/choices.py) is one chunk.

A failure after the status line is one event carrying the error body deploy/errors.py would
send, and no [DONE]. However the response ends (its last chunk, an error, the client going
away), every engine stream of the request is closed (deploy/choice_streams.py).
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from deploy.choice_streams import ChoiceStreams
from deploy.choices import ChoiceShaper, total_usage
from deploy.errors import as_api_error
from deploy.responses import ChatChunk, ChatChunkChoice, ChatDelta, CompletionChunk, CompletionChunkChoice, Usage

DONE = "data: [DONE]\n\n"

Chunk = TypeVar("Chunk", CompletionChunk, ChatChunk)


@dataclass(frozen=True)
class StreamSpec:
    """What shapes a response's chunks besides the choices."""

    id: str
    created: int
    model: str
    where: str  # "POST /v1/completions", for the log
    prompt_tokens: int  # for the usage chunk; each prompt counts once however many choices it has
    include_usage: bool  # stream_options.include_usage

    def chunk(self, cls: type[Chunk], choice: CompletionChunkChoice | ChatChunkChoice | None = None,
              usage: Usage | None = None) -> Chunk:
        """One choice's chunk, or (no choice) the usage chunk."""
        return cls(id=self.id, created=self.created, model=self.model, choices=[choice] if choice is not None else [],
                   usage=usage)


def completion_stream(streams: ChoiceStreams, shapers: list[ChoiceShaper], spec: StreamSpec) -> EventStream:
    return EventStream(_events(_completion_chunks(streams, shapers, spec), spec), streams)


def chat_stream(streams: ChoiceStreams, shapers: list[ChoiceShaper], spec: StreamSpec) -> EventStream:
    return EventStream(_events(_chat_chunks(streams, shapers, spec), spec), streams)


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
        async def receive_or_disconnect() -> Message:
            try:
                return await receive()
            except Exception:  # Ray Serve's receive raises its cancellation when the client goes away
                return {"type": "http.disconnect"}

        try:
            await super().__call__(scope, receive_or_disconnect, send)
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


async def _completion_chunks(
    streams: ChoiceStreams, shapers: list[ChoiceShaper], spec: StreamSpec
) -> AsyncGenerator[CompletionChunk, None]:
    async with aclosing(streams.deltas()) as deltas:
        async for i, d in deltas:
            p = shapers[i].piece(d)
            if p.has_content or p.finish_reason:
                yield spec.chunk(CompletionChunk, CompletionChunkChoice(
                    index=i, text=p.text, logprobs=p.logprobs, finish_reason=p.finish_reason, token_ids=p.token_ids))
    if spec.include_usage:
        yield spec.chunk(CompletionChunk, usage=total_usage(spec.prompt_tokens, shapers))


async def _chat_chunks(
    streams: ChoiceStreams, shapers: list[ChoiceShaper], spec: StreamSpec
) -> AsyncGenerator[ChatChunk, None]:
    # OpenAI's shape: a first chunk per choice with the role, then content chunks, then one
    # with only the finish reason.
    for i in range(len(streams)):
        yield spec.chunk(ChatChunk, ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""),
                                                    logprobs=None, finish_reason=None))
    async with aclosing(streams.deltas()) as deltas:
        async for i, d in deltas:
            p = shapers[i].piece(d)
            if p.has_content:
                yield spec.chunk(ChatChunk, ChatChunkChoice(index=i, delta=ChatDelta(content=p.text),
                                                            logprobs=p.logprobs, finish_reason=None,
                                                            token_ids=p.token_ids))
            for call in p.tool_calls:  # each call whole, in a chunk of its own
                yield spec.chunk(ChatChunk, ChatChunkChoice(index=i, delta=ChatDelta(tool_calls=[call]),
                                                            logprobs=None, finish_reason=None))
            if p.finish_reason is not None:
                yield spec.chunk(ChatChunk, ChatChunkChoice(index=i, delta=ChatDelta(), logprobs=None,
                                                            finish_reason=p.finish_reason))
    if spec.include_usage:
        yield spec.chunk(ChatChunk, usage=total_usage(spec.prompt_tokens, shapers))
