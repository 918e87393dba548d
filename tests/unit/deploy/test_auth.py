"""API keys (deploy/auth.py) in front of the HTTP layer of test_api.py and its fake engine: OpenAI's
401 for each bad Authorization header on every route, every key accepted, GET /health and a
keyless server open, streams passed through; keys read from the environment once, and never
logged or quoted. AppArgs' own key settings are tested in test_config.py."""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_api import MAX_SEQ_LEN, MODEL, FakeEngine, engine, error_of, tok  # noqa: F401 (fixtures)

from deploy.api import build_api
from deploy.auth import EMPTY_KEY, MISSING_KEY, NOT_BEARER, WRONG_KEY, ApiKeys, ApiKeySource, require_api_keys
from llama.tokenizers.base import Tokenizer

KEYS = ("sk-first-0123456789abcdef", "second.Key_~+/=")
ENV = "LLAMA_API_KEYS"

ROUTES = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 3}),
    ("POST", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    ("GET", "/v1/models", None),
    ("GET", "/cluster", None),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _ in ROUTES]

# The Authorization header sent (None: none) -> the message of the 401 it gets.
BAD_HEADERS = {
    "missing": (None, MISSING_KEY),
    "empty header": ("", NOT_BEARER),
    "no scheme": (KEYS[0], NOT_BEARER),
    "basic auth": ("Basic " + base64.b64encode(f":{KEYS[0]}".encode()).decode(), NOT_BEARER),
    "token scheme": (f"Token {KEYS[0]}", NOT_BEARER),
    "bearer alone": ("Bearer", EMPTY_KEY),
    "bearer and spaces": ("Bearer   ", EMPTY_KEY),
    "wrong key": ("Bearer sk-not-a-key-9876", WRONG_KEY),
    "a key's prefix": (f"Bearer {KEYS[0][:-1]}", WRONG_KEY),
    "a key and more": (f"Bearer {KEYS[0]}x", WRONG_KEY),
    "two keys in one": (f"Bearer {KEYS[0]},{KEYS[1]}", WRONG_KEY),
    "a key in another's case": (f"Bearer {KEYS[0].upper()}", WRONG_KEY),
}


def keyed_app(engine: FakeEngine, tok: Tokenizer, keys: ApiKeys) -> Any:
    """The app as LlamaDeployment.__serve_build_asgi_app__ builds it."""
    app = build_api(engine, tok, MODEL, MAX_SEQ_LEN)
    require_api_keys(app, keys)
    return app


@pytest.fixture
def keyed(engine: FakeEngine, tok: Tokenizer) -> Iterator[TestClient]:
    with TestClient(keyed_app(engine, tok, ApiKeys(KEYS))) as client:
        yield client


def call(client: TestClient, method: str, path: str, body: dict | None, authorization: str | None = None) -> Any:
    headers = {} if authorization is None else {"Authorization": authorization}
    return client.request(method, path, json=body, headers=headers)


# ---- refused --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_HEADERS)
@pytest.mark.parametrize("method,path,body", ROUTES, ids=ROUTE_IDS)
def test_a_bad_authorization_gets_openais_401(keyed: TestClient, engine: FakeEngine, method: str, path: str,
                                              body: dict | None, case: str) -> None:
    authorization, message = BAD_HEADERS[case]
    r = call(keyed, method, path, body, authorization)
    assert error_of(r, 401) == {"message": message, "type": "invalid_request_error", "param": None,
                                "code": "invalid_api_key"}
    assert r.headers["www-authenticate"] == "Bearer"
    for secret in (*KEYS, "sk-not-a-key-9876", KEYS[0][:-1], KEYS[0].upper()):
        assert secret not in r.text  # neither the key sent nor a valid one is quoted, even in part
    assert engine.calls == []  # refused before the route: the engine never ran


def test_only_get_health_is_open(keyed: TestClient) -> None:
    assert keyed.get("/health").json() == {"status": "ok"}
    assert keyed.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 200
    error_of(keyed.post("/health"), 401)  # only GET: another method is not a probe
    error_of(keyed.get("/health/"), 401)
    error_of(keyed.get("/no-such-route"), 401)  # a 404 would tell a stranger which routes exist
    error_of(keyed.get("/docs"), 401)


def test_a_websocket_without_a_key_is_closed_before_it_opens(keyed: TestClient) -> None:
    with pytest.raises(WebSocketDisconnect) as e, keyed.websocket_connect("/v1/ws"):
        pass
    assert e.value.code == 1008  # policy violation; the app itself has no websocket routes (it would close with 1000)


def test_health_stays_open_under_a_route_prefix(engine: FakeEngine, tok: Tokenizer) -> None:
    # Serve passes a route_prefix as root_path and keeps it in path.
    with TestClient(keyed_app(engine, tok, ApiKeys(KEYS)), root_path="/llama") as client:
        assert client.get("/llama/health").status_code == 200
        error_of(client.get("/llama/v1/models"), 401)
        assert client.get("/llama/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200


# ---- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method,path,body", ROUTES, ids=ROUTE_IDS)
def test_each_key_opens_every_route(keyed: TestClient, method: str, path: str, body: dict | None, key: str) -> None:
    r = call(keyed, method, path, body, f"Bearer {key}")
    assert r.status_code == 200, r.text
    assert call(keyed, method, path, body, f"bearer  {key}").status_code == 200  # the scheme's case is free


def test_a_stream_with_a_key(keyed: TestClient) -> None:
    body = {"model": MODEL, "prompt": "hello world", "stream": True}
    r = keyed.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "hello world"


def test_a_stream_passes_through_event_by_event(engine: FakeEngine, tok: Tokenizer) -> None:
    """Driven as a server drives the app: the middleware sends each event as the route makes it,
    never the whole body at once."""
    app = keyed_app(engine, tok, ApiKeys(KEYS))
    request = json.dumps({"model": MODEL, "prompt": "hello world", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", f"Bearer {KEYS[0]}".encode()), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    received, sent = [], []

    async def receive() -> dict:
        if not received:
            received.append(True)
            return {"type": "http.request", "body": request, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m for m in sent[1:] if m["body"]]
    assert len(bodies) == 11 and all(m["body"].startswith(b"data: ") for m in bodies)  # 10 chunks and [DONE]


def test_the_openai_client_with_a_key(keyed: TestClient) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEYS[1], http_client=keyed, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.completions.create(model=MODEL, prompt="hello", max_tokens=3).choices[0].text == "hel"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_openai_client_with_a_wrong_key(keyed: TestClient) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-wrong", http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.completions.create(model=MODEL, prompt="hello")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and e.value.type == "invalid_request_error"
    assert e.value.message == f"Error code: 401 - {WRONG_KEY}"  # the client found the shape it knows
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_without_keys_every_route_is_open(engine: FakeEngine, tok: Tokenizer) -> None:
    app = keyed_app(engine, tok, ApiKeySource().load())
    assert app.user_middleware == []  # nothing installed: the app as before API keys
    with TestClient(app) as client:
        for method, path, body in ROUTES:
            assert call(client, method, path, body).status_code == 200, path
            assert call(client, method, path, body, "Bearer anything").status_code == 200, path


# ---- the comparison and the logs ------------------------------------------------------------


@pytest.mark.parametrize("authorization", [f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}", "Bearer sk-wrong"])
def test_a_key_is_compared_with_every_key_in_constant_time(keyed: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                           authorization: str) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    keyed.get("/v1/models", headers={"Authorization": authorization})
    # Every key, even after the first matched; equal-length digests, so not even a length differs.
    assert len(calls) == len(KEYS) and all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)


def test_no_key_reaches_the_log(keyed: TestClient, caplog: pytest.LogCaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(ENV, "sk-from-the-env-1")
    ApiKeySource((SecretStr(KEYS[0]),), ENV).load()
    for authorization in (f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}", "Bearer sk-wrong-key-2", KEYS[0]):
        call(keyed, "POST", *ROUTES[0][1:], authorization)
    assert "requests need an API key: 2 accepted (1 from args and 1 from $LLAMA_API_KEYS)" in caplog.text
    for secret in (*KEYS, "sk-from-the-env-1", "sk-wrong-key-2"):
        assert secret not in caplog.text


def test_keys_repr_shows_no_key() -> None:
    source = ApiKeySource(tuple(SecretStr(k) for k in KEYS), ENV)
    loaded = ApiKeys(KEYS)
    for text in (repr(source), str(source), repr(loaded), str(loaded)):
        assert not any(k in text for k in KEYS), text
    assert repr(loaded) == "ApiKeys(n=2)"


# ---- loading: the YAML's keys and the environment's -----------------------------------------


def test_the_environment_adds_to_the_yamls_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, " sk-env-1 , sk-env-2,,")  # spaces around commas and empty items ignored
    keys = ApiKeySource((SecretStr(KEYS[0]),), ENV).load()
    assert len(keys) == 3
    assert all(keys.accepts(k.encode()) for k in (KEYS[0], "sk-env-1", "sk-env-2"))
    assert not keys.accepts(b" sk-env-1 ") and not keys.accepts(KEYS[1].encode())
    monkeypatch.setenv(ENV, "sk-env-3")  # read once: a later change reaches no loaded replica
    assert keys.accepts(b"sk-env-1") and not keys.accepts(b"sk-env-3")
    assert len(ApiKeySource((SecretStr("k"), SecretStr("k")), None).load()) == 1


def test_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "sk-only")
    keys = ApiKeySource(env=ENV).load()
    assert len(keys) == 1 and keys.accepts(b"sk-only")


@pytest.mark.parametrize("value,state", [(None, "unset"), ("", "empty"), (" , ,", "empty")])
def test_a_named_variable_unset_or_empty_refuses_the_start(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                                           state: str) -> None:
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"api_keys_env names the environment variable {ENV}, but it is {state} in "
                                         f"this replica's process") as e:
        ApiKeySource((SecretStr(KEYS[0]),), ENV).load()
    assert f"export {ENV}=KEY1,KEY2" in str(e.value) and "`ray start`" in str(e.value)  # the fix
    assert KEYS[0] not in str(e.value)


@pytest.mark.parametrize("value", ["sk-good,sk-bad key", "sk-good,sk-bad\tkey", "sk-good,sk-bäd"])
def test_a_bad_key_in_the_variable_is_refused_unquoted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=r"key 1 of \$LLAMA_API_KEYS has whitespace or a character outside") as e:
        ApiKeySource(env=ENV).load()
    assert "sk-good" not in str(e.value) and "sk-b" not in str(e.value)


# ---- the wiring: build_app -> LlamaDeployment -> the app ------------------------------------


def test_build_app_hands_the_key_source_to_the_replica_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.app import build_app

    monkeypatch.delenv(ENV, raising=False)  # build_app runs where `serve run` does: the variable is not read there
    app = build_app({"api_keys": [KEYS[0]], "api_keys_env": ENV})
    _, _, source = app._bound_deployment.init_args  # Serve's private handle on .bind(...)'s arguments
    assert source == ApiKeySource((SecretStr(KEYS[0]),), ENV)


def test_the_replica_loads_its_keys_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy.server as server

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(server, "get_current_placement_group", lambda: pytest.fail("the gang started before the keys"))
    replica_class = server.LlamaDeployment.func_or_class.__mro__[1]  # the class under @serve.ingress's wrapper
    with pytest.raises(ValueError, match=ENV):
        replica_class.__init__(SimpleNamespace(), None, MODEL, ApiKeySource(env=ENV))


def test_the_replica_builds_its_app_with_the_keys(engine: FakeEngine, tok: Tokenizer) -> None:
    import deploy.server as server

    replica = SimpleNamespace(group=engine, tokenizer=tok, model_id=MODEL, api_keys=ApiKeys(KEYS),
                              gang=SimpleNamespace(engine=SimpleNamespace(max_seq_len=MAX_SEQ_LEN)))
    app = server.LlamaDeployment.func_or_class.__mro__[1].__serve_build_asgi_app__(replica)
    with TestClient(app) as client:
        error_of(client.get("/v1/models"), 401)
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
        assert client.get("/health").status_code == 200
