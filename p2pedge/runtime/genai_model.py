"""Generative models through onnxruntime-genai, stepped one token at a time.

Everything here is synchronous and meant to run in a worker thread; the trio side
decides how often to hop. Traps handled (measured on onnxruntime-genai 0.18):

* default threading is ~2x slower on small CPUs, so ``intra_op_num_threads`` is set
  explicitly through a config overlay;
* ``Tokenizer.decode`` drops everything after an invalid UTF-8 byte, so text is
  streamed with ``Tokenizer.create_stream()`` which buffers partial characters;
* ``get_logits()`` after the last token flips ``is_done()`` and the next step errors;
  read just *before* ``generate_next_token()`` it gives the logits the coming token is
  chosen from (computed once: the step then reuses them, same tokens), so that is the
  only place it is read, and only when log-probabilities are asked for.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime_genai as og

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.manifest import Manifest
from p2pedge.runtime.providers import CPU, genai_available, genai_provider_name, pick_providers
from p2pedge.runtime.sampling import Logprob, PromptTooLong, SamplingParams, StopMatcher

og.disable_telemetry_events()

ROLES = frozenset({"system", "user", "assistant", "tool"})
CHARS_PER_TOKEN_LIMIT = 64  # refuse absurdly long text before tokenizing it
MAX_MESSAGES = 1024
PREFILL_CHUNK = 32  # prompt tokens per call: bounds how long one call holds the GIL


def _kv_bytes_per_position(model_dir: Path) -> int:
    """KV cache bytes one position takes (keys and values of every layer, float32: an
    upper bound for float16 caches); 0 when genai_config.json does not say."""
    try:
        d = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        layers, heads, size = d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    dims = [v for v in (layers, heads, size) if isinstance(v, int) and 0 < v < 1 << 16]
    if len(dims) != 3:
        return 0
    return 2 * dims[0] * dims[1] * dims[2] * 4


def _vocab_size(model_dir: Path) -> int | None:
    """The vocabulary size genai_config.json declares (genai refuses a larger top_k)."""
    try:
        size = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


@dataclass(frozen=True)
class Token:
    """One generated token and the text it made safe to show (may be empty); with
    ``SamplingParams.logprobs``, the token's own log-probability and the likeliest
    ``top_logprobs`` alternatives, most likely first."""

    id: int
    text: str
    logprob: Logprob | None = None
    top_logprobs: tuple[Logprob, ...] = ()


def log_softmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Log-probabilities in float64, stable for large logits (max subtracted first)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted: npt.NDArray[np.float64] = x - x.max()
    out: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum())
    return out


def top_ids(logprobs: npt.NDArray[np.float64], n: int) -> list[int]:
    """The ``n`` likeliest ids, likeliest first (ties: lower id first)."""
    if n <= 0:
        return []
    n = min(n, logprobs.size)
    part = np.argpartition(-logprobs, n - 1)[:n]
    return sorted((int(i) for i in part), key=lambda i: (-logprobs[i], i))


class GenaiModel:
    """A loaded decoder: og.Model + tokenizer + the facts needed to refuse bad input."""

    kind = "decoder"

    def __init__(self, model_dir: Path, manifest: Manifest, config: RuntimeConfig) -> None:
        self.path = model_dir
        self.provider, self.model = self._load(model_dir, config)
        self.tokenizer = og.Tokenizer(self.model)
        self._encode_lock = threading.Lock()
        self.eos_ids = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        ctx = manifest.context_length
        if ctx is None:
            raise ModelLoadError(f"{model_dir}: context_length unknown")
        self.context_length = ctx
        self.vocab_size = _vocab_size(model_dir)
        self.kv_bytes_per_position = _kv_bytes_per_position(model_dir)
        self._pieces: dict[int, str] = {}  # token id -> its text, at most the vocabulary

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (memoized: log-probabilities ask for the same
        few thousand ids over and over)."""
        text = self._pieces.get(token_id)
        if text is None:
            with self._encode_lock:
                text = self._pieces[token_id] = str(self.tokenizer.decode([token_id]))
        return text

    @staticmethod
    def _load(model_dir: Path, config: RuntimeConfig) -> tuple[str, Any]:
        session: dict[str, object] = {"intra_op_num_threads": config.intra_op_threads}
        if not config.spinning:
            session["session.intra_op.allow_spinning"] = "0"
        overlay = json.dumps({"model": {"decoder": {"session_options": session}}})
        errors: list[str] = []
        for provider in pick_providers(config.providers):
            name = genai_provider_name(provider)
            if provider != CPU and (name is None or not genai_available(provider)):
                continue
            try:
                cfg = og.Config(str(model_dir))
                cfg.overlay(overlay)
                cfg.clear_providers()
                if name is not None:
                    cfg.append_provider(name)
                return provider, og.Model(cfg)
            except Exception as exc:  # og raises bare RuntimeError for every failure
                errors.append(f"{provider}: {exc}")
        raise ModelLoadError(f"cannot load {model_dir}: {'; '.join(errors) or 'no provider'}")

    def close(self) -> None:
        """Drop the native objects now rather than at garbage collection."""
        self.tokenizer = None
        self.model = None

    def encode_prompt(
        self, *, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None
    ) -> list[int]:
        """Token ids for a raw prompt or chat messages (rendered with the model's template).

        Raises ValueError for malformed input and PromptTooLong when no room is left for
        a single new token.
        """
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt= or messages=")
        limit = CHARS_PER_TOKEN_LIMIT * self.context_length
        if messages is not None:
            text = self.render_chat(messages, limit)
        else:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string")
            text = prompt
        if len(text) > limit:
            raise PromptTooLong(len(text), self.context_length)
        with self._encode_lock:
            ids = [int(t) for t in self.tokenizer.encode(text)]
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.context_length:
            raise PromptTooLong(len(ids), self.context_length)
        return ids

    def render_chat(self, messages: Sequence[Mapping[str, str]], limit: int) -> str:
        """Apply the chat template from the model's tokenizer_config.json."""
        if not isinstance(messages, Sequence) or not 0 < len(messages) <= MAX_MESSAGES:
            raise ValueError(f"messages must be a list of 1..{MAX_MESSAGES} messages")
        clean: list[dict[str, str]] = []
        total = 0
        for m in messages:
            if not isinstance(m, Mapping):
                raise ValueError("each message must be a mapping with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"bad message: role must be one of {sorted(ROLES)}, content a str")
            total += len(content)
            if total > limit:
                raise PromptTooLong(total, self.context_length)
            clean.append({"role": role, "content": content})
        try:
            with self._encode_lock:
                text = self.tokenizer.apply_chat_template(
                    json.dumps(clean), add_generation_prompt=True
                )
            return str(text)
        except RuntimeError as exc:
            raise ValueError(f"{self.path.name}: cannot apply chat template: {exc}") from exc

    def start(self, prompt_ids: Sequence[int], params: SamplingParams) -> Generation:
        """Begin a generation (cheap: the prompt is run by ``Generation.prefill``)."""
        return Generation(self, prompt_ids, params)


class Generation:
    """One in-flight generation. Not thread-safe: drive it from one thread at a time.

    onnxruntime-genai 0.18 holds the GIL for the whole of every call, so a long prompt
    is appended in chunks of ``PREFILL_CHUNK`` tokens (same tokens out, checked against
    a single append) and each chunk or token is one short call the caller can hop on.
    """

    def __init__(self, owner: GenaiModel, prompt_ids: Sequence[int], params: SamplingParams):
        if len(prompt_ids) >= owner.context_length:
            raise PromptTooLong(len(prompt_ids), owner.context_length)
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = min(params.max_tokens, owner.context_length - self.prompt_tokens)
        gp = og.GeneratorParams(owner.model)
        gp.set_search_options(
            **params.search_options(self.prompt_tokens + self.max_tokens, owner.vocab_size)
        )
        self._eos = owner.eos_ids
        self._owner = owner
        self._logprobs = params.logprobs
        self._top = params.top_logprobs
        self._gen = og.Generator(owner.model, gp)
        self._pending = [int(t) for t in prompt_ids]
        self._stream = owner.tokenizer.create_stream()
        self._stop = StopMatcher(params.stop)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    @property
    def prefilled(self) -> bool:
        return not self._pending

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def prefill(self) -> bool:
        """Run the next chunk of the prompt; True once the whole prompt is in."""
        chunk, self._pending = self._pending[:PREFILL_CHUNK], self._pending[PREFILL_CHUNK:]
        if chunk:
            self._gen.append_tokens(chunk)
        return not self._pending

    def step(self) -> Token:
        """Compute and decode one token; sets ``finish_reason`` on the last one."""
        if self.finish_reason is not None:
            raise RuntimeError("generation already finished")
        while not self.prefill():
            pass
        # before the step, never after: see the module docstring
        logits = np.asarray(self._gen.get_logits())[0, -1] if self._logprobs else None
        self._gen.generate_next_token()
        tid = int(self._gen.get_next_tokens()[0])
        self.completion_tokens += 1
        self.token_ids.append(tid)
        if tid in self._eos:
            self.finish_reason = "stop"
            return self._token(tid, self._stop.flush(), logits)
        text = self._stop.feed(self._stream.decode(tid))
        if self._stop.stopped:
            self.finish_reason = "stop"
        elif self.completion_tokens >= self.max_tokens or self._gen.is_done():
            self.finish_reason = "length"
            text += self._stop.flush()
        return self._token(tid, text, logits)

    def _token(self, tid: int, text: str, logits: npt.NDArray[Any] | None) -> Token:
        if logits is None:
            return Token(tid, text)
        lp = log_softmax(logits)
        word = self._owner.token_text

        def entry(i: int) -> Logprob:
            return Logprob(i, word(i), float(lp[i]))

        return Token(tid, text, entry(tid), tuple(entry(i) for i in top_ids(lp, self._top)))

    def close(self) -> None:
        self.finish_reason = self.finish_reason or "cancelled"
        self._gen = None
