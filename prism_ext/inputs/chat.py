"""Chat templates: a checkpoint's Jinja template (tokenizer_config.json,
chat_template.jinja, a GGUF's ``tokenizer.chat_template``) rendered as
transformers renders it: jinja2's immutable sandbox (a template is untrusted
code), ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` that does not escape HTML, ``raise_exception`` and
``strftime_now``. jinja2 comes with transformers; prism_ext needs it only
to render a chat."""

from __future__ import annotations

import functools
import json
from datetime import datetime


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat_template: rendering a chat needs jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat_template: does not compile ({exc})") from None


def render_chat(template: str, messages, *, add_generation_prompt: bool = False, **variables) -> str:
    """The text of ``messages`` (a list of {"role": str, "content": str})
    under ``template``; ``variables`` (bos_token, eos_token, ...) are the
    template's other names."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.100}")
    try:
        return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat_template: {exc}") from None
