"""The FastAPI application: routes onto the request handlers, the API key,
metrics per request, and every error as an OpenAI-shaped JSON body."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .._version import __version__
from .backend import Backend
from .completions import chat_completions, completions
from .encoders import classify, embeddings
from .errors import NotAllowed, NotFound, ServeError, ServerFault, Unauthorized
from .responses import error_response
from .validation import Validator

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/models", "/health", "/metrics"}


def create_app(backend: Backend) -> FastAPI:
    """The FastAPI application over ``backend`` (closing the app drains it)."""
    v = Validator(backend)
    app = FastAPI(title="prism serve", version=__version__,
                  description="PRISM distributed Transformer inference over a live cluster (docs/serve.md)")
    app.router.add_event_handler("shutdown", backend.close)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        return await _guarded(request, call_next, backend)

    app.add_exception_handler(ServeError, lambda request, exc: error_response(exc))
    app.add_exception_handler(Exception, _bug)
    app.add_exception_handler(404, _no_endpoint)
    app.add_exception_handler(405, _wrong_method)

    @app.get("/health")
    async def _health():
        return await health(backend)

    @app.get("/metrics")
    async def _metrics():
        content, media_type = backend.metrics.text()
        return Response(content, media_type=media_type)

    @app.get("/v1/models")
    async def _models():
        return models(v)

    @app.post("/v1/completions")
    async def _completions(request: Request):
        return await completions(request, v)

    @app.post("/v1/chat/completions")
    async def _chat_completions(request: Request):
        return await chat_completions(request, v)

    @app.post("/v1/embeddings")
    async def _embeddings(request: Request):
        return await embeddings(request, v)

    @app.post("/v1/classify")
    async def _classify(request: Request):
        return await classify(request, v)

    return app


async def _guarded(request: Request, call_next, backend: Backend):
    """Every request: the API key (all but /health), then the handler; its
    status counted and its latency timed to the last byte."""
    o, metrics = backend.options, backend.metrics
    t0 = time.monotonic()
    path = request.url.path
    endpoint = path if path in ROUTES else "other"
    if o.api_key is not None and path != "/health" and not _auth_ok(request, o.api_key):
        response = error_response(
            Unauthorized("Authorization: a valid bearer token is required (Authorization: Bearer KEY)",
                         "Authorization"), headers={"WWW-Authenticate": "Bearer"})
    else:
        try:
            response = await call_next(request)
        except ServeError as exc:
            response = error_response(exc)
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    body = getattr(response, "body_iterator", None)
    if body is None:
        metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
        return response

    async def timed():  # to the last byte (a stream's last event), once
        try:
            async for chunk in body:
                yield chunk
        finally:
            metrics.latency.labels(endpoint).observe(time.monotonic() - t0)

    response.body_iterator = timed()
    return response


def _auth_ok(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def _bug(request: Request, exc: Exception):  # still JSON, with its type
    return error_response(ServerFault(f"server: {type(exc).__name__}: {exc}"))


async def _no_endpoint(request: Request, exc):
    return error_response(NotFound(f"path: no endpoint {request.url.path} (see /v1/models, docs/serve.md)", "path"))


async def _wrong_method(request: Request, exc):
    return error_response(NotAllowed(f"method: {request.method} is not allowed on {request.url.path}", "method"))


async def health(backend: Backend) -> JSONResponse:
    """200 while every rank is alive, else 503 with the reason."""
    state = await asyncio.get_running_loop().run_in_executor(None, backend.health)
    return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)


def models(v: Validator) -> dict:
    """The served model, its endpoints, defaults and limits."""
    backend, o, net = v.backend, v.options, v.net
    return {"object": "list", "data": [{
        "id": backend.name, "object": "model", "created": 0, "owned_by": "prism-ext",
        "prism": {"model_type": v.model.model_type, "head": net.head, "layers": len(net.blocks), "d": net.d,
                  "n_positions": net.n_positions, "devices": backend.devices, "endpoints": v.served(),
                  "defaults": {"cr": o.cr, "mode": o.mode},
                  "limits": {"max_cr": o.max_cr, "modes": list(o.modes), "knobs": list(o.knobs),
                             "max_tokens": o.max_tokens, "max_inputs": o.max_inputs, "max_batch": o.max_batch,
                             "max_body_bytes": o.max_body, "max_queue": o.max_queue}}}]}
