"""The Llama-2 chat format: dialogs of system/user/assistant messages to token lists."""
from __future__ import annotations

from typing import Literal, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def validate_dialog(dialog: Dialog) -> None:
    """Raise ValueError unless roles are: optional system, then user/assistant alternating, ending with user."""
    if not dialog:
        raise ValueError("a dialog needs at least one message, and the last must have role 'user'.")
    roles = [m.get("role") for m in dialog]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected or not body or body[-1] != "user":
        raise ValueError(
            f"chat roles must be an optional 'system' first, then 'user' and 'assistant' strictly "
            f"alternating, ending with 'user'; got {roles}."
        )


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    validate_dialog(dialog)
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
