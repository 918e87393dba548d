"""OpenAI's tool calling on the wire: the tools a chat request offers, its tool_choice, the calls
an assistant message made (in a request's history and in our answers) and their stream deltas.
What they mean for the prompt and the output: deploy/tools.py and deploy/tool_calls.py."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None  # the arguments always follow the schema where a call is enforced


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """A call's function. In a request's history `arguments` must be a JSON object's text."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str
    arguments: str  # whole: a call is sent once its JSON has closed


class ToolCallDelta(BaseModel):
    index: int  # which of the choice's calls, counted from 0
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallDelta
