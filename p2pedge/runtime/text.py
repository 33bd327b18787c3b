"""Text in and out without loading a model: what a sharded client needs.

The shards see only token ids and hidden states; the client keeps the tokenizer
(``tokenizer.json``) and renders the chat template from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pedge.errors import ModelLoadError

REPLACEMENT = "\ufffd"


class TextCodec:
    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(model_dir)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            config = json.loads((self.path / "tokenizer_config.json").read_text())
        except (OSError, ValueError, Exception) as exc:  # tokenizers raises its own Exception type
            raise ModelLoadError(f"{self.path}: no usable tokenizer: {exc}") from exc
        self.chat_template: str | None = config.get("chat_template")
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self._template: Any = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        if not self.chat_template:
            raise ModelLoadError(f"{self.path}: tokenizer_config.json has no chat_template")
        if self._template is None:  # compiled once per codec
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.chat_template)
        rendered: str = self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return rendered

    def prompt_ids(
        self, *, messages: Sequence[Mapping[str, str]] | None, prompt: str | None
    ) -> list[int]:
        if (messages is None) == (prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        text = self.render_chat(messages) if messages is not None else str(prompt)
        ids = self.encode(text)
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Emits text only once its bytes are complete UTF-8 (no torn characters)."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None
