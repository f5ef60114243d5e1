"""``POST /v1/embeddings`` and ``POST /v1/classify``: forward passes that
the backend may batch with their neighbours in the queue."""

from __future__ import annotations

import base64

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..outputs import class_output
from .backend import Job
from .bodies import ClassifyRequest, EmbeddingRequest, Settings, form_value, parse, read_body, read_json
from .errors import BadRequest
from .inputs import image_pixels
from .validation import Validator, item


async def embeddings(request: Request, v: Validator):
    req = parse(EmbeddingRequest, await read_json(request, v.options))
    v.needs("embeddings")
    if req.encoding_format not in ("float", "base64"):
        raise BadRequest(f"encoding_format: expected float or base64, got {req.encoding_format!r}",
                         "encoding_format")
    if req.dimensions is not None and req.dimensions != v.embedding_size:
        raise BadRequest(f"dimensions: not supported: this model's embeddings have {v.embedding_size} dimensions "
                         f"(send that, or leave it out), got {req.dimensions}", "dimensions")
    settings = v.settings(req, "embeddings")
    seqs = await run_in_threadpool(v.sequences, req.input, "embeddings")
    for i, s in enumerate(seqs):
        v.check_plan({"input_ids": torch.tensor([s])}, settings, "embeddings", item("input", req.input, i),
                     outputs=v.model.sentence_pooling.outputs)
    rows, prism = await v.backend.result(Job("embeddings", seqs, settings))
    data = []
    for i, row in enumerate(rows):
        vec = row.to(torch.float32)
        emb = base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode() \
            if req.encoding_format == "base64" else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(len(s) for s in seqs)
    return {"object": "list", "data": data, "model": v.backend.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "prism": prism}


async def classify(request: Request, v: Validator):
    v.needs("classify")
    if v.model.model_type == "vit":
        inputs, settings = await _images(request, v)
    else:
        inputs, settings = await _texts(request, v)
    logits, prism = await v.backend.result(Job("classify", inputs, settings))
    data = [{"index": i, **class_output(v.model.config, row.to(torch.float32))} for i, row in enumerate(logits)]
    return {"object": "list", "data": data, "model": v.backend.name, "prism": prism}


async def _texts(request: Request, v: Validator):
    """A text classifier's request: JSON with ``input``."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(f"image: {v.model.model_type} takes text: send JSON with `input`", "image")
    req = parse(ClassifyRequest, await read_json(request, v.options))
    settings = v.settings(req, "classify")
    inputs = await run_in_threadpool(v.sequences, req.input, "classify")
    for i, s in enumerate(inputs):
        v.check_plan({"input_ids": torch.tensor([s])}, settings, "classify", item("input", req.input, i),
                     outputs=("cls",))
    return inputs, settings


async def _images(request: Request, v: Validator):
    """A ViT's request: multipart/form-data with ``image`` files and settings as text fields."""
    o = v.options
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("image: a ViT takes image files: send multipart/form-data with one or more `image` fields",
                         "image")
    await read_body(request, o)
    form = await request.form(max_files=o.max_inputs, max_fields=o.max_inputs)
    unknown = [k for k in form.keys() if k not in ("image", "model", "cr", "mode", *o.knobs)]
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field", unknown[0])
    files = form.getlist("image")
    if not files:
        raise BadRequest("image: no `image` file in the form", "image")
    fields = {k: form_value(k, val) for k, val in form.multi_items() if k != "image"}
    settings = v.settings(parse(Settings, fields), "classify")
    inputs = []
    for i, f in enumerate(files):
        where = "image" if len(files) == 1 else f"image[{i}]"
        if isinstance(f, str):
            raise BadRequest(f"{where}: expected a file upload, got a text field", where)
        data = await f.read()
        inputs.append(await run_in_threadpool(image_pixels, v.model, data, where, o.max_image_pixels))
    v.check_plan({"pixel_values": inputs[0]}, settings, "classify", outputs=("cls",))
    return inputs, settings
