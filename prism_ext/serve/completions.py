"""``POST /v1/completions``: generations, answered whole or streamed as
server-sent events token by token.

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
from .bodies import CompletionRequest, parse, read_json
from .errors import FIELDS, BadRequest, ServeError, user_error
from .responses import error_body
from .stream import TextStream
from .validation import Validator

_PENALTY = (-2.0, 2.0)  # the OpenAI API's range for presence_penalty and frequency_penalty


class _Generation:
    """One prompt's n samples as their tokens arrive: each one's text (stop
    strings applied), the pieces a stream sends, and whether to go on."""

    def __init__(self, v: Validator, ids: list[int], n: int, first: int, eos: int | None, stops: list[str],
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
            if self.eos is not None and token == self.eos:
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
        return [_choice(self.first + b, s.finish() if rest else s.text,
                        "stop" if s.stopped or self.eos in new[b] else "length")
                for b, s in enumerate(self.texts)]

    def completion_tokens(self, new: list[list[int]]) -> int:
        """Tokens decoded for the samples, each up to its eos (later ones are padding)."""
        return sum(row.index(self.eos) + 1 if self.eos in row else len(row) for row in new)


def _eos(v: Validator) -> int | None:
    """The checkpoint's end-of-text token, if it names one within the vocabulary."""
    eos = v.model.config.get("eos_token_id")
    return eos if isinstance(eos, int) and 0 <= eos < int(v.model.config.get("vocab_size") or 0) else None


def _check(req: CompletionRequest, v: Validator) -> list[str]:
    """The request's own limits (the prompts' are checked as they are encoded); returns the stop strings."""
    o = v.options
    if not 1 <= req.max_tokens <= o.max_tokens:
        raise BadRequest(f"max_tokens: must be in [1, {o.max_tokens}] (the server's limit), got {req.max_tokens}",
                         "max_tokens")
    if not 1 <= req.n <= o.max_inputs:
        raise BadRequest(f"n: must be in [1, {o.max_inputs}] (the server's --max-inputs), got {req.n}", "n")
    if req.logprobs is not None:
        raise BadRequest("logprobs: not supported (the cluster returns tokens, not their log-probabilities); "
                         "send null or leave it out", "logprobs")
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
    stops = _check(req, v)
    prompts = await run_in_threadpool(v.sequences, req.prompt, "completions", req.max_tokens)
    if len(prompts) * req.n > v.options.max_inputs:
        raise BadRequest(f"n: {len(prompts)} prompts x {req.n} samples exceed the server's --max-inputs "
                         f"{v.options.max_inputs}", "n")
    eos = _eos(v)
    options = {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_k": req.top_k,
               "top_p": req.top_p, "seed": req.seed, "eos_token_id": eos}
    try:
        GenerateOptions(**options)
    except (ValueError, TypeError) as exc:
        raise user_error(exc, FIELDS["completions"]) from None
    if req.temperature > 0 and req.seed is None:
        options["seed"] = int.from_bytes(uuid.uuid4().bytes[:7], "little")  # sampled: a fresh seed, reported
    for ids in prompts:
        v.check_plan({"input_ids": torch.tensor([ids])}, settings, "completions")
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
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
        choices = [c for g, (new, _) in zip(gens, results) for c in g.choices(new)]
        return {**head, "choices": choices, **_tail(gens, results, options["seed"])}
    futures = []
    try:
        for job in jobs:
            futures.append(asyncio.wrap_future(v.backend.submit(job)))  # refused now (503, 429), not inside a 200
    except ServeError:
        cancelled.set()  # the prompts already queued are not run
        raise
    return StreamingResponse(_events(gens, head, pieces, asyncio.gather(*futures), options["seed"], cancelled),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


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


async def _events(gens: list[_Generation], head: dict, pieces: asyncio.Queue, done: asyncio.Future,
                  seed: int | None, cancelled: threading.Event):
    """The stream: an event per piece of a sample's text as its tokens
    arrive, then the last one (every sample's rest of the text and finish
    reason, usage, prism) or an error event, then [DONE]."""
    try:
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if pieces.empty():
                    break
                continue
            index, piece = getter.result()
            yield _event({**head, "choices": [_choice(index, piece, None)]})
        try:
            results = done.result()
        except ServeError as exc:
            yield _event(error_body(exc))
            return
        choices = [c for g, (new, _) in zip(gens, results) for c in g.choices(new, rest=True)]
        yield _event({**head, "choices": choices, **_tail(gens, results, seed)})
        yield b"data: [DONE]\n\n"
    finally:
        cancelled.set()  # a client gone mid-stream: the cluster stops generating for it
