"""Where exceptions become HTTP responses, in OpenAI's error shape, for the whole HTTP layer.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

A caller's mistake (APIError, a request that fails validation, any ValueError, including one
the engine raises through Ray) is a 4xx that says what to change; a failed gang (ClusterError)
is a 503, which clients retry; anything else is a 500. Failures are logged here, and a
500 never quotes an exception's text, which may contain the prompt. Nothing a caller sends
makes an exception leave the app.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import ClusterError

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
INTERNAL = "internal_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    """A request we refuse, with the status and the OpenAI error fields to send back."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(
    status: int,
    message: str,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def user_message(e: BaseException) -> str:
    """The text of a caller-facing error. Ray re-raises a remote ValueError as a class that is
    both RayTaskError and ValueError, whose str() is a whole remote traceback; the original
    exception is on .cause, and its text is what the caller needs."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e)


def cluster_error(e: ClusterError, request: Request) -> JSONResponse:
    logger.error("%s %s: the gang failed: %s", request.method, request.url.path, e)
    return error_response(
        503,
        f"The model's workers failed ({type(e).__name__}); this replica will be replaced. Retry shortly.",
        UNAVAILABLE,
    )


def internal_error(e: BaseException, request: Request) -> JSONResponse:
    # The traceback goes to the log for the operator; the caller gets the type name only, since
    # an exception's text may quote the prompt.
    logger.error("%s %s failed", request.method, request.url.path, exc_info=e)
    return error_response(
        500,
        f"The server had an error while processing your request ({type(e).__name__}). "
        f"The operator can find the traceback in the server log.",
        INTERNAL,
    )


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
            except ValueError as e:  # a caller's mistake, ours or the engine's to detect
                return error_response(400, user_message(e))
            except ClusterError as e:
                return cluster_error(e, request)
            except Exception as e:
                return internal_error(e, request)

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
    # Last resort for failures outside a route (middleware); OpenAIRoute catches the rest.
    return internal_error(e, request)


def install_error_handlers(app: FastAPI) -> None:
    app.router.route_class = OpenAIRoute
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
