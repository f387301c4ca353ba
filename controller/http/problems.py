"""Controller errors as HTTP: a status code and an ``application/problem+json`` body (RFC 9457).

The body carries the controller's error ``code`` (protocol/errors.py :class:`ErrorCode`, the
same a refused MQTT request carries), so a client switches on the code, never the message.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from tether.controller.service import StandbyError
from tether.protocol import codec
from tether.protocol.errors import CommandError, ErrorCode, TetherError

PROBLEM_TYPE = "application/problem+json"

STATUS_OF_CODE: dict[str, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.INTERNAL: 500,
    ErrorCode.FORBIDDEN: 403,
}
"""The HTTP status of each error code (an unknown code: 400)."""

CODE_OF_STATUS: dict[int, str] = {
    401: "unauthenticated",
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: "method_not_allowed",
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
    415: ErrorCode.INVALID,
    422: ErrorCode.INVALID,
    503: "unavailable",
}


class Problem(BaseModel):
    """An error (RFC 9457 problem details) with the controller's error ``code``."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    """The controller's error code (invalid, not_found, conflict, too_large, forbidden,
    internal) or the HTTP layer's (unauthenticated, unavailable, method_not_allowed)."""


class Unavailable(TetherError):
    """The controller cannot do this now (a standby asked for a write; shutting down): 503."""


class StillRunning(TetherError):
    """What was waited for has not happened in time: 504."""


def problem(status: int, detail: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    from http import HTTPStatus

    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = Problem(title=title, status=status, detail=detail, code=code)
    return JSONResponse(body.model_dump(), status_code=status, media_type=PROBLEM_TYPE, headers=headers)


def error_response(exc: BaseException) -> JSONResponse:
    """The problem answer for an error a command raised (or a validation error of its model)."""
    if isinstance(exc, Unavailable | StandbyError):
        return problem(503, str(exc), "unavailable")
    if isinstance(exc, StillRunning):
        return problem(504, str(exc), "timeout")
    if isinstance(exc, ValidationError):
        return problem(422, f"invalid request: {codec.describe(exc)}", ErrorCode.INVALID)
    if isinstance(exc, CommandError):
        return problem(STATUS_OF_CODE.get(exc.code, 400), str(exc), exc.code)
    if isinstance(exc, TetherError):  # a refusal that is not a CommandError: a bad request
        return problem(400, str(exc), ErrorCode.INVALID)
    return problem(500, f"internal error: {exc.__class__.__name__}: {exc}", ErrorCode.INTERNAL)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def http_exception(request: Request, exc: Exception) -> Response:
    """HTTPException: a problem under /api/, plain text elsewhere (as the health server always did)."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers) if exc.headers else None
    if not _is_api(request):
        text = "not found\n" if exc.status_code == 404 else f"{exc.detail}\n"
        return PlainTextResponse(text, status_code=exc.status_code, headers=headers)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return problem(exc.status_code, detail, CODE_OF_STATUS.get(exc.status_code, "error"), headers)


async def command_exception(request: Request, exc: Exception) -> Response:
    """A TetherError a command raised, or a ValidationError of its model."""
    return error_response(exc)


async def validation_exception(request: Request, exc: Exception) -> Response:
    """A request that does not fit its route's parameters or body model: 422 with every problem."""
    assert isinstance(exc, RequestValidationError)
    problems: list[str] = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg")))
    return problem(422, "invalid request: " + "; ".join(problems), ErrorCode.INVALID)


RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_TYPE: {}}, "description": description}
    for status, description in (
        (400, "The request is invalid (code invalid)"),
        (401, "No or wrong credentials (code unauthenticated)"),
        (403, "The caller's role does not allow it (code forbidden)"),
        (404, "It names something the controller does not have (code not_found)"),
        (409, "It clashes with the current state (code conflict)"),
        (413, "The answer or the request is too large (code too_large)"),
        (415, "The body is not of a media type the route takes (code invalid)"),
        (422, "The request does not fit the model (code invalid)"),
        (503, "A standby controller: writes go to the leader (code unavailable)"),
        (504, "Waited for (wait_s) in vain: it still runs (code timeout)"),
    )
}
"""The error answers every /api route may give, for the OpenAPI document."""
