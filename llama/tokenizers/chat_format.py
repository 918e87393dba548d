"""Chat formats: a dialog of system/user/assistant (and tool) messages to the prompt's token ids,
laid out the way the tokenizer's model was trained (Tokenizer.chat_format): Meta's Llama 2 [INST]
format, Meta's Llama 3 header format (with Llama 3.1's tools: llama/tokenizers/llama3_tools.py),
or the Jinja chat_template of a Hugging Face tokenizer_config.json (given the tools, as
transformers' apply_chat_template gives them)."""
from __future__ import annotations

import functools
import json
from datetime import date, datetime
from typing import Any, Literal, NotRequired, TypedDict

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.llama3_tools import call_text, tool_list_prompt, tool_system_prompt

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(TypedDict):
    id: str
    name: str
    arguments: dict[str, Any]


class Message(TypedDict):
    role: Role
    content: str
    tool_calls: NotRequired[list[ToolCall]]  # an assistant's calls, answered by the tool messages after it
    tool_call_id: NotRequired[str]  # a tool message's: the call it answers


Dialog = list[Message]
# OpenAI's tool definitions: [{"type": "function", "function": {"name", "description", "parameters"}}]
Tools = list[dict[str, Any]]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def has_special_tags(dialog: Dialog, tokenizer: Tokenizer | None = None) -> bool:
    """Whether a message holds text that would act as markup in the prompt, which Meta's reference
    answers with UNSAFE_ERROR: the Llama 2 format's tags (the only check without a tokenizer). The
    Llama 3 format encodes every message as plain text, so nothing there is markup; a chat
    template's output is read with its special tokens, so their text in a message would be."""
    chat_format = tokenizer.chat_format if tokenizer is not None else "llama2"
    if chat_format == "llama3":
        return False
    tags = SPECIAL_TAGS if chat_format == "llama2" else list(tokenizer.special_tokens)  # type: ignore[union-attr]
    return any(tag in msg["content"] for tag in tags for msg in dialog)


# Which role may follow which: "assistant*" is an assistant message that calls tools.
_NEXT = {None: {"user"}, "user": {"assistant", "assistant*"}, "assistant": {"user"}, "assistant*": {"tool"},
         "tool": {"tool", "assistant", "assistant*"}}


def validate_dialog(dialog: Dialog) -> None:
    """Raise ValueError unless roles are: optional system, then user and assistant alternating,
    ending with user; an assistant message that calls tools is followed by the tools' messages
    (role tool), then the assistant again, and a dialog may end with them."""
    roles = [m.get("role") for m in dialog]
    body = [("assistant*" if r == "assistant" and m.get("tool_calls") else r) for r, m in zip(roles, dialog)]
    body = body[1:] if body[:1] == ["system"] else body
    ok = bool(body) and body[-1] in ("user", "tool")
    for before, role in zip([None, *body], body):
        ok = ok and role in _NEXT[before]
    if not ok:
        tools = (" (an assistant message with tool_calls is followed by one 'tool' message per call, and the dialog "
                 "may end there)") if any(r not in ("user", "assistant", "system") for r in body) else ""
        raise ValueError(f"chat roles must be an optional 'system' first, then 'user' and 'assistant' strictly "
                         f"alternating, ending with 'user'{tools}; got {roles}.")


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, tools: Tools | None = None,
                  today: date | None = None) -> list[int]:
    """The prompt for `dialog`, ending where the assistant's answer begins. `tools`: the
    functions the model may call, laid out in its format (ValueError where it has none);
    `today`: the date Llama 3.1's tool prompt states (today's by default)."""
    validate_dialog(dialog)
    if tokenizer.chat_format == "llama3":
        return _encode_llama3(tokenizer, dialog, tools, today or date.today())
    if tokenizer.chat_format == "template":
        return _encode_template(tokenizer, dialog, tools)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in dialog):
        raise ValueError("this model's chat format (Llama 2's [INST]) has no way to show tools or tool calls: leave "
                         "out tools, tool_calls and tool messages, or serve a Llama 3.1+ checkpoint or a Hugging Face "
                         "folder whose chat_template takes tools.")
    return _encode_llama2(tokenizer, dialog)


# ---- Llama 2: Meta's llama/generation.py chat_completion ----

def _encode_llama2(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    if dialog[0]["role"] == "system":
        dialog = [
            {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
            *dialog[2:],
        ]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += tokenizer.encode(
            f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
            bos=True,
            eos=True,
        )
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


# ---- Llama 3: Meta's llama_models/llama3/chat_format.py ChatFormat.encode_dialog_prompt ----

def _encode_llama3(tokenizer: Tokenizer, dialog: Dialog, tools: Tools | None, today: date) -> list[int]:
    """<|begin_of_text|>, then per message a header (a tool's result under `ipython`), its content
    as plain text (not stripped, as in the reference), each of its tool calls encoded apart, and
    <|eom_id|> after calls (the model waits for their results), <|eot_id|> otherwise; then the
    assistant's header. With tools, Llama 3.1's system message and list of functions first."""
    if tools:
        system = dialog[0]["content"] if dialog[0]["role"] == "system" else None
        dialog = [{"role": "system", "content": tool_system_prompt(system, today)},
                  {"role": "user", "content": tool_list_prompt(tools)}, *dialog[system is not None:]]
    begin = _special_id(tokenizer, "<|begin_of_text|>")
    eot, eom = _special_id(tokenizer, "<|eot_id|>"), _special_id(tokenizer, "<|eom_id|>")
    tokens = [begin]
    for message in dialog:
        tokens += _llama3_header(tokenizer, "ipython" if message["role"] == "tool" else message["role"])
        tokens += tokenizer.encode(message["content"], bos=False, eos=False)
        for call in message.get("tool_calls", ()):
            tokens += tokenizer.encode(call_text(call["name"], call["arguments"]), bos=False, eos=False)
        tokens.append(eom if message.get("tool_calls") else eot)
    return tokens + _llama3_header(tokenizer, "assistant")


def _llama3_header(tokenizer: Tokenizer, role: str) -> list[int]:
    """<|start_header_id|>role<|end_header_id|> and "\\n\\n", role and newlines encoded apart."""
    return [_special_id(tokenizer, "<|start_header_id|>"), *tokenizer.encode(role, bos=False, eos=False),
            _special_id(tokenizer, "<|end_header_id|>"), *tokenizer.encode("\n\n", bos=False, eos=False)]


def _special_id(tokenizer: Tokenizer, text: str) -> int:
    try:
        return tokenizer.special_tokens[text]
    except KeyError:
        raise ValueError(f"the Llama 3 chat format needs the special token {text}, which {tokenizer.path} does not "
                         f"have: use Llama 3's tokenizer, or give a chat_template in tokenizer_config.json.") from None


# ---- Jinja chat templates, rendered as transformers' apply_chat_template does ----

def _encode_template(tokenizer: Tokenizer, dialog: Dialog, tools: Tools | None) -> list[int]:
    """Render tokenizer.chat_template with the generation prompt, then encode the text reading
    special-token text as those tokens (the template writes them; no BOS is added besides).
    Messages and tools reach it as transformers passes them (a call's arguments as a dict, as
    vLLM gives them, since templates write them with tojson)."""
    assert tokenizer.chat_template is not None, "chat_format 'template' comes with a chat_template"
    where = f"the chat_template in tokenizer_config.json beside {tokenizer.path}"
    try:
        template = _compile(tokenizer.chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where} is not valid Jinja: {e}") from None
    names = {i: text for text, i in tokenizer.special_tokens.items()}
    try:
        rendered = template.render(
            messages=[_template_message(m) for m in dialog],
            tools=tools or None, documents=None, add_generation_prompt=True,
            bos_token=names.get(tokenizer.bos_id, ""), eos_token=names.get(tokenizer.eos_id, ""))
    except jinja2.TemplateError as e:
        raise ValueError(f"{where} refused the dialog: {e}") from None
    return tokenizer.encode_with_special_tokens(rendered)


def _template_message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in m["tool_calls"]]
    if "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    return out


@functools.lru_cache(maxsize=4)
def _compile(template: str) -> jinja2.Template:
    """transformers' environment: a sandbox (templates come from model repositories), blocks
    trimmed, loop controls, and the globals and filters templates on the Hub use."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Jinja's own tojson escapes HTML characters; templates expect plain JSON."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
