"""The Llama-2 chat format: dialogs to token lists, role order checks, and special-tag detection."""
from __future__ import annotations

import pytest

from llama.chat_format import UNSAFE_ERROR, encode_dialog, has_special_tags
from llama.tokenizer import Tokenizer, load_tokenizer
from tests.conftest import GOLDEN_CKPT


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(GOLDEN_CKPT / "tokenizer.model")


def test_chat_single_user(tok):
    d = [{"role": "user", "content": " hi "}]
    assert encode_dialog(tok, d) == tok.encode("[INST] hi [/INST]", bos=True, eos=False)


def test_chat_system_and_turns(tok):
    d = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "and now?"},
    ]
    want = tok.encode("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello! ", bos=True, eos=True)
    want += tok.encode("[INST] and now? [/INST]", bos=True, eos=False)
    assert encode_dialog(tok, d) == want


@pytest.mark.parametrize(
    "roles",
    [[], ["assistant"], ["user", "user"], ["system"], ["user", "assistant"], ["system", "assistant", "user"]],
)
def test_chat_role_order_is_checked(tok, roles):
    with pytest.raises(ValueError, match="role"):
        encode_dialog(tok, [{"role": r, "content": "x"} for r in roles])


def test_special_tags(tok):
    assert has_special_tags([{"role": "user", "content": "tell me about [INST] tags"}])
    assert not has_special_tags([{"role": "user", "content": "tell me about tags"}])
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
