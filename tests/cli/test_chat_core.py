"""The chat's core over a real node: history across turns, /reset, and streamed pieces."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path

from p2pedge.api.backend import ApiBackend, Piece, Target, Usage
from p2pedge.api.schema import GenerationRequest
from p2pedge.chat import Conversation, StdinLines, chat_loop, command_of
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.runtime.sampling import SamplingParams
from p2pedge.testing import build_tiny_model

MODEL = "tiny-chat"


class Recording:
    """The node's backend, remembering each request the chat made (nothing changed)."""

    def __init__(self, inner: ApiBackend) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []

    async def stream(
        self, target: Target, request: GenerationRequest, usage: Usage | None = None
    ) -> AsyncGenerator[Piece, None]:
        self.requests.append(request)
        pieces = self.inner.stream(target, request, usage)
        async with aclosing(pieces):  # type: ignore[type-var]
            async for piece in pieces:
                yield piece


async def test_turns_carry_the_history_and_reset_forgets_it(
    tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    tiny = build_tiny_model(tmp_path / "tiny", seed=3)
    params = SamplingParams.make(max_tokens=6)
    async with Node(config("chat", local_only=True, model_dirs=((MODEL, tiny),))) as node:
        backend = Recording(api_for(node))
        target = await backend.inner.target(MODEL)
        assert target is not None and target.where == "local"
        chat = Conversation(backend, target, params, system="be brief")  # type: ignore[arg-type]
        written: list[str] = []
        first = await chat.say("hello", written.append)
        assert first and "".join(written) == first
        assert len(written) > 1  # streamed: one write per piece, not the whole reply
        await chat.say("and then?", written.append)
        assert [m["content"] for m in backend.requests[1].messages or ()] == [
            "be brief", "hello", first, "and then?",
        ]  # fmt: skip
        chat.reset()
        await chat.say("again", written.append)
        assert [m["content"] for m in backend.requests[2].messages or ()] == ["be brief", "again"]


async def test_the_loop_reads_commands_and_stops_at_end_of_input(
    tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    tiny = build_tiny_model(tmp_path / "tiny", seed=3)
    r, w = os.pipe()
    os.write(w, b"hi\n/reset\n/what\nhello\n")  # then end of input
    os.close(w)
    async with Node(config("loop", local_only=True, model_dirs=((MODEL, tiny),))) as node:
        backend = Recording(api_for(node))
        target = await backend.inner.target(MODEL)
        assert target is not None
        params = SamplingParams.make(max_tokens=4)
        chat = Conversation(backend, target, params)  # type: ignore[arg-type]
        out = io.StringIO()
        await chat_loop(chat, StdinLines(r), out)
    os.close(r)
    text = out.getvalue()
    assert "(conversation reset)" in text and "/exit" in text  # "/what" gets the help
    assert [len(req.messages or ()) for req in backend.requests] == [1, 1]
    assert command_of("/EXIT") == "exit" and command_of("not /a command") is None
