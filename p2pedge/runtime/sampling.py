"""Generation parameters: the one set of ranges and defaults, and stop-string matching.

Parameters arrive from local callers and from peers alike. Three types carry them (this
module's :class:`SamplingParams`, the infer protocol's ``GenParams`` and the pipeline's
``SamplingSpec``); all three validate with :func:`check_sampling`, so a value one accepts
the others accept too, and a peer cannot pass a value that a later layer (numpy,
onnxruntime-genai) would refuse mid-request. Violations are ``ValueError``; the codecs
turn them into the right protocol error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from p2pedge.errors import P2PEdgeError

# The ranges. Temperature follows OpenAI's chat API (0..2), so what OpenAI-style callers
# send passes; the catalog's specialists use the same bound. onnxruntime-genai takes the
# seed and top_k as C++ int32 (a larger value fails in the middle of a request), and
# top_k also bounds how many logits a ring's last server ships per token.
MAX_TOKENS_LIMIT = 1 << 16
MAX_TEMPERATURE = 2.0
# Below this, sampling is greedy: dividing logits by a vanishing temperature overflows,
# and long before that the distribution is all on the argmax anyway.
MIN_TEMPERATURE = 1e-6
MAX_TOP_K = 4096
MAX_SEED = (1 << 31) - 1
MAX_STOPS = 16
MAX_STOP_CHARS = 256
# How many alternatives a token's log-probabilities may list: OpenAI's top_logprobs bound.
MAX_TOP_LOGPROBS = 20

# The defaults: greedy (deterministic) unless the caller asks for sampling.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _real(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def check_sampling(
    temperature: object, top_p: object, top_k: object, seed: object
) -> tuple[float, float, int, int | None]:
    """``(temperature, top_p, top_k, seed)`` as float, float, int and int or None; raise
    ``ValueError`` naming the first field outside its range (``seed`` may be None)."""
    t, p, k, s = _real(temperature), _real(top_p), _int(top_k), _int(seed)
    if t is None or not 0.0 <= t <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature!r}")
    if p is None or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if k is None or not 0 <= k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an int in [0, {MAX_TOP_K}], got {top_k!r}")
    if seed is not None and (s is None or not 0 <= s <= MAX_SEED):
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    return t, p, k, s


def check_logprobs(logprobs: object, top_logprobs: object) -> tuple[bool, int]:
    """``(logprobs, top_logprobs)`` as bool and int; raise ``ValueError`` naming the field
    when ``logprobs`` is not a bool, ``top_logprobs`` is outside ``[0, MAX_TOP_LOGPROBS]``,
    or alternatives are asked for without ``logprobs``."""
    if not isinstance(logprobs, bool):
        raise ValueError(f"logprobs must be a boolean, got {logprobs!r}")
    n = _int(top_logprobs)
    if n is None or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise ValueError(
            f"top_logprobs must be an int in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}"
        )
    if n and not logprobs:
        raise ValueError("top_logprobs needs logprobs to be true")
    return logprobs, n


def check_generation(max_tokens: object, stop: object) -> None:
    """Raise ``ValueError`` unless ``max_tokens`` and the ``stop`` strings are in range."""
    n = _int(max_tokens)
    if n is None or not 0 < n <= MAX_TOKENS_LIMIT:
        raise ValueError(
            f"max_tokens must be an int in [1, {MAX_TOKENS_LIMIT}], got {max_tokens!r}"
        )
    if isinstance(stop, str) or not isinstance(stop, Sequence):
        raise ValueError("stop must be a list of strings, not a string")
    if len(stop) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} chars, got {s!r}")


class Logprob(NamedTuple):
    """A token with its log-probability under the model (before temperature or top-p)."""

    id: int
    text: str  # the token alone, decoded; a piece of a UTF-8 character decodes to ""
    logprob: float


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
    """How to pick tokens. A temperature under :data:`MIN_TEMPERATURE` is greedy
    (top_k/top_p are then ignored). ``logprobs`` asks each token for its log-probability
    and its ``top_logprobs`` likeliest alternatives; only local generation reads logits,
    so the peers' parameter types do not carry these two."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        check_generation(self.max_tokens, self.stop)
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)
        check_logprobs(self.logprobs, self.top_logprobs)

    @classmethod
    def make(
        cls,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        top_k: int = DEFAULT_TOP_K,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> SamplingParams:
        """Build from keyword arguments as callers pass them (``stop`` any sequence)."""
        if stop is not None and (isinstance(stop, str) or not isinstance(stop, Sequence)):
            raise ValueError("stop must be a list of strings, not a string")
        return cls(
            max_tokens, temperature, top_p, top_k, seed, tuple(stop or ()), logprobs, top_logprobs
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def search_options(
        self, max_length: int, vocab_size: int | None = None
    ) -> dict[str, float | int | bool]:
        """onnxruntime-genai search options for a sequence of at most ``max_length``.

        genai refuses a ``top_k`` over the vocabulary mid-request; keeping that many
        tokens is no cut at all, so with ``vocab_size`` known it becomes 0 (no cut).
        """
        opts: dict[str, float | int | bool] = {"max_length": max_length, "batch_size": 1}
        if self.greedy:
            opts.update(do_sample=False, top_k=1)
        else:
            top_k = 0 if vocab_size is not None and self.top_k >= vocab_size else self.top_k
            opts.update(do_sample=True, temperature=float(self.temperature))
            opts.update(top_p=float(self.top_p), top_k=top_k)
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
