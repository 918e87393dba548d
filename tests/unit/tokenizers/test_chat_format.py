"""Chat formats: dialogs to token lists in Llama 2's format (by hand), Llama 3's (against Meta's
llama_models) and chat templates (against transformers' apply_chat_template); role order checks
and special-tag detection in each."""
from __future__ import annotations

import pytest

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import UNSAFE_ERROR, encode_dialog, has_special_tags
from llama.tokenizers.load import load_tokenizer
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


# ---- Llama 3 and chat templates ----

DIALOGS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief; use <b>bold</b> & café"}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "  hello there  "},
        {"role": "assistant", "content": "Arr, ahoy!\n"},
        {"role": "user", "content": "Où est le trésor? 宝物 🙂"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "and <|eot_id|> or [INST] as text"},
    ],
]


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    from tests.tokenizer_files import llama3_tokenizer_model

    return load_tokenizer(llama3_tokenizer_model())


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, tuple[Tokenizer, object]]:
    """kind -> (ours, transformers') for a Hugging Face folder with the kind's chat template, and
    "llama3-bare": Llama 3's tokenizer.json without one."""
    from transformers import AutoTokenizer

    from tests.tokenizer_files import write_hf_tokenizer

    out = {}
    for kind in ("llama3", "llama2"):
        path = write_hf_tokenizer(tmp_path_factory.mktemp(kind), kind)
        out[kind] = load_tokenizer(path), AutoTokenizer.from_pretrained(path.parent)
    bare = write_hf_tokenizer(tmp_path_factory.mktemp("bare"), "llama3", chat_template=None)
    out["llama3-bare"] = load_tokenizer(bare), None
    return out


@pytest.fixture(scope="module")
def meta_chat():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from tests.tokenizer_files import llama3_tokenizer_model

    return ChatFormat(MetaTokenizer(llama3_tokenizer_model()))


@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama3_format_matches_meta(llama3, hf, meta_chat, dialog):
    from llama_models.datatypes import RawMessage

    want = meta_chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in dialog]).tokens
    assert llama3.chat_format == "llama3"
    assert encode_dialog(llama3, dialog) == want
    bare, _ = hf["llama3-bare"]  # a tokenizer.json without a template gets the same format
    assert bare.chat_format == "llama3" and encode_dialog(bare, dialog) == want


@pytest.mark.parametrize("kind", ["llama3", "llama2"])
@pytest.mark.parametrize("dialog", DIALOGS)
def test_template_matches_transformers(hf, kind, dialog):
    ours, theirs = hf[kind]
    assert ours.chat_format == "template"
    want = theirs.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_dialog(ours, dialog) == want


# Indented, multi-line blocks (trim_blocks, lstrip_blocks), a loop control and tojson (transformers'
# own, which leaves "<" and non-ASCII alone): the environment must be transformers'.
MULTILINE_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if loop.index0 > 5 %}
        {% break %}
    {% endif %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] | tojson }}<</SYS>>
    {% else %}
[{{ message['role'] }}] {{ message['content'] | trim }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[assistant]
{% endif %}"""


@pytest.mark.parametrize("dialog", DIALOGS)
def test_multiline_template_matches_transformers(tmp_path_factory, dialog):
    from transformers import AutoTokenizer

    from tests.tokenizer_files import write_hf_tokenizer

    path = write_hf_tokenizer(tmp_path_factory.mktemp("multiline"), "llama2", chat_template=MULTILINE_TEMPLATE)
    want = AutoTokenizer.from_pretrained(path.parent).apply_chat_template(
        dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_dialog(load_tokenizer(path), dialog) == want


def test_template_errors_are_value_errors(hf):
    tok = load_tokenizer(hf["llama2"][0].path)  # a copy to change
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}{% endif %}"
    with pytest.raises(ValueError, match="refused the dialog: no system prompts"):
        encode_dialog(tok, DIALOGS[1])
    tok.chat_template = "{% for %}"
    with pytest.raises(ValueError, match="not valid Jinja"):
        encode_dialog(tok, DIALOGS[0])


@pytest.mark.parametrize("roles", [["assistant"], ["user", "user"], ["system", "assistant", "user"]])
def test_role_order_is_checked_in_every_format(llama3, hf, roles):
    for tok in (llama3, hf["llama3"][0], hf["llama2"][0]):
        with pytest.raises(ValueError, match="role"):
            encode_dialog(tok, [{"role": r, "content": "x"} for r in roles])


def test_special_tags_per_format(tok, llama3, hf):
    inst = [{"role": "user", "content": "tell me about [INST] tags"}]
    eot = [{"role": "user", "content": "tell me about <|eot_id|>"}]
    assert has_special_tags(inst, tok) and not has_special_tags(eot, tok)
    # Llama 3's format encodes messages as plain text: nothing in them is markup
    assert not has_special_tags(inst, llama3) and not has_special_tags(eot, llama3)
    # a template's output is read with its special tokens, so their text in a message would act
    assert has_special_tags(eot, hf["llama3"][0]) and not has_special_tags(inst, hf["llama3"][0])
    assert has_special_tags([{"role": "user", "content": "a </s> b"}], hf["llama2"][0])
