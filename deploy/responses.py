"""The OpenAI wire format we send: responses, stream chunks (stream=true: one per server-sent
event), the model list and errors. What we accept is in deploy/schemas.py.
"""
from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from deploy.tool_schemas import ToolCall, ToolCallDelta


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens found in the prefix cache (not prefilled again), as OpenAI reports


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
        # Like OpenAI, a prompt counts once however many choices it has.
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    tokens: list[str]  # each token decoded on its own, as Meta's reference does
    token_logprobs: list[float | None]  # None for the first prompt token (nothing predicts it)
    # Per token, the most likely tokens' text -> logprob: the request's `logprobs` of them, plus the
    # chosen token when it is not among them (OpenAI's "up to logprobs+1"). None for the first
    # prompt token. Tokens whose text is the same (e.g. two that decode to "") share one key.
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # character offset of each token in the choice's text


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes, so clients can rebuild split characters


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the request's top_logprobs most likely tokens, most likely first


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is tool calls and nothing else
    tool_calls: list[ToolCall] = Field(default_factory=list, exclude_if=lambda v: not v)


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)  # first chunk only
    content: str | None = Field(None, exclude_if=lambda v: v is None)  # absent in the last chunk
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=lambda v: v is None)  # a call, once whole


# "tool_calls": stopped after calls. The engine's "timeout" and "abort" are errors (deploy/choice_streams.py).
FinishReason = Literal["stop", "length", "tool_calls"]


class _Choice(BaseModel):
    """What every choice has, whole or in a chunk. Each kind below narrows logprobs and adds what
    the choice says; pydantic writes these fields first, in this order, then the kind's own."""

    index: int
    logprobs: CompletionLogprobs | ChatLogprobs | None  # in a chunk, for the chunk's tokens
    finish_reason: FinishReason | None  # in a stream, on the choice's last chunk only
    # Only present when the request set return_token_ids.
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)


class CompletionChunkChoice(_Choice):
    logprobs: CompletionLogprobs | None
    text: str  # in a chunk, the new text since the choice's previous chunk


class CompletionChoice(CompletionChunkChoice):  # a whole choice: all of its text, and finished
    finish_reason: FinishReason


class ChatChunkChoice(_Choice):
    logprobs: ChatLogprobs | None
    delta: ChatDelta


class ChatChoice(_Choice):
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    message: AssistantMessage


ChoiceT = TypeVar("ChoiceT", bound=_Choice)


class _Response(BaseModel, Generic[ChoiceT]):
    """What every response and chunk carries around its choices; each kind sets `object`."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]  # in a chunk: one choice, or none in the usage chunk
    usage: Usage


class _Chunk(_Response[ChoiceT], Generic[ChoiceT]):
    usage: Usage | None = None  # sent (null but in the last chunk) only with stream_options.include_usage


class CompletionResponse(_Response[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


class CompletionChunk(_Chunk[CompletionChunkChoice]):
    object: Literal["text_completion"] = "text_completion"


class ChatCompletionResponse(_Response[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"


class ChatChunk(_Chunk[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class Capabilities(BaseModel):
    """What the served model supports beyond plain completions and chat (GET /v1/models)."""

    chat_format: Literal["llama2", "llama3", "template"]  # Meta's Llama 2 or 3 format, or the folder's template
    tool_choice: list[str]  # the tool_choice values taken ("function": naming one); none where tools are not
    structured_outputs: list[str]  # the constraints response_format and structured_outputs take
    parallel_tool_calls: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama-ray"
    max_model_len: int | None = None  # prompt and answer together, per sequence (vLLM's field)
    capabilities: Capabilities | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str  # what was wrong and what to change
    type: str  # invalid_request_error, rate_limit_error, service_unavailable_error, timeout_error, internal_error
    param: str | None  # the request field at fault, if one is
    code: str | None  # e.g. model_not_found, context_length_exceeded, rate_limit_exceeded, model_starting


class ErrorResponse(BaseModel):
    """Every error's body, in OpenAI's shape (deploy/errors.py)."""

    error: ErrorDetail
