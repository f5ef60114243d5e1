"""The HTTP face of the domain errors: each error class's status code and
OpenAI error type, and the body ``{"error": {"message", "type", "param",
"code"}}`` that OpenAI clients turn into their matching exception."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .errors import (BadRequest, BodyTimeout, NotAllowed, NotFound, QueueFull, ServeError, ServerFault, TooLarge,
                     Unauthorized, Unavailable)

# error class -> (HTTP status, OpenAI error type, code: a string, as the OpenAI API's codes are)
STATUS = {
    BadRequest: (400, "invalid_request_error", "invalid_value"),
    Unauthorized: (401, "authentication_error", "invalid_api_key"),
    NotFound: (404, "not_found_error", "not_found"),
    NotAllowed: (405, "invalid_request_error", "method_not_allowed"),
    BodyTimeout: (408, "invalid_request_error", "request_timeout"),
    TooLarge: (413, "invalid_request_error", "request_too_large"),
    QueueFull: (429, "rate_limit_error", "rate_limit_exceeded"),
    ServerFault: (500, "server_error", "server_error"),
    Unavailable: (503, "service_unavailable", "service_unavailable"),
}


def status_of(exc: ServeError) -> tuple[int, str, str]:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return STATUS[ServerFault]


def error_body(exc: ServeError) -> dict:
    status, kind, code = status_of(exc)
    if isinstance(exc, NotFound) and exc.param == "model":
        code = "model_not_found"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": code}}


def error_response(exc: ServeError, headers: dict | None = None) -> JSONResponse:
    status = status_of(exc)[0]
    headers = dict(headers or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(error_body(exc), status_code=status, headers=headers or None)
