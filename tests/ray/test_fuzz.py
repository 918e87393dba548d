"""Every route of the running server fuzzed from its own OpenAPI document (schemathesis), against
a replica whose gang of two gloo ranks serves the golden checkpoint: valid requests and mutated
ones (wrong types, out-of-range and huge numbers, unicode, empty lists, missing and unknown
fields, bodies that are not JSON), then a few hostile requests no generator that follows the
document sends. No answer is a 5xx, every error is in OpenAI's shape, every stream is whole, no
request leaves the gang unhealthy, and afterwards the ranks that started are still the ones
serving, every slot is free and greedy tokens are still the golden ones."""
from __future__ import annotations

import copy
import json
import os
import re
import time
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import engine_idle
from tests.ray.serving import golden_args, serving

MODEL = "llama-golden"
EXAMPLES = 25  # generated cases per operation and mode (valid, mutated)
ENGINE_ROUTES = ("/v1/completions", "/v1/chat/completions")

# ---- the document, made fuzzable -------------------------------------------------------------
# Valid cases should be valid and cheap. The served document leaves out rules the server checks
# (deploy/schemas.py's validators, the chat format's order of roles, the vocabulary), so without
# these most valid cases would be 400s that never reach the engine. Mutated cases break them all.

# A case's cost: at most 2 choices of at most 4 tokens per prompt; chat's max_tokens is always
# given (its default is all that fits in max_seq_len).
CAPS = {"n": 2, "max_tokens": 4, "max_completion_tokens": 4}
IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},  # in every vocabulary
       "minItems": 1, "maxItems": 8}
DIALOGS = [["user"], ["system", "user"], ["user", "assistant", "user"], ["system", "user", "assistant", "user"]]
RULES = {  # "field" in every request schema, or "Schema.field"; null stays allowed where it was
    "best_of": {"const": 1},
    "suffix": {"const": ""},
    "top_k": {"type": "integer", "minimum": -1},
    "stop": {"anyOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]{1,2}$"},  # bias: llama.engine.request's bound
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    "continuous_usage_stats": {"const": False},
    "CompletionRequest.prompt": {"anyOf": [{"type": "string"},
                                           {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                                           IDS, {"type": "array", "items": IDS, "minItems": 1, "maxItems": 3}]},
    "DetokenizeRequest.tokens": IDS,
    "messages": {"anyOf": [
        {"type": "array", "minItems": len(roles), "maxItems": len(roles), "prefixItems": [
            {"allOf": [{"$ref": "#/components/schemas/ChatMessage"},
                       {"properties": {"role": {"const": role}, "tool_calls": {"type": "null"},
                                       "tool_call_id": {"type": "null"}}, "required": ["role", "content"]}]}
            for role in roles]}
        for roles in DIALOGS]},
    # The golden model's format is Llama 2's, which has no tools (a 400 that says so).
    "tools": {"type": "null"},
    "tool_choice": {"const": "none"},
}


def fuzzable(doc: dict) -> dict:
    """The served document with every request's `model` fixed to the served id (else nearly every
    case is a 404 before the engine), each case's cost capped (CAPS) and RULES written in. The
    responses' schemas stay as served: the checks hold answers to them."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    bodies = [op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
              for ops in doc["paths"].values() for op in ops.values() if "requestBody" in op]
    for name in _referenced(schemas, list(bodies)):
        props = schemas[name].get("properties", {})
        for key, rule in (RULES | {f"{body}.model": {"const": MODEL} for body in bodies}).items():
            owner, _, field = key.rpartition(".")
            if field in props and owner in ("", name):
                props[field] = {"anyOf": [rule, {"type": "null"}]} if _nullable(props[field]) else rule
        for field, cap in CAPS.items():
            if field in props:
                _integer(props[field])["maximum"] = cap
        if "messages" in props and "max_tokens" in props:  # chat
            props["max_tokens"] = _integer(props["max_tokens"])
            schemas[name]["required"].append("max_tokens")
    return doc


def _referenced(schemas: dict, names: list[str]) -> set[str]:
    """`names` and every schema they refer to, transitively."""
    seen: set[str] = set()
    while names:
        name = names.pop()
        if name not in seen:
            seen.add(name)
            names += [ref.rsplit("/", 1)[1] for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(schemas[name]))]
    return seen


def _nullable(schema: dict) -> bool:
    return {"type": "null"} in schema.get("anyOf", [])


def _integer(schema: dict) -> dict:
    """The integer in `schema` (itself, or its integer alternative when it may be null)."""
    return next(s for s in schema.get("anyOf", [schema]) if s.get("type") == "integer")


def _whole_floats_as_ints(value: object) -> object:
    """JSON Schema's integers include 2.0, and schemathesis sends some so; the server's strict
    integer fields take only 2 (deploy/schemas.py), which no schema can say. Valid cases send 2."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis keeps what it reads of the sources in .hypothesis/ under the working directory,
    even without a database: here, under pytest's temporary directory instead."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def base_url(ray_local):
    with serving(golden_args(MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def ranks_at_start(base_url) -> list[dict]:
    """The gang's ranks once it is ready (it starts in the background after serve.run returns)."""
    deadline = time.monotonic() + 180
    while httpx.get(base_url + "/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    return httpx.get(base_url + "/cluster").json()["ranks"]


@pytest.fixture(scope="module")
def api_schema(base_url, ranks_at_start) -> schemathesis.BaseSchema:
    """The server's own document, made fuzzable, sending to the server."""
    config = schemathesis.Config.from_dict({
        "base-url": base_url,
        "cache": {"enabled": False},  # nothing written into the repository
        "request-timeout": 120,
        "max-stream-events": 100_000,  # whole streams: by default schemathesis leaves after 20 events
        "output": {"sanitization": {"enabled": False}},  # it would print detokenize's `tokens` as [Filtered]
    })
    return schemathesis.openapi.from_dict(fuzzable(httpx.get(base_url + "/openapi.json").json()), config=config)


# ---- checks on every answer -------------------------------------------------------------------


def check_gang(base_url: str, method: str, path: str) -> None:
    """After a request the engine saw, the gang still answers its health check: no request fails
    a rank. Checked first, so that a request that failed the gang is named as the one that did."""
    if method == "POST" and path in ENGINE_ROUTES:
        health = httpx.get(base_url + "/health", timeout=60)
        if health.status_code != 200:
            GANG_FAILED.append(f"{method} {path}")
        assert health.status_code == 200, f"the request left the gang unhealthy: {health.status_code} {health.text}"


def check_answer(method: str, path: str, status: int, content_type: str, content: bytes) -> None:
    """No 5xx; an error is JSON in OpenAI's shape; a stream is whole."""
    assert status < 500, f"{method} {path} answered {status}: {content[:500]!r}"
    if status >= 400:
        body = json.loads(content)
        assert set(body) == {"error"}, f"an error body with keys {sorted(body)}, not just 'error'"
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, f"an error with keys {sorted(err)}"
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"]
        assert all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")), err
    if content_type.startswith("text/event-stream"):
        check_event_stream(path, content.decode())


def check_event_stream(path: str, text: str) -> None:
    """Every event is a chunk of the route's kind, and the stream ends with [DONE]. A request that
    fails after its 200 sends its error as an event instead: a failure here too."""
    events = text.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1]), f"not SSE data events: {text[:300]}"
    *chunks, done = [e.removeprefix("data: ") for e in events[:-1]]
    assert done == "[DONE]", f"the stream ends without [DONE]: {done}"
    kind = "chat.completion.chunk" if path.endswith("chat/completions") else "text_completion"
    for chunk in map(json.loads, chunks):
        assert "error" not in chunk, f"the request failed after its 200: {chunk}"
        assert chunk["object"] == kind, f"a {chunk['object']!r} chunk in a {kind} stream"


def gang_stays_healthy(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    check_gang(case.operation.schema.get_base_url(), case.method.upper(), case.path)


def sound_answer(ctx, response: schemathesis.Response, case: schemathesis.Case) -> None:
    assert not response.stream_cut_short, "the stream was not read to its end"
    check_answer(case.method.upper(), case.path, response.status_code, response.headers.get("content-type", [""])[0],
                 response.content)


# The conformance checks: each answer's status, content type and body are ones the document
# lists for its route (errors as 4XX/5XX in OpenAI's shape, streams as text/event-stream);
# sound_answer checks what a document cannot say.
CHECKS = [gang_stays_healthy, not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, sound_answer]
ANSWERS: Counter[tuple[str, int]] = Counter()  # (operation, status) of every fuzzed answer
GANG_FAILED: list[str] = []  # the requests after which GET /health was not 200


def skip_once_the_gang_failed() -> None:
    """Every request fails once one has failed the gang (until Serve replaces the replica): the
    first failure names the request that did it, and what would follow says nothing more."""
    if GANG_FAILED:
        pytest.skip(f"the gang failed after an earlier {GANG_FAILED[0]} (the first failure shows it)")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "mutated"])
def test_no_request_gets_a_server_error_or_fails_a_rank(api_schema, mode, subtests):
    """EXAMPLES cases per operation of the document, each sent and checked (CHECKS). Seeded from
    the test (derandomize), so every run sends the same cases; not shrunk, because once a request
    has failed the gang every later one fails too, and the first failure is the one to report.
    (schemathesis.pytest.from_fixture would write this loop, but fails on pytest 9.2: it sets the
    node's _nodeid, which pytest no longer has.)"""
    for operation in (result.ok() for result in api_schema.get_all_operations()):
        if mode is GenerationMode.NEGATIVE and not (len(operation.body) or any(operation.iter_parameters())):
            continue  # nothing to mutate (GET /health)

        # Health checks off: they time the generation of large bodies, which are the point, on a
        # busy machine. No database: nothing is written into the repository.
        @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                             phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck),
                             print_blob=False)
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            if mode is GenerationMode.POSITIVE:
                case.body = _whole_floats_as_ints(case.body)
            response = case.call_and_validate(checks=CHECKS)
            ANSWERS[case.operation.label, response.status_code] += 1

        with subtests.test(operation=operation.label):
            skip_once_the_gang_failed()
            fuzz()


# What a generator that follows the document does not send: text that is no Unicode (a lone
# surrogate is valid JSON), JSON that only Python's parser reads (NaN, Infinity, duplicate keys),
# numbers past int64, past int's digit limit or past float32 once logits are divided by them,
# nesting past the parser's recursion limit, bodies that are not JSON, and methods or paths the
# document does not have. The tiniest temperatures come last: a failed gang fails what follows.
HI = b'"model": "llama-golden", "prompt": "hi", "max_tokens": 2, '  # most of a small valid completion
HOSTILE = {
    "lone surrogate prompt": ("POST", "/v1/completions", b'{"model": "llama-golden", "prompt": "\\ud800"}'),
    "lone surrogate in a prompt list": ("POST", "/v1/completions",
                                        b'{"model": "llama-golden", "prompt": ["a", "\\udfff"], "max_tokens": 2}'),
    "lone surrogate chat": ("POST", "/v1/chat/completions",
                            b'{"model": "llama-golden", "messages": [{"role": "user", "content": "\\ud800"}], '
                            b'"max_tokens": 2}'),
    "lone surrogate stop": ("POST", "/v1/completions", b"{" + HI + b'"stop": ["\\ud800"]}'),
    "lone surrogate tokenize": ("POST", "/tokenize", b'{"prompt": "\\ud800"}'),
    "lone surrogate tokenize, special tokens read": ("POST", "/tokenize",
                                                     b'{"prompt": "\\ud800</s>", "add_special_tokens": false}'),
    "NUL text": ("POST", "/v1/completions", b'{"model": "llama-golden", "prompt": "\\u0000", "max_tokens": 2}'),
    "NaN temperature": ("POST", "/v1/completions", b"{" + HI + b'"temperature": NaN}'),
    "NaN bias": ("POST", "/v1/completions", b"{" + HI + b'"logit_bias": {"5": NaN}}'),
    "infinite temperature": ("POST", "/v1/completions", b"{" + HI + b'"temperature": Infinity}'),
    "largest temperature": ("POST", "/v1/completions", b"{" + HI + b'"temperature": 1.7976931348623157e308}'),
    "smallest top_p": ("POST", "/v1/completions", b"{" + HI + b'"top_p": 5e-324}'),
    "top_k past int64": ("POST", "/v1/completions", b"{" + HI + b'"top_k": 9223372036854775808}'),
    "token id past int64": ("POST", "/detokenize", b'{"tokens": [9223372036854775808]}'),
    "5000-digit max_tokens": ("POST", "/v1/completions",
                              b'{"model": "llama-golden", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"),
    "duplicate key": ("POST", "/v1/completions", b"{" + HI + b'"model": 7}'),
    "deep nesting": ("POST", "/v1/completions", b"[" * 100_000),
    "empty body": ("POST", "/v1/chat/completions", b""),
    "not UTF-8": ("POST", "/tokenize", b"\xff\xfe{}"),
    "a method the route lacks": ("DELETE", "/v1/completions", b""),
    "a path the document lacks": ("GET", "/v1/engines", b""),
    "subnormal temperature": ("POST", "/v1/completions", b"{" + HI + b'"temperature": 5e-324}'),
    "float32-overflowing temperature, streamed": ("POST", "/v1/completions",
                                                  b"{" + HI + b'"temperature": 1e-40, "stream": true}'),
}


@pytest.mark.parametrize("method,path,body", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_requests_get_a_client_error_or_an_answer(api_schema, method, path, body):
    skip_once_the_gang_failed()
    base_url = api_schema.get_base_url()
    r = httpx.request(method, base_url + path, content=body, headers={"content-type": "application/json"}, timeout=120)
    check_gang(base_url, method, path)
    check_answer(method, path, r.status_code, r.headers.get("content-type", ""), r.content)


# ---- afterwards -------------------------------------------------------------------------------


def test_every_route_answered_valid_cases(api_schema):
    """The fuzzing reached past validation on every route: at least one 2xx each, so the engine
    and the tokenizer saw generated requests, not only the validators."""
    if not ANSWERS:
        pytest.skip("the fuzz test did not run in this session")
    skip_once_the_gang_failed()
    routes = {result.ok().label for result in api_schema.get_all_operations()}
    answered = {label for (label, status), _ in ANSWERS.items() if 200 <= status < 300}
    assert routes <= answered, f"no case was answered 2xx on {sorted(routes - answered)}: {dict(ANSWERS)}"


def test_the_gang_is_whole_afterwards(base_url, ranks_at_start, golden):
    """Healthy, the same rank processes as before the fuzzing (none failed and was replaced), every
    slot free, nothing cut short or timed out, and greedy tokens still the reference's."""
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    for _ in range(100):  # a request's slot is given back when its stream closes, a moment after its answer
        info = httpx.get(base_url + "/cluster").json()
        engine = info["engine"]
        if engine_idle(engine):
            break
        time.sleep(0.1)
    assert engine_idle(engine), engine
    assert engine["aborted"] == engine["timed_out"] == 0, engine  # every answer was read whole, in time
    assert info["healthy"] and info["ready"] and info["world_size"] == 2
    assert [(r["rank"], r["pid"]) for r in info["ranks"]] == [(r["rank"], r["pid"]) for r in ranks_at_start]
    for r in info["ranks"]:
        os.kill(r["pid"], 0)  # raises ProcessLookupError if the rank's process is gone
    c = golden["completions"]
    resp = httpx.post(base_url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": c["prompts"], "max_tokens": c["max_gen_len"], "temperature": 0,
                            "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda ch: ch["index"])
    assert [ch["token_ids"] for ch in choices] == c["generated_token_ids"]
