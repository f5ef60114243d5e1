"""``POST /v1/completions`` and ``POST /v1/chat/completions``: generations,
answered whole or streamed as server-sent events token by token. A chat is a
completion of the prompt its messages render to (the checkpoint's chat
template), written in the chat shapes (``message``, ``delta``).

Each prompt is one cluster call that generates its ``n`` samples as the rows
of one batch (row b sampled with ``sample_seed(seed, b)``); choice
``p * n + b`` is prompt p's sample b, as the OpenAI API numbers them."""

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
from .bodies import ChatRequest, CompletionRequest, Generation, parse, read_json
from .errors import FIELDS, BadRequest, ServeError, user_error
from .responses import error_body
from .stream import TextStream
from .validation import Validator

_PENALTY = (-2.0, 2.0)  # the OpenAI API's range for presence_penalty and frequency_penalty


class _Generation:
    """One prompt's n samples as their tokens arrive: each one's text (stop
    strings applied), the pieces a stream sends, and whether to go on."""

    def __init__(self, v: Validator, ids: list[int], n: int, first: int, eos: tuple[int, ...], stops: list[str],
                 pieces: asyncio.Queue | None, cancelled: threading.Event):
        self.ids, self.first, self.eos = ids, first, eos
        self.texts = [TextStream(v.model, stops) for _ in range(n)]
        self.ended = [False] * n  # the sample emitted eos
        self.loop = asyncio.get_running_loop()
        self.pieces, self.cancelled = pieces, cancelled

    def on_token(self, t: torch.Tensor) -> bool:
        """Rank 0's request thread, as each step's tokens [n] arrive. False
        ends the generation: every sample's text is complete (a stop string
        or eos), or the client is gone."""
        for b, token in enumerate(t.tolist()):
            if token in self.eos:
                self.ended[b] = True
                continue
            piece = self.texts[b].push(token)
            if piece and self.pieces is not None:
                self.loop.call_soon_threadsafe(self.pieces.put_nowait, (self.first + b, piece))
        return not (all(e or s.stopped for e, s in zip(self.ended, self.texts)) or self.cancelled.is_set())

    def replay(self, new: list[list[int]]) -> None:
        """The tokens of a generation that ran without ``on_token``, step by step."""
        for step in zip(*new):
            self.on_token(torch.tensor(step))

    def choices(self, new: list[list[int]], rest: bool = False) -> list[dict]:
        """Every sample's choice: its whole text, or with ``rest`` what a stream has not sent yet."""
        return [(self.first + b, s.finish() if rest else s.text,
                 "stop" if s.stopped or any(t in self.eos for t in new[b]) else "length")
                for b, s in enumerate(self.texts)]

    def completion_tokens(self, new: list[list[int]]) -> int:
        """Tokens decoded for the samples, each up to its eos (later ones are padding)."""
        return sum(next((i + 1 for i, t in enumerate(row) if t in self.eos), len(row)) for row in new)


def _eos(v: Validator) -> tuple[int, ...]:
    """The checkpoint's end-of-text tokens within the vocabulary: the
    model's (:attr:`PrismModel.eos_ids`, several for Llama 3), else
    config.json's ``eos_token_id`` (GPT-2's)."""
    eos = v.model.eos_ids or (v.model.config.get("eos_token_id"),)
    vocab = int(v.model.config.get("vocab_size") or 0)
    return tuple(t for t in eos if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab)


def _check(req: Generation, v: Validator, max_tokens: int, name: str = "max_tokens") -> list[str]:
    """The request's own limits (the prompts' are checked as they are encoded); returns the stop strings."""
    o = v.options
    if not 1 <= max_tokens <= o.max_tokens:
        raise BadRequest(f"{name}: must be in [1, {o.max_tokens}] (the server's limit), got {max_tokens}", name)
    if not 1 <= req.n <= o.max_inputs:
        raise BadRequest(f"n: must be in [1, {o.max_inputs}] (the server's --max-inputs), got {req.n}", "n")
    if req.logprobs is not None and req.logprobs is not False:  # completions' 0 asks for them too (0 == False)
        raise BadRequest("logprobs: not supported (the cluster returns tokens, not their log-probabilities); "
                         f"send {'false' if isinstance(req.logprobs, bool) else 'null'} or leave it out", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not _PENALTY[0] <= value <= _PENALTY[1]:
            raise BadRequest(f"{name}: must be in [-2, 2], got {value} (accepted and ignored: docs/serve.md)", name)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise BadRequest("stop: up to 4 non-empty strings", "stop")
    return stops


async def completions(request: Request, v: Validator):
    req = parse(CompletionRequest, await read_json(request, v.options))
    v.needs("completions")
    settings = v.settings(req, "completions")
    stops = _check(req, v, req.max_tokens)
    prompts = await run_in_threadpool(v.sequences, req.prompt, "completions", req.max_tokens)
    return await _generate(req, v, settings, stops, prompts, req.max_tokens, _TEXT)


async def chat_completions(request: Request, v: Validator):
    req = parse(ChatRequest, await read_json(request, v.options))
    v.needs("chat/completions")
    settings = v.settings(req, "chat/completions")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise BadRequest("max_completion_tokens: give it or max_tokens (its older name), not both",
                         "max_completion_tokens")
    name = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), 16)
    stops = _check(req, v, max_tokens, name)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    prompt = await run_in_threadpool(v.chat_prompt, messages, max_tokens)  # a template may take a while
    return await _generate(req, v, settings, stops, [prompt], max_tokens, _CHAT)


async def _generate(req: Generation, v: Validator, settings, stops: list[str], prompts: list[list[int]],
                    max_tokens: int, shape: _Shape):
    """Generate for checked prompts: every prompt's n samples, answered whole or streamed in ``shape``."""
    if len(prompts) * req.n > v.options.max_inputs:
        raise BadRequest(f"n: {len(prompts)} prompts x {req.n} samples exceed the server's --max-inputs "
                         f"{v.options.max_inputs}", "n")
    eos = _eos(v)
    options = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_k": req.top_k,
               "top_p": req.top_p, "seed": req.seed, "eos_token_id": eos or None}
    try:
        GenerateOptions(**options)
    except (ValueError, TypeError) as exc:
        raise user_error(exc, FIELDS[shape.endpoint]) from None
    if req.temperature > 0 and req.seed is None:
        options["seed"] = int.from_bytes(uuid.uuid4().bytes[:7], "little")  # sampled: a fresh seed, reported
    for ids in prompts:
        v.check_plan({"input_ids": torch.tensor([ids])}, settings, shape.endpoint)
    head = {"id": f"{shape.prefix}-{uuid.uuid4().hex[:24]}", "object": shape.whole, "created": int(time.time()),
            "model": v.backend.name}
    cancelled = threading.Event()
    pieces = asyncio.Queue() if req.stream else None
    gens = [_Generation(v, ids, req.n, p * req.n, eos, stops, pieces, cancelled) for p, ids in enumerate(prompts)]
    # Tokens come one by one (and decoding can end early) when streaming or watching for a stop string.
    jobs = [Job("completions", [g.ids] * req.n, settings, options,
                on_token=g.on_token if req.stream or stops else None, cancelled=cancelled) for g in gens]
    if not req.stream:
        results = await asyncio.gather(*(v.backend.result(job) for job in jobs))
        for g, job, (new, _) in zip(gens, jobs, results):
            if job.on_token is None:
                g.replay(new)
        choices = [shape.choice(*c) for g, (new, _) in zip(gens, results) for c in g.choices(new)]
        return {**head, "choices": choices, **_tail(gens, results, options["seed"])}
    futures = []
    try:
        for job in jobs:
            futures.append(asyncio.wrap_future(v.backend.submit(job)))  # refused now (503, 429), not inside a 200
    except ServeError:
        cancelled.set()  # the prompts already queued are not run
        raise
    head["object"] = shape.chunk
    return StreamingResponse(_events(gens, head, shape, pieces, asyncio.gather(*futures), options["seed"],
                                     cancelled),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Shape:
    """How an endpoint writes its answers: the id's prefix, the object
    names, and a choice (whole, or a streamed piece)."""

    def __init__(self, endpoint: str, prefix: str, whole: str, chunk: str):
        self.endpoint, self.prefix, self.whole, self.chunk = endpoint, prefix, whole, chunk
        self.chat = endpoint == "chat/completions"

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}

    def piece(self, index: int, text: str, finish_reason: str | None) -> dict:
        if self.chat:  # the last piece of a choice may be empty: OpenAI's final delta is {}
            return {"index": index, "delta": {"content": text} if text or finish_reason is None else {},
                    "logprobs": None, "finish_reason": finish_reason}
        return self.choice(index, text, finish_reason)

    def opening(self, indices: list[int]) -> list[dict]:
        """The stream's first events before any token: a chat names the speaker of each choice."""
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in indices] if self.chat else []


_TEXT = _Shape("completions", "cmpl", "text_completion", "text_completion")
_CHAT = _Shape("chat/completions", "chatcmpl", "chat.completion", "chat.completion.chunk")


def _tail(gens: list[_Generation], results: list, seed: int | None) -> dict:
    """What the last answer carries besides its choices: usage, and the
    cluster call's PRISM stats (a list of them, one per prompt, for several prompts)."""
    prompt = sum(len(g.ids) for g in gens)
    completion = sum(g.completion_tokens(new) for g, (new, _) in zip(gens, results))
    stats = [{**prism, "seed": seed} for _, prism in results]
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "prism": stats[0] if len(stats) == 1 else stats}


def _event(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _events(gens: list[_Generation], head: dict, shape: _Shape, pieces: asyncio.Queue, done: asyncio.Future,
                  seed: int | None, cancelled: threading.Event):
    """The stream: (for a chat, each choice's role first) an event per piece
    of a sample's text as its tokens arrive, then the last one (every
    sample's rest of the text and finish reason, usage, prism) or an error
    event, then [DONE]."""
    try:
        opening = shape.opening([g.first + b for g in gens for b in range(len(g.texts))])
        if opening:
            yield _event({**head, "choices": opening})
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if pieces.empty():
                    break
                continue
            index, piece = getter.result()
            yield _event({**head, "choices": [shape.piece(index, piece, None)]})
        try:
            results = done.result()
        except ServeError as exc:
            yield _event(error_body(exc))
            return
        choices = [shape.piece(*c) for g, (new, _) in zip(gens, results) for c in g.choices(new, rest=True)]
        yield _event({**head, "choices": choices, **_tail(gens, results, seed)})
        yield b"data: [DONE]\n\n"
    finally:
        cancelled.set()  # a client gone mid-stream: the cluster stops generating for it
