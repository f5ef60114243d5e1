"""A request checked against the served model and the operator's limits
before it queues: its settings, its inputs and every check the cluster call
would make. Errors are :class:`~prism_ext.serve.errors.BadRequest` (and
kin) naming the request field."""

from __future__ import annotations

import warnings

from ..executor.request import plan
from ..options import RunOptions
from .backend import Backend
from .bodies import Settings
from .errors import FIELDS, BadRequest, NotFound, ServerFault, user_error
from .inputs import encode_text
from .options import KNOBS

ENDPOINTS = ("completions", "chat/completions", "embeddings", "classify")
GENERATION = ("completions", "chat/completions")  # the endpoints that generate text
_INPUT_FIELD = {"completions": "prompt", "chat/completions": "messages"}  # the others': input


def single(value) -> bool:
    """Whether a field's value is one input: a text, or one sequence of token ids."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(x, int) for x in value))


def item(field_name: str, value, i: int) -> str:
    """How errors name item ``i`` of a field that holds one input or a list of them."""
    return field_name if single(value) else f"{field_name}[{i}]"


class Validator:
    """The checks of every request to ``backend``'s model."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.options = backend.options
        self.model = backend.model
        self.net = backend.model.net

    def settings(self, req: Settings, endpoint: str) -> RunOptions:
        """cr, mode and knobs of a request, within the operator's limits."""
        o, name = self.options, self.backend.name
        if req.model is not None and req.model != name:
            raise NotFound(f"model: {req.model!r} is not served here (this server serves {name!r})", "model")
        cr = o.cr if req.cr is None else req.cr
        crs = cr if isinstance(cr, list) else [cr]
        if not crs or any(not 1 <= c <= o.max_cr for c in crs):
            raise BadRequest(f"cr: every value must be in [1, {o.max_cr}] (the server's limit), got {cr}", "cr")
        mode = o.mode if req.mode is None else req.mode
        if mode not in o.modes:
            raise BadRequest(f"mode: expected one of {', '.join(o.modes)} (allowed by the server), got {mode!r}",
                             "mode")
        knobs = {}
        for key, value in (req.model_extra or {}).items():
            if key not in KNOBS:
                raise BadRequest(f"{key}: unknown field", key)
            if key not in o.knobs:
                raise BadRequest(f"{key}: the server does not let requests set this knob "
                                 f"(allowed: {', '.join(o.knobs) or 'none'})", key)
            knobs[key] = value
        if endpoint in GENERATION and mode not in ("prism", "single"):
            raise BadRequest(f"mode: generation runs in prism or single mode, not {mode!r}", "mode")
        try:
            return RunOptions(cr=cr, mode=mode, **knobs)
        except (ValueError, TypeError) as exc:
            raise user_error(exc, FIELDS[endpoint]) from None

    def check_plan(self, inputs: dict, settings: RunOptions, endpoint: str, where: str | None = None,
                   outputs=None) -> None:
        """Every check the cluster call would make, before the request queues
        (``where``: the input's field, ``input[1]`` for an item of a list)."""
        devices = 1 if settings.mode == "single" else self.backend.devices
        rename = FIELDS[endpoint] if where is None else {**FIELDS[endpoint],
                                                        **{k: where for k, v in FIELDS[endpoint].items()
                                                           if v in ("input", "prompt")}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # coarse-partition warnings: the stats show the partition
                plan(self.net, inputs, settings if outputs is None else settings.replace(outputs=outputs),
                     devices=devices, special_ids=self.model.special_ids)
        except (ValueError, TypeError) as exc:
            raise user_error(exc, rename) from None

    def sequences(self, value, endpoint: str, room: int = 0) -> list[list[int]]:
        """A field's inputs (a text, texts, token ids or lists of them) ->
        token id lists, each within the vocabulary and the model's positions
        (with ``room`` for the tokens to generate)."""
        field_name = _INPUT_FIELD.get(endpoint, "input")
        items = [value] if single(value) else value
        if not items:
            raise BadRequest(f"{field_name}: must not be empty", field_name)
        if len(items) > self.options.max_inputs:
            raise BadRequest(f"{field_name}: {len(items)} inputs exceed the server's limit of "
                             f"{self.options.max_inputs}", field_name)
        out = []
        for i, x in enumerate(items):
            where = item(field_name, value, i)
            ids = self._token_ids(x, where) if isinstance(x, list) else self._encode(x, where)
            limit = self.net.n_positions
            if len(ids) > limit:
                raise BadRequest(f"{where}: {len(ids)} tokens exceed the model's {limit} positions", where)
            if len(ids) + room > limit:
                raise BadRequest(f"max_tokens: {len(ids)} prompt tokens + {room} new tokens exceed the model's "
                                 f"{limit} positions; ask for at most {limit - len(ids)}", "max_tokens")
            if not ids:
                raise BadRequest(f"{where}: encodes to no tokens", where)
            out.append(ids)
        return out

    def chat_prompt(self, messages: list[dict], room: int) -> list[int]:
        """Chat messages -> the token ids of the prompt the model's template
        renders for them (ready for the assistant's answer), within the
        model's positions with ``room`` for the tokens to generate."""
        from ..inputs.chat import ChatTemplateError

        try:
            text = self.model.apply_chat_template(messages)
        except ChatTemplateError as exc:  # the template refused them: its message, naming messages
            raise BadRequest(str(exc), "messages") from None
        if not text:
            raise BadRequest("messages: the chat template renders them as no text", "messages")
        # the template writes the special tokens itself, as transformers' apply_chat_template(tokenize=True) encodes
        return self.sequences(self._encode(text, "messages", add_special_tokens=False), "chat/completions", room)[0]

    def _encode(self, text: str, where: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise BadRequest(f"{where}: must be a non-empty string", where)
        try:
            return encode_text(self.model, text, add_special_tokens)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"{where}: {exc}", where) from None
        except (OSError, ImportError) as exc:  # the checkpoint has no usable tokenizer: not the client's fault
            raise ServerFault(f"model: cannot encode text: {exc}", "model") from None

    def _token_ids(self, ids: list[int], where: str) -> list[int]:
        """Token ids as the client sent them (used as they are: no special tokens added)."""
        if not ids:
            raise BadRequest(f"{where}: must not be an empty list of token ids", where)
        vocab = int(self.model.config.get("vocab_size") or 0)
        for j, t in enumerate(ids):
            if not 0 <= t < vocab:
                raise BadRequest(f"{where}: token id {t} at position {j} is outside the vocabulary [0, {vocab})",
                                 where)
        return ids

    def needs(self, endpoint: str) -> None:
        """The model can serve ``endpoint``, else a bad request naming ``model``."""
        m, name = self.model, self.backend.name
        if endpoint in GENERATION and self.net.head != "lm":
            raise BadRequest(f"model: /v1/{endpoint} needs a language model; {name!r} is "
                             f"{m.model_type} ({self.net.head} head)", "model")
        if endpoint == "chat/completions":
            try:
                template = m.chat_template
            except ValueError as exc:
                raise BadRequest(f"model: {name!r}'s chat template cannot be read: {exc}", "model") from None
            if template is None:
                raise BadRequest(f"model: {name!r} has no chat template (no chat_template in its "
                                 f"tokenizer_config.json, no chat_template.jinja), so messages cannot be rendered; "
                                 f"send the prompt text to /v1/completions instead", "model")
        if endpoint == "embeddings" and m.model_type == "vit":
            raise BadRequest(f"model: /v1/embeddings takes text; {name!r} is a ViT (use /v1/classify "
                             f"with an image)", "model")
        if endpoint == "embeddings":
            try:
                m.sentence_pooling
            except ValueError as exc:
                raise BadRequest(f"model: /v1/embeddings cannot follow {name!r}'s pipeline: {exc}", "model") from None
        if endpoint == "classify" and self.net.head != "classification":
            raise BadRequest(f"model: /v1/classify needs a classification head; {name!r} is "
                             f"{m.model_type} ({self.net.head} head)", "model")

    @property
    def embedding_size(self) -> int:
        """The length of this model's embeddings (the pooling modes concatenated)."""
        return self.net.d * len(self.model.sentence_pooling.modes)

    def served(self) -> list[str]:
        """The endpoints the model serves."""
        out = []
        for endpoint in ENDPOINTS:
            try:
                self.needs(endpoint)
            except BadRequest:
                continue
            out.append(endpoint)
        return out
