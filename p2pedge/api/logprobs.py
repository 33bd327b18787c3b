"""Per-token log-probabilities in OpenAI's two response shapes (pure).

Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
"refusal": null}``. Legacy completions: ``{tokens, token_logprobs, top_logprobs,
text_offset}`` with ``top_logprobs`` one ``{token: logprob}`` object per token and
``text_offset`` each token's start in the completion's text (the prompt not counted).
A stream sends each chunk the tokens since the last one, so a token whose text is still
held back (a partial character, a possible stop string) rides on a later chunk.
"""

from __future__ import annotations

import math
from typing import Any

from p2pedge.api.backend import Piece
from p2pedge.runtime.sampling import Logprob

# JSON has no -inf or NaN; OpenAI-compatible servers report an impossible token as this.
FLOOR = -9999.0


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > FLOOR else FLOOR


def _entry(lp: Logprob) -> dict[str, Any]:
    return {"token": lp.text, "logprob": _value(lp.logprob), "bytes": list(lp.text.encode())}


class Logprobs:
    """Collects one choice's token log-probabilities; ``take`` renders and clears them."""

    def __init__(self, kind: str, enabled: bool) -> None:
        self.kind = kind
        self.enabled = enabled
        self._pending: list[Piece] = []
        self._offset = 0  # legacy text_offset of the next token

    def add(self, piece: Piece) -> None:
        if self.enabled and piece.logprob is not None:
            self._pending.append(piece)

    def take(self) -> dict[str, Any] | None:
        """The pending tokens as a choice's ``logprobs`` (None when not asked for)."""
        if not self.enabled:
            return None
        pieces, self._pending = self._pending, []
        if self.kind == "chat":
            content = [
                {**_entry(p.logprob), "top_logprobs": [_entry(a) for a in p.top_logprobs]}
                for p in pieces
                if p.logprob is not None
            ]
            return {"content": content, "refusal": None}
        chosen = [p.logprob for p in pieces if p.logprob is not None]
        offsets = []
        for lp in chosen:
            offsets.append(self._offset)
            self._offset += len(lp.text)
        tops: list[dict[str, float]] = []
        for p in pieces:
            top: dict[str, float] = {}
            for alt in p.top_logprobs:  # ids that decode alike: the likeliest one stays
                top.setdefault(alt.text, _value(alt.logprob))
            tops.append(top)
        return {
            "tokens": [lp.text for lp in chosen],
            "token_logprobs": [_value(lp.logprob) for lp in chosen],
            "top_logprobs": tops,
            "text_offset": offsets,
        }
