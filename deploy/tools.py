"""What a chat request's tools mean for its prompt and its output.

tool_choice "none": the tools are shown to the model (as vLLM shows them) and its answer is
text. "auto" (the default with tools): the answer is read for calls (deploy/tool_calls.py) and
what is not a call is content. "required" and a named function: the answer must be calls, and
is made to be: a grammar built from the tools' parameter schemas masks every token (as
structured outputs do), so even a weak model's call names a tool and its arguments validate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deploy.errors import APIError
from deploy.responses import Capabilities
from deploy.tool_calls import ToolCallParser
from deploy.tool_schemas import NamedToolChoice, Tool, ToolChoice
from llama.engine.grammar import JSON_OPTIONS, Grammar, check_grammar
from llama.tokenizers.base import Tokenizer

CALL_SEPARATOR = "; "  # between parallel calls, as vLLM's llama3_json parser reads them


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools, settled."""

    tools: list[dict[str, Any]] | None  # for the prompt, in OpenAI's shape; None without tools
    grammar: Grammar | None  # the calls' grammar (required, named); None: the model is free
    names: frozenset[str]  # the functions an answer may call: only these are read as calls
    parallel: bool  # parallel_tool_calls: more than one call in an answer

    @property
    def parses(self) -> bool:
        """Whether answers are read for calls (not for tool_choice "none")."""
        return bool(self.names)

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.names, self.parallel) if self.parses else None


NO_TOOLS = ToolUse(None, None, frozenset(), False)


def tool_use(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool, tokenizer: Tokenizer) -> ToolUse:
    """The request's tools and tool_choice, checked: a 400 naming what is wrong."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: send the functions the model may call in tools, or leave "
                                "tool_choice out.", param="tool_choice")
        return NO_TOOLS
    if tokenizer.chat_format == "llama2":
        raise APIError(400, "this model's chat format (Llama 2's [INST]) has no tool calling, so tools cannot be "
                            "offered to it: leave tools out, or serve a Llama 3.1+ checkpoint or a Hugging Face "
                            "folder whose chat_template takes tools.", param="tools")
    by_name = {t.function.name: t for t in tools}
    if len(by_name) != len(tools):
        raise APIError(400, "two tools have the same function name; give each function its own name.",
                       param="tools")
    prompt_tools = [t.model_dump(exclude_none=True) for t in tools]
    choice = choice or "auto"
    if choice == "none":
        return ToolUse(prompt_tools, None, frozenset(), False)
    if choice == "auto":
        return ToolUse(prompt_tools, None, frozenset(by_name), parallel)
    with_type = tokenizer.chat_format == "llama3"  # Meta's format writes "type": "function" in a call
    for t in tools:
        _check_parameters(t, with_type)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in by_name:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(sorted(by_name))}); name one of them.", param="tool_choice")
        schema = _call_schema(by_name[name], with_type)
        return ToolUse(prompt_tools, Grammar.json_schema(schema), frozenset({name}), False)
    # "required": one call or more, each naming one of the tools
    calls = [_call_schema(t, with_type) for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if not parallel:
        return ToolUse(prompt_tools, Grammar.json_schema(schema), frozenset(by_name), False)
    lark = (f'start: call ({json.dumps(CALL_SEPARATOR)} call)*\n'
            f'call: %json {json.dumps(schema | {"x-guidance": JSON_OPTIONS})}')
    return ToolUse(prompt_tools, Grammar("grammar", lark), frozenset(by_name), True)


def capabilities(tokenizer: Tokenizer) -> Capabilities:
    """What GET /v1/models says this model takes."""
    tools = tokenizer.chat_format != "llama2"
    return Capabilities(chat_format=tokenizer.chat_format,
                        tool_choice=["none", "auto", "required", "function"] if tools else [],
                        structured_outputs=["json_object", "json_schema", "regex", "choice", "grammar"],
                        parallel_tool_calls=tools)


def _check_parameters(tool: Tool, with_type: bool) -> None:
    try:
        check_grammar(Grammar.json_schema(_call_schema(tool, with_type)))
    except ValueError as e:
        raise APIError(400, f"the parameters of the function {tool.function.name!r} cannot be enforced: {e}. Fix its "
                            f"JSON schema, or use tool_choice auto.", param="tools") from None


_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA = ("const", "enum", "default", "examples", "required")


def _closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties and says nothing of others closed to
    them (additionalProperties false), as xgrammar's strict mode (vLLM's default) reads schemas:
    left open, a weak model can wander into keys of its own and never end the call."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _NAMED_SCHEMAS and isinstance(value, dict):  # name -> schema: the names are no keywords
            out[key] = {name: _closed(s) for name, s in value.items()}
        elif key in _DATA:
            out[key] = value
        else:
            out[key] = _closed(value)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(tool: Tool, with_type: bool) -> dict[str, Any]:
    """One call to `tool`, as the model writes it: {"name", "parameters"} (with "type" first in
    Meta's format), its arguments under the function's own schema."""
    f = tool.function
    # No parameters: an empty argument list (OpenAI's reading), so {} and nothing else.
    parameters = _closed(f.parameters) if f.parameters is not None else {"type": "object", "properties": {},
                                                                        "additionalProperties": False}
    properties: dict[str, Any] = {"type": {"const": "function"}} if with_type else {}
    properties |= {"name": {"const": f.name}, "parameters": parameters}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
