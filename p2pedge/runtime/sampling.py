"""Validated generation parameters and stop-string matching.

Parameters arrive from local callers and from peers alike, so everything is checked
here, before any compute, and rejected with ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from p2pedge.errors import P2PEdgeError

MAX_TOKENS_LIMIT = 1 << 16
MAX_TEMPERATURE = 10.0
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_SEED = (1 << 31) - 1


class PromptTooLong(P2PEdgeError, ValueError):
    """The prompt does not leave room for a single new token in the context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the model's context is {context_length}"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy (top_k/top_p ignored)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if not 0 < self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens must be 1..{MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if not isinstance(self.temperature, int | float) or not (
            0.0 <= self.temperature <= MAX_TEMPERATURE
        ):
            raise ValueError(f"temperature must be 0..{MAX_TEMPERATURE}, got {self.temperature}")
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        if len(self.stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} chars, got {s!r}")

    @classmethod
    def make(
        cls,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> SamplingParams:
        """Build from keyword arguments as callers pass them (``stop`` any sequence)."""
        if isinstance(stop, str):
            raise ValueError("stop must be a list of strings, not a string")
        return cls(max_tokens, temperature, top_p, top_k, seed, tuple(stop or ()))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def search_options(self, max_length: int) -> dict[str, float | int | bool]:
        """onnxruntime-genai search options for a sequence of at most ``max_length``."""
        opts: dict[str, float | int | bool] = {"max_length": max_length, "batch_size": 1}
        if self.greedy:
            opts.update(do_sample=False, top_k=1)
        else:
            opts.update(do_sample=True, temperature=float(self.temperature))
            opts.update(top_p=float(self.top_p), top_k=self.top_k)
        if self.seed is not None:
            opts["random_seed"] = self.seed
        return opts


class StopMatcher:
    """Streams text while holding back any tail that might grow into a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return what is now safe to emit (empty once stopped)."""
        if self.stopped:
            return ""
        self._text += piece
        if not self._stops:
            out, self._emitted = self._text[self._emitted :], len(self._text)
            return out
        # Held-back text guarantees a stop can only start at or after ``_emitted``. The
        # stop that *completes* first wins (ties: the longer one), whatever the chunking.
        hits = [
            (i + len(s), i) for s in self._stops if (i := self._text.find(s, self._emitted)) >= 0
        ]
        if hits:
            self.stopped = True
            end = min(hits)[1]
        else:
            end = len(self._text) - self._held_back()
        out = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def flush(self) -> str:
        """Everything still held back, for when generation ends without a stop."""
        if self.stopped:
            return ""
        out, self._emitted = self._text[self._emitted :], len(self._text)
        return out

    def _held_back(self) -> int:
        text = self._text
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
