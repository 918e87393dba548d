"""The OpenAI wire format: pydantic models for the requests we accept and the responses we send.

Requests are strict (a string where a number belongs is a 400, not a silent cast) and forbid
unknown fields, as OpenAI does. Parameters we accept for compatibility but do not implement
must keep their no-op value. The mapping to engine requests lives in deploy/api.py.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions endpoint
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat


def _one_of(expected: str) -> WrapValidator:
    """Replace pydantic's error per union member (five lines for one mistake) with one line."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_union", "expected {expected}", {"expected": expected}) from None

    return WrapValidator(check)


Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    _one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
]
Stop = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None,
    _one_of(f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings"),
]


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI treats an explicit null like a missing field; clients do send nulls.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's range (int64)
    stream: bool = False
    user: str | None = None  # accepted and ignored: we keep no per-user state
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream_options: dict[str, Any] | None = None
    # Our extension: the generated token ids on each choice, so callers can compare runs exactly.
    return_token_ids: bool = False

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported yet; send stream=false or leave it out")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported by this server; send 0 or leave it out")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        return v

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "":
            raise ValueError("a stop string must not be empty")
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(OpenAIRequest):
    prompt: Prompt
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("best_of is not supported by this server; use n, or leave it out")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported by this server; leave it out")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


Content = Annotated[
    str | list[TextPart],
    _one_of("a string or a list of {'type': 'text', 'text': ...} parts (only text is supported)"),
]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Content
    name: str | None = None  # accepted and ignored: the Llama 2 format has no speaker names

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        # vLLM joins text parts with a newline; so do we, so prompts encode the same there and here.
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # None: as many as fit in max_seq_len after the prompt. max_tokens is OpenAI's older name.
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]  # each token decoded on its own, as Meta's reference does
    token_logprobs: list[float | None]  # None for the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float]] | None = None  # not computed
    text_offset: list[int]  # character offset of each token in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]
    # Only present when the request set return_token_ids.
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes, so clients can rebuild split characters
    top_logprobs: list[dict[str, Any]] = []  # not computed


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
