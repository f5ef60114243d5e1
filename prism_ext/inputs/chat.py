"""Chat templates: a checkpoint's own Jinja template that turns a list of
messages into the prompt text its model was trained on, rendered as
transformers' ``tokenizer.apply_chat_template`` renders it (the same Jinja
environment, filters and variables), so a conversation reaches the model as
it would through transformers.

The template is read from the checkpoint folder as transformers reads it: a
``chat_template.jinja`` file, else ``tokenizer_config.json``'s
``chat_template`` (a string, or a list of named templates, of which the one
named ``default`` is used)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

__all__ = ["read_chat_template", "render_chat", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or could not render them."""


def read_chat_template(directory) -> str | None:
    """The chat template of a checkpoint folder, or None when it has none."""
    if directory is None:
        return None
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():  # transformers: a template file takes priority over tokenizer_config.json
        return jinja.read_text(encoding="utf-8")
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"tokenizer_config.json: {path} is not a JSON object ({exc})") from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"chat_template: {path} names templates {sorted(map(str, named))} but none 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template: {path} holds a {type(template).__name__}, not a template string")
    return template or None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The template in transformers' environment: sandboxed (templates come
    with checkpoints, so they are untrusted code), trim_blocks and
    lstrip_blocks, loop controls, and its globals and tojson filter."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat_template: rendering a chat needs jinja2 (pip install 'prism-ext[serve]' or "
                          "'prism-ext[gguf]', or jinja2 itself)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own: jinja's default escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat_template: not a valid Jinja template (line {exc.lineno}: {exc.message})") \
            from None


def render_chat(template: str, messages: list[dict], special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True) -> str:
    """``messages`` ([{"role", "content"}, ...]) as the prompt text of
    ``template``, with the tokenizer's special tokens (``bos_token``,
    ``eos_token``, ...) as variables, as ``apply_chat_template(messages,
    tokenize=False, add_generation_prompt=...)`` gives it. A template that
    refuses the messages raises :class:`ChatTemplateError` with its message."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(**(special_tokens or {}), messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"messages: {exc.message or type(exc).__name__}") from None
    except (TypeError, ValueError, LookupError) as exc:  # e.g. the template adds a str to a missing field
        raise ChatTemplateError(f"messages: the chat template cannot render them ({type(exc).__name__}: {exc})") \
            from None
