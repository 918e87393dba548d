"""HFTokenizer against transformers on the same tokenizer.json (Llama 3's byte-level file and a
Llama 2 sentencepiece-style one, made by tests/tokenizer_files.py): ids, text, token bytes,
special-token text kept as text, and load_tokenizer reading tokenizer_config.json and
generation_config.json beside the file."""
from __future__ import annotations

import json

import pytest

from llama.tokenizers.hf import HFTokenizer
from llama.tokenizers.load import load_tokenizer
from tests.tokenizer_files import llama3_tokenizer_model, write_hf_tokenizer

KINDS = ["llama3", "llama2"]
TEXTS = [
    "",
    "hello world",
    "Hello, World! It's 2024; we'll see.",
    "héllo café naïve",
    "日本語 and 中文",
    "emoji 🙂👍🏽",
    "digits 1234567890 3.14159",
    "tabs\tand\nnewlines\n\n  and   spaces",
    "special text: <|eot_id|> <|begin_of_text|> <s> </s> <unk> [INST]",
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[str, tuple[HFTokenizer, object]]:
    """kind -> (ours, transformers') on one folder of that kind."""
    from transformers import AutoTokenizer

    out = {}
    for kind in KINDS:
        path = write_hf_tokenizer(tmp_path_factory.mktemp(kind), kind)
        ours = load_tokenizer(path)
        assert isinstance(ours, HFTokenizer)
        out[kind] = ours, AutoTokenizer.from_pretrained(path.parent)
    return out


@pytest.fixture(params=KINDS)
def pair(request, loaded) -> tuple[HFTokenizer, object]:
    return loaded[request.param]


@pytest.mark.parametrize("kind, want", [("llama3", "bytelevel"), ("llama2", "sentencepiece")])
def test_kind_ids_and_template(loaded, kind, want):
    ours, theirs = loaded[kind]
    assert ours.kind == want
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, -1)
    assert ours.n_words == len(theirs)
    assert ours.special_tokens == {t.content: i for i, t in theirs.added_tokens_decoder.items() if t.special}
    assert (ours.chat_format, ours.chat_template) == ("template", theirs.chat_template)
    assert ours.stop_ids == {ours.eos_id}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, theirs = pair
    # split_special_tokens: transformers' way to read special-token text as plain text
    assert ours.encode(text, bos=False, eos=False) == theirs.encode(text, add_special_tokens=False,
                                                                    split_special_tokens=True)
    # the file's post-processor adds BOS (and no EOS), as encode(bos=True) does
    assert ours.encode(text, bos=True, eos=False) == theirs.encode(text, split_special_tokens=True)
    assert ours.encode(text, bos=True, eos=True)[-1] == theirs.eos_token_id


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_model())


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_file_encodes_as_meta(loaded, meta, text):
    ours, _ = loaded["llama3"]
    ids = meta.encode(text, bos=True, eos=False)
    assert ours.encode(text, bos=True, eos=False) == ids
    ids.append(meta.eot_id)
    # every prefix, cut characters included: the detokenizer takes decode() for the bytes joined
    assert [ours.decode(ids[:n]) for n in range(len(ids) + 1)] == [meta.decode(ids[:n]) for n in range(len(ids) + 1)]


def test_special_token_text_stays_text(pair):
    ours, theirs = pair
    text = "a <|eot_id|> b <s> c"
    ids = ours.encode(text, bos=False, eos=False)
    assert not set(ids) & set(ours.special_tokens.values())
    parsed = ours.encode_with_special_tokens(text)
    assert parsed == theirs.encode(text, add_special_tokens=False)
    assert set(parsed) & set(ours.special_tokens.values())
    assert ours.encode(text, bos=False, eos=False) == ids  # the setting is back after parsing


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(pair, text):
    ours, theirs = pair
    ids = theirs.encode(text)  # with BOS
    # clean_up_tokenization_spaces would turn " ." into "." (Llama 3's config asks for it); serving
    # never does, so streamed and whole text agree byte for byte
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if len(ids) > 2:
        assert ours.decode(ids[:-1]) == theirs.decode(ids[:-1], clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_token_bytes_join_to_text(pair, text):
    ours, _ = pair
    ids = ours.encode(text, bos=True, eos=True)
    joined = b"".join(ours.token_bytes(i) for i in ids)
    # a sentencepiece-style file puts a space before the first word; its decode drops it
    assert joined == (text if ours.kind == "bytelevel" else " " + text).encode("utf-8")
    assert ours.decode(ids[1:-1]) == text


def test_id_to_piece(pair):
    ours, theirs = pair
    ids = ours.encode("héllo 🙂", bos=False, eos=False)
    if ours.kind == "sentencepiece":
        assert [ours.id_to_piece(i) for i in ids] == theirs.convert_ids_to_tokens(ids)
        assert "<0xF0>" in [ours.id_to_piece(i) for i in ids]  # byte fallback
    else:
        with pytest.raises(NotImplementedError):
            ours.id_to_piece(ids[0])


def test_generation_config_adds_stop_ids(tmp_path):
    path = write_hf_tokenizer(tmp_path, "llama3", chat_template=None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tok = load_tokenizer(path)
    assert (tok.eos_id, tok.stop_ids) == (128009, {128001, 128008, 128009})
    assert tok.chat_format == "llama3"  # no template: Llama 3's own format


def test_bos_and_eos_from_the_vocabulary_or_none(tmp_path):
    path = write_hf_tokenizer(tmp_path / "llama3", "llama3")
    bare = HFTokenizer(path, path.read_bytes(), {})  # a bare tokenizer.json: Llama 3's own names
    assert (bare.bos_id, bare.eos_id) == (128000, 128001)
    path = write_hf_tokenizer(tmp_path / "llama2", "llama2")
    data = path.read_bytes()
    bare = HFTokenizer(path, data, {})
    assert (bare.bos_id, bare.eos_id) == (1, 2)
    none = HFTokenizer(path, data, {"bos_token": None, "eos_token": {"content": "</s>"}})
    assert (none.bos_id, none.eos_id) == (-1, 2)
    assert none.encode("hello", bos=False, eos=True) == [285, 2]
    with pytest.raises(ValueError, match="has no bos_token"):
        none.encode("hello", bos=True, eos=False)
    for wrong in ("<eos>", 7):
        with pytest.raises(ValueError, match=f"eos_token {wrong!r}, which is not a token"):
            HFTokenizer(path, data, {"eos_token": wrong})


def test_legacy_llama2_layout_is_sentencepiece(tmp_path):
    """The Hub's older Llama 2 files: a normalizer does the spaces, no pre-tokenizer."""
    spec = json.loads(write_hf_tokenizer(tmp_path, "llama2").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    tok = HFTokenizer(tmp_path / "tokenizer.json", json.dumps(spec).encode(), {})
    ids = tok.encode("hello world", bos=True, eos=False)
    assert (tok.kind, tok.bos_id, tok.decode(ids)) == ("sentencepiece", 1, "<s> hello world")
    assert b"".join(tok.token_bytes(i) for i in ids) == b" hello world"


def test_unknown_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        HFTokenizer(tmp_path / "tokenizer.json", b'{"model": 3}', {})
    spec = json.loads(write_hf_tokenizer(tmp_path, "llama2").read_text())
    spec["decoder"], spec["pre_tokenizer"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}, None
    with pytest.raises(ValueError, match=r"decodes with \['WordPiece'\]; expected a ByteLevel"):
        HFTokenizer(tmp_path / "tokenizer.json", json.dumps(spec).encode(), {})
