"""Tokenizer files for tests: Meta's Llama 3 tokenizer.model (shipped inside llama_models), and
Hugging Face folders (tokenizer.json + tokenizer_config.json) that transformers' own converters
make from it and from the golden sentencepiece model, with each family's chat template.
Needs transformers and llama_models (test dependencies; serving never imports them)."""
from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any, Literal

GOLDEN_SENTENCEPIECE = Path(__file__).parent / "data" / "golden" / "ckpt" / "tokenizer.model"

# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json (tools in the first user message by
# default; "26 Jul 2024" where the caller gives no date_string)
LLAMA31_CHAT_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''
# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
OFFICIAL = "official"  # write_hf_tokenizer's default: the kind's own template above


def _added_token(text: str) -> dict[str, Any]:
    """How Llama 2's tokenizer_config.json spells its bos/eos/unk tokens."""
    return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


# As in the Hub's files (the Instruct model's eos is <|eot_id|>, its base model's <|end_of_text|>).
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
               "model_input_names": ["input_ids", "attention_mask"], "tokenizer_class": "PreTrainedTokenizerFast"},
    "llama2": {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>"),
               "eos_token": _added_token("</s>"), "unk_token": _added_token("<unk>"), "pad_token": None,
               "clean_up_tokenization_spaces": False, "legacy": False, "tokenizer_class": "LlamaTokenizer"},
}
_TEMPLATES = {"llama3": LLAMA3_CHAT_TEMPLATE, "llama2": LLAMA2_CHAT_TEMPLATE}


def llama3_tokenizer_model() -> Path:
    """Meta's Llama 3 tokenizer.model (tiktoken format, 128000 ranks), as llama_models ships it."""
    return Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))


def write_hf_tokenizer(out_dir: Path, kind: Literal["llama3", "llama2"],
                       chat_template: str | None = OFFICIAL) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `out_dir` and return tokenizer.json's
    path. `chat_template`: OFFICIAL for the kind's own, None for none, or a template's text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(kind), encoding="utf-8")
    config = dict(_CONFIGS[kind])
    template = _TEMPLATES[kind] if chat_template == OFFICIAL else chat_template
    if template is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir / "tokenizer.json"


@functools.cache
def _tokenizer_json(kind: str) -> str:
    """tokenizer.json's text, made once per session (Llama 3's conversion takes a few seconds)."""
    if kind == "llama3":
        return _llama3_tokenizer_json()
    if kind == "llama2":
        from transformers import LlamaTokenizer

        # transformers 5 converts the sentencepiece model to a BPE tokenizer.json (Metaspace
        # pre-tokenizer, ByteFallback decoder) and, with add_bos_token, a "<s> $A" post-processor.
        tok = LlamaTokenizer.from_pretrained(GOLDEN_SENTENCEPIECE.parent, add_bos_token=True, legacy=False)
        return tok.backend_tokenizer.to_str()
    raise ValueError(f"kind must be 'llama3' or 'llama2', got {kind!r}")


def _llama3_tokenizer_json() -> str:
    """Meta's file through transformers' TikTokenConverter with Meta's pattern and special tokens,
    and the Hub file's post-processor (BOS before the text)."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = MetaTokenizer(llama3_tokenizer_model())
    tok = TikTokenConverter(str(llama3_tokenizer_model()), pattern=MetaTokenizer.pat_str,
                            extra_special_tokens=list(meta.special_tokens)).converted()
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, meta.special_tokens[bos])]),
    ])
    return tok.to_str()
