"""The HTTP face of the domain errors: each error class's status code and
OpenAI error type, and the body ``{"error": {"message", "type", "param",
"code"}}`` that OpenAI clients turn into their matching exception."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .errors import (BadRequest, BodyTimeout, NotAllowed, NotFound, QueueFull, ServeError, ServerFault, TooLarge,
                     Unauthorized, Unavailable)

# error class -> (HTTP status, OpenAI error type)
STATUS = {
    BadRequest: (400, "invalid_request_error"),
    Unauthorized: (401, "authentication_error"),
    NotFound: (404, "not_found_error"),
    NotAllowed: (405, "invalid_request_error"),
    BodyTimeout: (408, "invalid_request_error"),
    TooLarge: (413, "invalid_request_error"),
    QueueFull: (429, "rate_limit_error"),
    ServerFault: (500, "server_error"),
    Unavailable: (503, "service_unavailable"),
}


def status_of(exc: ServeError) -> tuple[int, str]:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return STATUS[ServerFault]


def error_body(exc: ServeError) -> dict:
    status, kind = status_of(exc)
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": status}}


def error_response(exc: ServeError, headers: dict | None = None) -> JSONResponse:
    status, _ = status_of(exc)
    headers = dict(headers or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(error_body(exc), status_code=status, headers=headers or None)
