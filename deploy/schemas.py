"""The OpenAI wire format we accept: pydantic models for the requests (what we send back is in
deploy/responses.py).

Requests are strict (a string where a number belongs is a 400, not a silent cast) and forbid
unknown fields, as OpenAI does. Parameters we accept for compatibility but do not implement
must keep their no-op value. The mapping to engine requests lives in deploy/api.py.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
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

from deploy.tool_schemas import Tool, ToolCall, ToolChoice
from llama.engine.grammar import Grammar
from llama.engine.request import MAX_LOGIT_BIAS, MAX_PENALTY

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


def _only_with(other: str, rule: str) -> AfterValidator:
    """A field that may be set only when `other` (declared before it, so validated first) is."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get(other):
            raise ValueError(f"{info.field_name} {rule}")
        return value

    return AfterValidator(check)


Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    _one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
]
Stop = Annotated[
    str | list[Annotated[str, Field(min_length=1)]] | None,
    _one_of(f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings"),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False  # one last chunk with the usage of the whole request, before [DONE]
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk; not implemented

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous_usage(cls, v: bool) -> bool:
        if v:
            raise ValueError("continuous_usage_stats is not supported by this server; use include_usage for the "
                             "usage of the whole request in a last chunk, or leave it out")
        return v


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias. None: any JSON value.
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced here, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('response_format: type "json_schema" needs json_schema ({"name", "schema"}), and only it')
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of these."""

    model_config = ConfigDict(strict=True, extra="forbid")
    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema, or its JSON text
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None  # Lark, or llama.cpp's GBNF
    json_object: bool | None = None


class StrictRequest(BaseModel):
    """A request body: a string where a number belongs is a 400, not a silent cast; an unknown
    field is a 400; an explicit null is the field's default."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI treats an explicit null like a missing field; clients do send nulls.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        # JSON may escape half of a UTF-16 surrogate pair alone ("\ud800"): no tokenizer can encode it.
        if not _all_unicode(data):
            raise ValueError("a string in the request is not valid Unicode: it has an unpaired UTF-16 surrogate "
                             "escape (\\ud800-\\udfff without its pair); send valid UTF-8 text.")
        return data


def _all_unicode(value: Any) -> bool:
    if isinstance(value, str):
        if value.isascii():
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_all_unicode(k) and _all_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_all_unicode(v) for v in value)
    return True


class OpenAIRequest(StrictRequest):
    model: str
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's range (int64)
    stream: bool = False
    stream_options: Annotated[StreamOptions | None, _only_with("stream", "is only allowed when stream is true")] = None
    user: str | None = None  # accepted and ignored: we keep no per-user state
    # OpenAI's penalties on tokens already generated (llama.engine.request.SamplingParams says how).
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    # Token id (a string, as JSON keys are) -> bias added to its logit before sampling. The ids'
    # range is the tokenizer's, checked in deploy/api.py.
    logit_bias: dict[str, float] | None = None
    # vLLM's extension: sample among the k most likely tokens. 0 or -1 (vLLM's spelling) is no limit.
    top_k: int = 0
    # Our extension: the generated token ids on each choice, so callers can compare runs exactly.
    return_token_ids: bool = False
    # vLLM's sampling extensions, with its names, defaults and meaning (SamplingParams says how
    # each is applied; deploy/api.py maps them and checks token ids against the vocabulary).
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = []
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    bad_words: list[Annotated[str, Field(min_length=1)]] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # vLLM's default: special tokens write no text
    # Keep only the prompt's last k tokens; -1: the last max_seq_len - 1 (all that leave room for one new token).
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # Structured outputs, enforced while sampling (llama/engine/grammar.py): OpenAI's
    # response_format, vLLM's structured_outputs, or vLLM's older guided_* fields; one at most.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    # vLLM's request fields this server does not implement, each with the value that leaves it
    # off (some clients send that as a matter of course: it is accepted). Any other value is a
    # 400 naming the field, never silently ignored; a field neither here nor above stays an
    # unknown-field 400.
    VLLM_UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "use_beam_search": False, "length_penalty": 1.0, "spaces_between_special_tokens": True, "priority": 0,
        "return_token_offsets": False, "return_tokens_as_token_ids": False, "prompt_logprobs": None,
        "logprob_token_ids": None, "guided_decoding_backend": None, "guided_whitespace_pattern": None,
        "logits_processors": None, "vllm_xargs": None, "cache_salt": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "prompt_embeds": None, "mm_payload": "tensors",
        "return_mm_kwargs": None, "repetition_detection": None, "thinking_token_budget": None,
        "truncation_side": "left", "request_id": None, "session_id": None, "stream_interval": None,
        "routed_experts_prompt_start": 0, "watermarking": None,
    }

    @model_validator(mode="before")
    @classmethod
    def _vllm_fields_left_off(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, off in cls.VLLM_UNSUPPORTED.items():
            if name not in data:
                continue
            value = data.pop(name)
            if value is None or (value == off and type(value) in (type(off), int if type(off) is float else None)):
                continue
            keep = "leave it out" if off is None else f"leave it out or send {off!r}".replace("True", "true").replace(
                "False", "false")
            raise ValueError(f"{name} is a vLLM extension this server does not support (got {value!r}); {keep}")
        return data

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_to_some(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be >= 1 (keep the prompt's last k tokens) or -1 (keep what "
                             "fits), got 0")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k_or_off(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k must be a positive number of tokens to sample among, or 0 or -1 for no limit; "
                             f"got {v}")
        return max(v, 0)

    @field_validator("logit_bias")
    @classmethod
    def _bias_per_token_id(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers, as strings), got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"the bias for token {key} must be between {-MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, "
                                 f"got {bias}")
        return v

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "":
            raise ValueError("a stop string must not be empty")
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        return v

    def grammar(self) -> Grammar | None:
        """The one constraint on the output that the request sets, if any (400 if several)."""
        found: list[tuple[str, Grammar]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", Grammar.json_schema({"type": "object"})))
        elif rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.json_schema
            found.append(("response_format", Grammar.json_schema({} if schema is None else schema)))
        so = self.structured_outputs
        for name, value in [("json", so and so.json_), ("regex", so and so.regex), ("choice", so and so.choice),
                            ("grammar", so and so.grammar), ("json_object", so and so.json_object)]:
            if value:
                found.append((f"structured_outputs.{name}", _grammar_of(name, value)))
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                found.append((f"guided_{name}", _grammar_of(name, value)))
        if len(found) > 1:
            raise ValueError(f"this request sets {' and '.join(n for n, _ in found)}: send one constraint on the "
                             f"output at most")
        return found[0][1] if found else None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as SamplingParams takes it: (token id, bias) pairs."""
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())


def _grammar_of(name: str, value: Any) -> Grammar:
    if name == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not JSON: {e}") from None
        return Grammar.json_schema(value)
    if name == "json_object":
        return Grammar.json_schema({"type": "object"})
    if name == "choice":
        return Grammar.choice(value)
    return Grammar(name, value)  # regex, grammar


class CompletionRequest(OpenAIRequest):
    VLLM_UNSUPPORTED: ClassVar[dict[str, Any]] = OpenAIRequest.VLLM_UNSUPPORTED | {
        "add_special_tokens": True,  # string prompts always get BOS here
    }
    prompt: Prompt
    echo: bool = False  # before max_tokens, which reads it
    # OpenAI's default for completions. 0 (with echo) scores the prompt: its tokens' logprobs,
    # nothing generated, as lm-evaluation-harness's loglikelihood asks.
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, v: int, info: ValidationInfo) -> int:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens 0 generates nothing, so it is only allowed with echo=true (to score the "
                             "prompt); send max_tokens >= 1, or echo=true with logprobs for the prompt's logprobs")
        return v

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
    role: Literal["system", "user", "assistant", "tool"]
    content: Content | None = None  # None only for an assistant message that calls tools
    name: str | None = None  # accepted and ignored: the Llama 2 format has no speaker names
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, answered by the tool messages after it
    tool_call_id: str | None = None  # a tool message's: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        # A client that sends back the assistant message it was given sends its nulls (refusal,
        # audio, function_call, annotations) too: those say nothing, and are taken.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls may "
                             f"leave it out)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls; this one is a {self.role} message")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers), and only it has one")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # vLLM joins text parts with a newline; so do we, so prompts encode the same there and here.
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    VLLM_UNSUPPORTED: ClassVar[dict[str, Any]] = OpenAIRequest.VLLM_UNSUPPORTED | {
        "add_special_tokens": False, "add_generation_prompt": True, "continue_final_message": False,
        "echo": False, "chat_template": None, "chat_template_kwargs": None, "documents": None,
        "include_reasoning": True, "reasoning_effort": None, "return_prompt_text": None, "media_io_kwargs": None,
        "mm_processor_kwargs": None,
    }
    messages: list[ChatMessage] = Field(min_length=1)
    # None: as many as fit in max_seq_len after the prompt. max_tokens is OpenAI's older name.
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS),
                            _only_with("logprobs", "needs logprobs=true")] = None
    # Tool calling (deploy/tools.py): the functions the model may call; "auto" (the default with
    # tools) reads its answer for calls, "required" and a named function enforce them.
    tools: list[Tool] | None = None
    tool_choice: Annotated[ToolChoice | None, _one_of('"none", "auto", "required", or {"type": "function", '
                                                      '"function": {"name": ...}} naming one of the tools')] = None
    parallel_tool_calls: bool = True

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
