"""Generated tokens -> text, as a completion streams it."""

from __future__ import annotations

from ..api import PrismModel
from .inputs import decode_tokens


class TextStream:
    """Generated tokens -> text, for streaming: whole UTF-8 characters only,
    nothing past a stop string (text that could begin one is held back)."""

    def __init__(self, model: PrismModel, stops: list[str]):
        self.model, self.stops = model, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = decode_tokens(self.model, self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._flush(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))  # an incomplete character decodes as U+FFFD for now
        for s in self.stops:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._flush(safe)

    def finish(self) -> str:
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
