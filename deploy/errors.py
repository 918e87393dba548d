"""Where exceptions become HTTP responses, in OpenAI's error shape, for the whole HTTP layer.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

A caller's mistake (APIError, a request that fails validation, any ValueError, including one
the engine raises through Ray) is a 4xx that says what to change; a failed gang (ClusterError)
is a 503, which clients retry, and so is a request a draining replica refuses or ends
(DrainingError); a request the engine stopped (finish_reason "timeout" or "abort") is a 504 or
503; anything else is a 500. Failures are logged here, and a 500 never
quotes an exception's text, which may contain the prompt. Nothing a caller sends makes an
exception leave the app. A stream that fails after its first byte sends the same body as one
server-sent event (deploy/sse.py).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cluster.errors import ClusterError, DrainingError, GangStartingError, OverloadedError

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
INTERNAL = "internal_error"
UNAVAILABLE = "service_unavailable_error"
TIMEOUT = "timeout_error"
RATE_LIMIT = "rate_limit_error"
RETRY_AFTER_S = 5  # what a 503 (model starting) or a 429 (replica full) asks clients to wait
DRAIN_RETRY_AFTER_S = 1  # a draining replica's 503: the other replicas (or its replacement) can serve now


@dataclass(eq=False)  # an exception compares and hashes by identity
class APIError(Exception):
    """A request we refuse, with the status and the OpenAI error fields to send back."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = INVALID_REQUEST
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type, param, code), headers=headers)


def user_message(e: BaseException) -> str:
    """The text of a caller-facing error. Ray re-raises a remote ValueError as a class that is
    both RayTaskError and ValueError, whose str() is a whole remote traceback; the original
    exception is on .cause, and its text is what the caller needs."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e)


def as_api_error(e: BaseException, where: str) -> APIError:
    """Any exception as the error its caller gets; `where` ("POST /v1/completions") goes to the
    log when the failure is the server's."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # a caller's mistake, ours or the engine's to detect
        return APIError(400, user_message(e))
    if isinstance(e, OverloadedError):  # not a failure: the replica is full
        return APIError(429, f"The server is busy: {e} Retry after a few seconds.", type=RATE_LIMIT,
                        code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, DrainingError):  # not a failure: Serve is stopping this replica
        return APIError(503, f"The server is shutting down: {e}", type=UNAVAILABLE, code="replica_draining",
                        headers={"Retry-After": str(DRAIN_RETRY_AFTER_S)})
    if isinstance(e, GangStartingError):  # not a failure: the model is loading
        return APIError(503, f"The model is still starting ({e.progress['stage']}, stage {e.progress['stage_number']} "
                             f"of {e.progress['stages']}). Retry shortly; GET /health says when it is ready.",
                        type=UNAVAILABLE, code="model_starting", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ClusterError):
        logger.error("%s: the gang failed: %s", where, e)
        return APIError(503, f"The model's workers failed ({type(e).__name__}); this replica will be replaced. "
                             f"Retry shortly.", type=UNAVAILABLE)
    # The traceback goes to the log for the operator; the caller gets the type name only, since
    # an exception's text may quote the prompt.
    logger.error("%s failed", where, exc_info=e)
    return APIError(500, f"The server had an error while processing your request ({type(e).__name__}). "
                         f"The operator can find the traceback in the server log.", type=INTERNAL)


def unfinished_error(finish_reason: str) -> APIError:
    """The error for a request the engine ended without finishing it (see llama.engine.request.FinishReason)."""
    if finish_reason == "timeout":
        return APIError(504, "The request took longer than this server's request timeout and was stopped. Lower "
                             "max_tokens (or n), or ask the operator to raise request_timeout_s.", type=TIMEOUT)
    assert finish_reason == "abort", f"not an unfinished request: finish_reason {finish_reason!r}"
    return APIError(503, "The request was cancelled in the engine before it finished (the replica may be shutting "
                         "down). Retry shortly.", type=UNAVAILABLE)


# ---- request validation (pydantic) ----------------------------------------------------------


def _path(loc: Sequence[str | int]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:]:  # loc[0] is 'body'
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's error list -> (message, param) for the first problem, worded like OpenAI's."""
    if not errors:
        return "Invalid request.", None
    err = errors[0]
    kind, loc = err.get("type", ""), tuple(err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"We could not parse the JSON body of your request ({detail}). Send a JSON object.", None
    path = _path(loc)
    if not path and kind == "missing":
        message = "The request body is empty: send a JSON object with the request's parameters."
    elif not path:
        message = f"The request body must be a JSON object with the request's parameters: {msg}."
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {path}."
    elif kind == "missing":
        message = f"Missing required parameter: '{path}'."
    else:
        message = f"Invalid value for '{path}': {msg}."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) in this request.)"
    return message, path or None


# ---- wiring ---------------------------------------------------------------------------------


class OpenAIRoute(APIRoute):
    """A route whose endpoint never lets an exception out: without this, Starlette answers an
    unhandled exception with plain text and then re-raises it into the server."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, RequestValidationError, StarletteHTTPException):
                raise  # the handlers installed below answer these
            except Exception as e:
                return as_api_error(e, f"{request.method} {request.url.path}").response()

        return guarded


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, APIError)
    return e.response()


async def _validation_error(request: Request, e: Exception) -> Response:
    # FastAPI would answer 422 with its own shape; OpenAI clients expect 400 and "error".
    assert isinstance(e, RequestValidationError)
    message, param = validation_message(e.errors())
    return error_response(400, message, param=param)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, StarletteHTTPException)
    if e.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})."
    elif e.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = str(e.detail)
    return error_response(e.status_code, message, headers=getattr(e, "headers", None))


async def _unhandled(request: Request, e: Exception) -> Response:
    # Last resort for failures outside a route (middleware, a streamed body); OpenAIRoute catches the rest.
    if isinstance(e, ClientDisconnect):  # not a failure: no one is left to answer
        logger.info("%s %s: the client went away", request.method, request.url.path)
        return Response(status_code=499)  # nginx's "client closed request"; never sent
    return as_api_error(e, f"{request.method} {request.url.path}").response()


def install_error_handlers(app: FastAPI) -> None:
    app.router.route_class = OpenAIRoute
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
