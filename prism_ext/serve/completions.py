"""``POST /v1/completions``: a generation, answered whole or streamed as
server-sent events token by token."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..method.engine import GenerateOptions
from .backend import Job
from .bodies import CompletionRequest, parse, read_json
from .errors import FIELDS, BadRequest, ServeError, user_error
from .responses import error_body
from .stream import TextStream
from .validation import Validator


class _Generation:
    """One completion's tokens as they arrive: its text (stop strings
    applied), the pieces a stream sends, and whether to go on."""

    def __init__(self, v: Validator, req: CompletionRequest, ids: list[int], eos: int | None, stops: list[str],
                 seed: int | None):
        self.req, self.ids, self.eos, self.seed = req, ids, eos, seed
        self.text = TextStream(v.model, stops)
        self.loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # set when the client is gone

    def on_token(self, t: torch.Tensor) -> bool:
        """Rank 0's request thread, as each token arrives. False ends the
        generation: its text is complete (a stop string), or its client is gone."""
        token = int(t[0])
        if self.eos is None or token != self.eos:
            piece = self.text.push(token)
            if piece and self.req.stream:
                self.loop.call_soon_threadsafe(self.pieces.put_nowait, piece)
        return not (self.text.stopped or self.cancelled.is_set())

    def finish_reason(self, new: list[int]) -> str:
        return "stop" if self.text.stopped or (self.eos is not None and new and new[-1] == self.eos) else "length"

    def tail(self, new: list[int], prism: dict) -> dict:
        """What the last answer carries besides its choices."""
        return {"usage": {"prompt_tokens": len(self.ids), "completion_tokens": len(new),
                          "total_tokens": len(self.ids) + len(new)},
                "prism": {**prism, "seed": self.seed}}


def _eos(v: Validator) -> int | None:
    """The checkpoint's end-of-text token, if it names one within the vocabulary."""
    eos = v.model.config.get("eos_token_id")
    return eos if isinstance(eos, int) and 0 <= eos < int(v.model.config.get("vocab_size") or 0) else None


async def completions(request: Request, v: Validator):
    o = v.options
    req = parse(CompletionRequest, await read_json(request, o))
    v.needs("completions")
    settings = v.settings(req, "completions")
    if not 1 <= req.max_tokens <= o.max_tokens:
        raise BadRequest(f"max_tokens: must be in [1, {o.max_tokens}] (the server's limit), got {req.max_tokens}",
                         "max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise BadRequest("stop: up to 4 non-empty strings", "stop")
    ids = (await run_in_threadpool(v.texts, req.prompt, "completions", req.max_tokens))[0]
    eos = _eos(v)
    options = {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_k": req.top_k,
               "seed": req.seed, "eos_token_id": eos}
    try:
        GenerateOptions(**options)
    except (ValueError, TypeError) as exc:
        raise user_error(exc, FIELDS["completions"]) from None
    if req.temperature > 0 and req.seed is None:
        options["seed"] = int.from_bytes(uuid.uuid4().bytes[:7], "little")  # sampled: a fresh seed, reported
    v.check_plan({"input_ids": torch.tensor([ids])}, settings, "completions")
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": v.backend.name}
    gen = _Generation(v, req, ids, eos, stops, options["seed"])
    # Tokens come one by one (and decoding can end early) when streaming or watching for a stop string.
    job = Job("completions", [ids], settings, options, on_token=gen.on_token if req.stream or stops else None,
              cancelled=gen.cancelled)
    if not req.stream:
        new, prism = await v.backend.result(job)
        if job.on_token is None:
            for t in new:
                gen.on_token(torch.tensor([t]))
        return {**head, "choices": [_choice(gen.text.text, gen.finish_reason(new))], **gen.tail(new, prism)}
    future = v.backend.submit(job)  # refused now (503, 429) rather than inside a 200 stream
    return StreamingResponse(_events(gen, head, asyncio.wrap_future(future)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _event(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _events(gen: _Generation, head: dict, done: asyncio.Future):
    """The stream: an event per piece of text as its tokens arrive, then the
    last (the rest of the text, usage, prism) or an error event, then [DONE]."""
    try:
        while True:
            getter = asyncio.ensure_future(gen.pieces.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if gen.pieces.empty():
                    break
                continue
            yield _event({**head, "choices": [_choice(getter.result(), None)]})
        try:
            new, prism = done.result()
        except ServeError as exc:
            yield _event(error_body(exc))
            return
        yield _event({**head, "choices": [_choice(gen.text.finish(), gen.finish_reason(new))], **gen.tail(new, prism)})
        yield b"data: [DONE]\n\n"
    finally:
        gen.cancelled.set()  # a client gone mid-stream: the cluster stops generating for it
