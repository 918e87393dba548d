"""Tools in Meta's Llama 3.1 prompt (JSON tool calling, as Meta's llama-models lays it out for
Llama 3.1, 3.2 and 3.3): a system message that opens with "Environment: ipython" and the dates,
then a user message listing the functions in Meta's JSON layout, then the dialog. The model
answers a call with a JSON object {"type": "function", "name": ..., "parameters": {...}} and
<|eom_id|>; a tool's result comes back under the `ipython` role.

`tools` are OpenAI's: [{"type": "function", "function": {"name", "description", "parameters"}}],
with `parameters` a JSON schema. Meta's layout keeps only each parameter's name, description and
whether it is required (every parameter is listed as "type": "object"), and writes names and
descriptions as they are, unescaped; so does this.
"""
from __future__ import annotations

import json
from datetime import date
from typing import Any

KNOWLEDGE_CUTOFF = "December 2023"  # Llama 3.1's, in its system prompt
_TOOL = """{{
    "type": "function",
    "function": {{
        "name": "{name}",
        "description": "{description}",
        "parameters": {{
            "type": "object",
            "properties": [{properties}
            ],
            "required": {required}
        }}
    }}
}}
"""
_PARAMETER = """
                {{
                    "{name}": {{
                        "type": "object",
                        "description": "{description}"
                    }}
                }}"""


def tool_system_prompt(system: str | None, today: date) -> str:
    """The system message's text when tools are given: the environment, the dates, then the
    caller's own system text, if any."""
    text = f"Environment: ipython\n\nCutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {today:%d %B %Y}"
    if system:
        text += "\n\n" + system
    return text + "\n"


def tool_list_prompt(tools: list[dict[str, Any]]) -> str:
    """The user message that lists the functions, in Meta's JSON layout."""
    listed = "".join(_tool_text(t["function"]) for t in tools)
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            f"Here is a list of functions in JSON format:\n{listed}\nReturn function calls in JSON format.")


def _tool_text(function: dict[str, Any]) -> str:
    schema = function.get("parameters") or {}
    properties: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    listed = ",".join(_PARAMETER.format(name=name, description=_described(p)) for name, p in properties.items())
    return _TOOL.format(name=function["name"], description=_described(function), properties=listed,
                        required=json.dumps([name for name in properties if name in required]))


def _described(item: Any) -> str:
    # Meta's template writes a missing description as "None"; an empty one tells the model no less.
    return str(item.get("description") or "") if isinstance(item, dict) else ""


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call in an assistant message, as llama-models encodes one (ToolPromptFormat.json)."""
    return json.dumps({"type": "function", "name": name, "parameters": arguments})
