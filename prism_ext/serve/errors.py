"""The server's domain errors. The backend and the request checks raise
these; only the HTTP layer (:mod:`prism_ext.serve.app`) turns them into
status codes and bodies.

Every message starts with the request field it is about (``param``), so a
client can tell which value to change."""

from __future__ import annotations

import re


class ServeError(Exception):
    """A request the server does not answer as asked. ``retry_after``:
    seconds after which trying again may succeed (None: it will not)."""

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.retry_after = message, param, retry_after


class BadRequest(ServeError):
    """The request is wrong: a field's type or value, or an input the model cannot take."""


class Unauthorized(ServeError):
    """No valid API key."""


class NotFound(ServeError):
    """No such endpoint, or a model not served here."""


class NotAllowed(ServeError):
    """The endpoint exists but not with this method."""


class BodyTimeout(ServeError):
    """The request body did not arrive in time."""


class TooLarge(ServeError):
    """The request body is over the server's limit."""


class QueueFull(ServeError):
    """Too many requests are waiting; try again shortly."""


class Unavailable(ServeError):
    """The cluster cannot serve now (lost a rank, forming again, shutting down)."""


class ServerFault(ServeError):
    """Not the client's doing: a bug, or a checkpoint the server cannot use."""


def unavailable(reason: str) -> Unavailable:
    return Unavailable(f"cluster unavailable: {reason}; the server is forming it again, retry shortly",
                       retry_after=2)


# Engine argument names -> request fields, per endpoint (for errors that name the field).
_INPUT = {"input_ids": "input", "inputs": "input", "text": "input", "devices": "input", "attention_mask": "input",
          "pixel_values": "image", "image": "image"}
FIELDS = {"completions": {**_INPUT, "input": "prompt", "input_ids": "prompt", "inputs": "prompt", "text": "prompt",
                          "devices": "prompt", "max_new_tokens": "max_tokens"},
          "embeddings": _INPUT, "classify": _INPUT}
FIELDS["chat/completions"] = {k: "messages" if v == "prompt" else v for k, v in FIELDS["completions"].items()}

_LEADING_NAME = re.compile(r"^([A-Za-z_][\w.\[\]]*):")


def user_error(exc: Exception, rename: dict[str, str]) -> BadRequest:
    """A prism_ext ValueError/TypeError ("name: what is wrong") as a bad
    request naming the request field (``rename`` maps engine names to fields,
    e.g. :data:`FIELDS` of the endpoint)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = _LEADING_NAME.match(message)
    name = m.group(1) if m else None
    param = rename.get(name, name)
    if m and param != name:
        message = f"{param}: {message[m.end():].strip()}"
    return BadRequest(message, param)
