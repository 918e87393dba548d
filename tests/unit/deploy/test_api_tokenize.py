"""vLLM's POST /tokenize and POST /detokenize (deploy/tokenization.py) against the fake engine of
test_api.py, which they never call: a text's or a chat's tokens as the generation routes encode
them, the round trip back to text, and the 404 and 400s."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient
from test_api import MAX_SEQ_LEN, MODEL, FakeEngine, engine, error_of, http, tok  # noqa: F401 (fixtures)

from llama.tokenizers.base import Tokenizer
from llama.tokenizers.chat_format import encode_dialog

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


def test_tokenize_text_as_completions_encodes_it(http: TestClient, engine: FakeEngine, tok: Tokenizer) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})
    assert r.status_code == 200, r.text
    want = tok.encode("hello world", bos=True, eos=False)
    assert r.json() == {"tokens": want, "count": len(want), "max_model_len": MAX_SEQ_LEN}
    http.post("/v1/completions", json={"model": MODEL, "prompt": "hello world"})
    assert list(engine.streamed[0].prompt_tokens) == want  # the tokens the engine is sent
    r = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})  # model may be left out
    assert r.json()["tokens"] == want[1:] and want[0] == tok.bos_id


def test_tokenize_a_chat_as_chat_completions_encodes_it(http: TestClient, engine: FakeEngine, tok: Tokenizer) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == encode_dialog(tok, CHAT) and r.json()["count"] == len(encode_dialog(tok, CHAT))
    http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert list(engine.streamed[0].prompt_tokens) == r.json()["tokens"]


@pytest.mark.parametrize("text", ["hello world", "hi, x!", ""])
def test_detokenize_gives_the_text_back(http: TestClient, engine: FakeEngine, text: str) -> None:
    for special in (True, False):
        tokens = http.post("/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": special}).json()
        r = http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})
        assert r.status_code == 200 and r.json() == {"prompt": text}
    assert engine.calls == []


@pytest.mark.parametrize("path, body, status, param, message", [
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model",
     "The model `gpt-4` does not exist; this server serves `tiny-llama`."),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model", None),
    ("/detokenize", {"tokens": [1, 320]}, 400, "tokens", "tokens has token id 320; this model's ids are 0..319."),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "tokens has token id -1; this model's ids are 0..319."),
    ("/detokenize", {"tokens": ["1"]}, 400, "tokens[0]", None),
    ("/detokenize", {}, 400, "tokens", "Missing required parameter: 'tokens'."),
    ("/tokenize", {"model": MODEL}, 400, "prompt", None),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, 400, "prompt",
     "Send either prompt (text) or messages (a chat) to tokenize, not both and not neither."),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages", None),
    ("/tokenize", {"prompt": [1, 2]}, 400, "prompt", None),
    ("/tokenize", {"prompt": "hi", "truncate": True}, 400, "truncate",
     "Unrecognized request argument supplied: truncate."),
])
def test_tokenize_errors(http: TestClient, engine: FakeEngine, path: str, body: dict, status: int, param: str,
                         message: str | None) -> None:
    err = error_of(http.post(path, json=body), status)
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    if message is not None:
        assert err["message"] == message
    assert engine.calls == []


def test_without_special_tokens_special_text_is_read_as_those_tokens_as_vllm_does(http: TestClient,
                                                                                   tok: Tokenizer) -> None:
    """lm-eval's remote tokenizer takes the EOS and BOS ids from tokenizing their text this way."""
    for text, want in (("</s>", [tok.eos_id]), ("<s>", [tok.bos_id]),
                       ("hi</s>x", tok.encode("hi", bos=False, eos=False) + [tok.eos_id] + tok.encode("x", bos=False, eos=False))):
        assert http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"] == want
    # With them (the default), the text is read as /v1/completions reads a prompt: "</s>" stays text.
    r = http.post("/tokenize", json={"prompt": "</s>"}).json()["tokens"]
    assert r == tok.encode("</s>", bos=True, eos=False) and tok.eos_id not in r


def test_tokenizer_info_names_bos_and_eos_as_vllm_does(http: TestClient, tok: Tokenizer) -> None:
    r = http.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    assert r.json() == {"tokenizer_class": "SentencePieceTokenizer", "bos_token": "<s>", "bos_token_id": tok.bos_id,
                        "eos_token": "</s>", "eos_token_id": tok.eos_id, "pad_token": None, "chat_template": None,
                        "model_max_length": MAX_SEQ_LEN}
