"""API keys: where a replica's keys come from, and the check every request but GET /health passes.

Keys come from deploy/config.yaml's `api_keys` and from the environment variable `api_keys_env`
names, read once as the replica starts; none configured leaves every route open. The check is
an ASGI middleware in front of the whole app (streams pass through it untouched): a request
without `Authorization: Bearer <a valid key>` gets OpenAI's 401. No key is ever logged or quoted.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from deploy.errors import error_response

logger = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({("GET", "/health")})  # load balancers probe it without a key

# OpenAI's wording where it has one; unlike OpenAI's, no message quotes any part of the key sent.
MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
               "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). Ask this server's operator for a key.")
NOT_BEARER = ("The Authorization header must use Bearer auth: `Authorization: Bearer YOUR_KEY` (the word Bearer, "
              "a space, then the key).")
EMPTY_KEY = "The Authorization header says Bearer but carries no key: send `Authorization: Bearer YOUR_KEY`."
WRONG_KEY = ("Incorrect API key provided. Send a key this server accepts as `Authorization: Bearer YOUR_KEY`; "
             "ask this server's operator for one.")


def check_key(key: str, where: str) -> None:
    """Refuse a key no client could send in a header. The message names where the key is
    (`api_keys[1]`), never the key."""
    if not key:
        raise ValueError(f"{where} is empty: an API key needs at least one character.")
    if not all("!" <= c <= "~" for c in key):
        raise ValueError(f"{where} has whitespace or a character outside printable ASCII. An API key travels in "
                         f"an HTTP header (Authorization: Bearer KEY): use letters, digits and punctuation only. "
                         f"(The key itself is not shown.)")


class ApiKeys:
    """The keys one replica accepts, held as SHA-256 digests: equal-length values to compare in
    constant time, which say nothing of the keys or their lengths."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(dict.fromkeys(hashlib.sha256(k.encode()).digest() for k in keys))

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys(n={len(self)})"

    def accepts(self, key: bytes) -> bool:
        digest = hashlib.sha256(key).digest()
        found = False
        for d in self._digests:  # every key, matched or not: the time taken does not say which matched
            found |= hmac.compare_digest(d, digest)
        return found


@dataclass(frozen=True)
class ApiKeySource:
    """Where a replica finds its keys (AppArgs.api_key_source): those written in the YAML, and
    those in the environment variable `env`, which only the replica reads, once, in load()."""

    keys: tuple[SecretStr, ...] = ()  # SecretStr: a log of this object (its repr) shows no key
    env: str | None = None

    def load(self, environ: Mapping[str, str] = os.environ) -> ApiKeys:
        from_env = [] if self.env is None else _keys_from_env(self.env, environ)
        keys = ApiKeys([k.get_secret_value() for k in self.keys] + from_env)
        if keys:
            env = "" if self.env is None else f" and {len(from_env)} from ${self.env}"
            logger.info("requests need an API key: %d accepted (%d from args%s)", len(keys), len(self.keys), env)
        else:
            logger.info("no API keys configured: every route is open to whoever reaches the HTTP port")
        return keys


def _keys_from_env(name: str, environ: Mapping[str, str]) -> list[str]:
    """The comma-separated keys in $name; spaces around commas and empty items are ignored."""
    raw = environ.get(name)
    keys = [k.strip() for k in (raw or "").split(",") if k.strip()]
    if not keys:
        raise ValueError(
            f"deploy/config.yaml's api_keys_env names the environment variable {name}, but it is "
            f"{'unset' if raw is None else 'empty'} in this replica's process (node {platform.node()}). Ray workers "
            f"inherit the environment of `ray start` on their node (or of `serve run` when it starts Ray itself): "
            f"export {name}=KEY1,KEY2 there on every node that may run a replica and restart Ray, or remove "
            f"api_keys_env to serve without it.")
    for i, key in enumerate(keys):
        check_key(key, f"key {i} of ${name}")
    return keys


def require_api_keys(app: FastAPI, keys: ApiKeys) -> None:
    """Make every request but OPEN_ROUTES carry one of `keys`; no keys: nothing changes."""
    if keys:
        app.add_middleware(RequireApiKey, keys=keys)


class RequireApiKey:
    """A pure ASGI middleware: it reads the request's headers only, and passes the body and the
    response (a server-sent event stream too) through as they come."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        open_route = scope["type"] == "http" and (scope["method"], _route_path(scope)) in OPEN_ROUTES
        if scope["type"] == "lifespan" or open_route:
            await self.app(scope, receive, send)
            return
        # The first Authorization header, as Starlette's request.headers would give it.
        refusal = self.refusal(next((v for k, v in scope["headers"] if k == b"authorization"), None))
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await error_response(401, refusal, code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        else:  # a websocket: refused before it is accepted (the server answers 403)
            await send({"type": "websocket.close", "code": 1008})

    def refusal(self, authorization: bytes | None) -> str | None:
        """What is wrong with an Authorization header's value, or None if it carries a valid key."""
        if authorization is None:
            return MISSING_KEY
        scheme, _, key = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return NOT_BEARER
        key = key.strip(b" \t")
        if not key:
            return EMPTY_KEY
        return None if self.keys.accepts(key) else WRONG_KEY


def _route_path(scope: Scope) -> str:
    """The path the app routes on: Serve gives a route_prefix as root_path and keeps it in path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path
