"""Request bodies: read off the connection within the operator's limits,
parsed as JSON and validated into pydantic models whose errors name the
field."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pydantic
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from .errors import BadRequest, BodyTimeout, TooLarge
from .options import ServeOptions


class Settings(pydantic.BaseModel):
    """The fields every inference request may carry besides its input; other
    fields are knobs (checked against the operator's list) or errors."""

    model_config = pydantic.ConfigDict(extra="allow", strict=True)
    model: str | None = None
    cr: int | list[int] | None = None
    mode: str | None = None


# A text, texts, one sequence of token ids, or sequences of them (the OpenAI API's input forms).
Inputs = str | list[str] | list[int] | list[list[int]]


class Generation(Settings):
    """The sampling fields of both generation endpoints."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    # Accepted and ignored, as llama.cpp's server documents its ignored fields (docs/serve.md)
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class CompletionRequest(Generation):
    prompt: Inputs
    max_tokens: int = 16
    logprobs: int | None = None  # refused unless null: the cluster does not send log-probabilities back


class Message(pydantic.BaseModel):
    """One chat message: text content only (no images, tool calls or content parts)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # handed to the template, which may use it


class ChatRequest(Generation):
    messages: list[Message] = pydantic.Field(min_length=1)
    max_tokens: int | None = None  # the older name of max_completion_tokens; 16 when neither is given
    max_completion_tokens: int | None = None
    logprobs: bool | None = None  # refused when true, as for completions


class EmbeddingRequest(Settings):
    input: Inputs
    encoding_format: str = "float"
    dimensions: int | None = None  # only the model's own size: embeddings are not truncated
    user: str | None = None  # accepted and ignored (docs/serve.md)


class ClassifyRequest(Settings):
    input: str | list[str]


def parse(kind: type[Settings], body) -> Settings:
    """A JSON body as ``kind``; the first error names its field (``input[1]`` for an item of a list)."""
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object", "body")
    try:
        return kind.model_validate(body)
    except pydantic.ValidationError as exc:
        # the most specific error: a union's member with an index (input[1]) over the union as a whole
        err = max(exc.errors(), key=lambda e: sum(isinstance(i, int) for i in e.get("loc") or ()))
        loc = err.get("loc") or ()
        param = str(loc[0]) if loc else "body"
        # an index as [i]; a name right after an index is a field of a list item (messages[1].role), while
        # other names are the union member pydantic tried (prompt -> list[str] -> 1), left out
        param += "".join(f"[{i}]" if isinstance(i, int) else f".{i}" if isinstance(prev, int) else ""
                         for prev, i in zip(loc, loc[1:]))
        raise BadRequest(f"{param}: {err.get('msg', 'invalid')}", param) from None


def form_value(name: str, value):
    """A form field's text as the JSON value it stands for (cr=4 -> 4)."""
    if not isinstance(value, str):
        raise BadRequest(f"{name}: expected a text field, got a file", name)
    try:
        return json.loads(value)
    except ValueError:
        return value


def _json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest("body: JSON nested too deeply", "body") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body: not valid JSON ({exc})", "body") from None


async def read_json(request: Request, o: ServeOptions):
    return await run_in_threadpool(_json, await read_body(request, o))  # a 1 MiB body: off the event loop


async def read_body(request: Request, o: ServeOptions) -> bytes:
    """The body, as read: at most ``max_body`` bytes whatever the framing
    (Content-Length, chunked, or both), within ``body_timeout`` seconds."""
    limit = o.max_body
    length = request.headers.get("content-length")
    if length is not None:  # announced too big: refused before reading (chunked framing is counted below)
        if not length.isdigit():
            raise BadRequest(f"Content-Length: not a number: {length!r}", "Content-Length")
        if int(length) > limit:
            raise TooLarge(f"body: {length} bytes exceed the server's limit of {limit}", "body")
    body = bytearray()
    try:
        async with asyncio.timeout(o.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise TooLarge(f"body: more than the server's limit of {limit} bytes", "body")
    except TimeoutError:
        raise BodyTimeout(f"body: not received within {o.body_timeout:g} s (the server's limit)", "body") from None
    except ClientDisconnect:
        raise BadRequest("body: the client disconnected while sending it", "body") from None
    request._body = bytes(body)  # Starlette's cache of the body: request.form() parses these bytes
    return request._body
