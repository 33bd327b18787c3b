"""``p2pedge chat [MODEL]`` and ``p2pedge run MODEL PROMPT``: talk to a model from a terminal.

Both run a node of their own (local mode unless ``--bootstrap``/``--mdns``/``--swarm``
joins a swarm) and reach the model through the same backend as the HTTP API
(:func:`p2pedge.node.api.api_for`), so a local, sharded or remote model answers the same
way and the chat template is the model's own. :class:`Conversation` is the small testable
core (history, one turn at a time); :func:`chat_loop` is the thin terminal loop over it.

Stdin is read with ``os.read`` in an abandonable worker thread: a thread blocked in a
read must not hold Python's stdin buffer lock when Ctrl-C ends the program.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from p2pedge.api.backend import ApiBackend, Target
from p2pedge.api.schema import GenerationRequest
from p2pedge.errors import ConfigError, ModelNotCached, P2PEdgeError
from p2pedge.ids import ModelId
from p2pedge.runtime.sampling import PromptTooLong, SamplingParams

HELP = "/reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C quits"
GET_ONE = (
    "no model here: pull one with 'p2pedge pull NAME --registry URL --trust KEY.pub', or "
    "import a GGUF file with 'p2pedge import FILE.gguf --name NAME' and pass its directory "
    "('p2pedge chat .cache/models/NAME')"
)
MAX_LINE = 64 * 1024
DESCRIPTIONS = {
    "chat": "Chat with a model in the terminal: the answer streams as it is generated and "
    "the conversation is kept. " + HELP + ". Runs a node in local mode unless --bootstrap, "
    "--mdns or --swarm joins a swarm.",
    "run": "Stream one answer to stdout. Runs a node in local mode unless --bootstrap, "
    "--mdns or --swarm joins a swarm.",
}  # a typed line longer than this is cut: the prompt has limits anyway
# mypy rejects keyword arguments after trio's TypeVarTuple ``*args``; go untyped here.
_to_thread: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync


class Conversation:
    """The chat history and one turn through an :class:`ApiBackend`.

    A turn that fails or is interrupted leaves the history as it was before it, so the
    next question is not answered in the context of a half-written reply.
    """

    def __init__(
        self,
        backend: ApiBackend,
        target: Target,
        params: SamplingParams,
        system: str | None = None,
    ) -> None:
        self.backend = backend
        self.target = target
        self.params = params
        self.system = system
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history.clear()

    def messages(self, text: str) -> tuple[dict[str, str], ...]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return (*head, *self.history, {"role": "user", "content": text})

    async def say(self, text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to ``text`` through ``write``, piece by piece; return it."""
        request = GenerationRequest(
            "chat", self.target.model, self.params, messages=self.messages(text), stream=True
        )
        pieces: list[str] = []
        if self.target.where in ("local", "sharded"):
            stream = self.backend.stream(self.target, request)
            async with aclosing(stream):  # type: ignore[type-var]
                async for piece in stream:
                    if piece.text:
                        pieces.append(piece.text)
                        write(piece.text)
        else:  # the orchestrator and remote peers answer whole
            answer = await self.backend.ask(self.target, request)
            pieces.append(answer.text)
            write(answer.text)
        reply = "".join(pieces)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply


def command_of(line: str) -> str | None:
    """``reset``, ``exit``, ``help`` for a slash command; None for a message to send."""
    word = line.strip().lower()
    if not word.startswith("/"):
        return None
    if word in ("/reset", "/clear"):
        return "reset"
    if word in ("/exit", "/quit", "/bye"):
        return "exit"
    return "help"


class StdinLines:
    """Lines from a file descriptor, each read in an abandonable worker thread."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._buffer = b""
        self._eof = False

    async def next(self) -> str | None:
        """The next line without its newline; None at end of input."""
        while b"\n" not in self._buffer and not self._eof:
            data: bytes = await _to_thread(os.read, self.fd, 4096, abandon_on_cancel=True)
            self._eof = not data
            self._buffer = (self._buffer + data)[-MAX_LINE:]
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")


async def chat_loop(
    conversation: Conversation, lines: StdinLines, out: TextIO, *, prompt: str = ">>> "
) -> None:
    """Read a line, answer it, until ``/exit`` or end of input."""

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        write(prompt)
        line = await lines.next()
        if line is None:
            write("\n")
            return
        command = command_of(line)
        if command == "exit":
            return
        if command == "reset":
            conversation.reset()
            write("(conversation reset)\n")
        elif command == "help":
            write(f"({HELP})\n")
        elif line.strip():
            try:
                await conversation.say(line, write)
            except PromptTooLong as exc:
                write(f"\n(error: {exc}; /reset starts over)")
            except (P2PEdgeError, ValueError) as exc:
                write(f"\n(error: {exc})")
            write("\n")


# -- the commands ----------------------------------------------------------------------


def _parser(name: str) -> argparse.ArgumentParser:
    from p2pedge.errors import OneLineParser
    from p2pedge.node.cli import _common

    parser = OneLineParser(prog=f"p2pedge {name}", description=DESCRIPTIONS[name])
    if name == "chat":
        parser.add_argument(
            "model", nargs="?", help="model name or directory (default: the only one)"
        )
        parser.add_argument("--system", default=None, help="a system message for the chat")
    else:
        parser.add_argument("model", help="model name or directory")
        parser.add_argument("prompt", help="what to ask")
    parser.add_argument("--max-tokens", type=int, default=512, help="per answer (512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--swarm", action="store_true", help="join the swarm (no bootstrap)")
    parser.add_argument("--models-dir", type=Path, default=None, help="model store root")
    parser.add_argument(
        "--model",
        dest="model_dirs",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="use an imported model directory (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    _common(parser)
    for action in parser._actions:  # the node's --json: no JSON events to print here
        if action.dest == "json":
            action.help = argparse.SUPPRESS
    return parser


def _named(args: argparse.Namespace) -> argparse.Namespace:
    """A MODEL given as a model directory becomes ``--model BASENAME=DIR``."""
    model: str | None = args.model
    if model is not None and Path(model).expanduser().is_dir():
        path = Path(model).expanduser().resolve()
        name = path.name.lower()
        try:
            ModelId.parse(name)
        except ValueError:
            raise ConfigError(f"{path}: rename the directory ({name!r} is no model name)") from None
        args.model_dirs.append(f"{name}={path}")
        args.model = name
    if args.data_dir is None and os.environ.get("P2PEDGE_HOME"):
        args.data_dir = Path(os.environ["P2PEDGE_HOME"])  # where `p2pedge models` stores
    return args


Turn = Callable[[Target, ApiBackend, SamplingParams], Awaitable[None]]


async def _open(args: argparse.Namespace, params: SamplingParams, run: Turn) -> None:
    """Start the node, find the model (or the only one here), then ``run`` with it."""
    from p2pedge.node.api import api_for
    from p2pedge.node.cli import _config
    from p2pedge.node.node import Node

    config = _config(args)
    config = replace(config, local_only=not (config.bootstrap or config.reach.mdns or args.swarm))
    async with Node(config) as node:
        backend = api_for(node)
        model = args.model
        if model is None:
            held = await trio.to_thread.run_sync(node.models.cached_models)  # reads manifests
            names = sorted({ModelId.parse(m.id).name for m in held})
            if not names:
                raise ModelNotCached(GET_ONE)
            model = names[0]
            others = f" (also here: {', '.join(names[1:])})" if names[1:] else ""
            print(f"using {model}{others}", file=sys.stderr, flush=True)
        target = await backend.target(model)
        if target is None:
            raise ModelNotCached(f"{model}: not here nor in the swarm; {GET_ONE}")
        await run(target, backend, params)


async def _chat(args: argparse.Namespace, printer: Any) -> None:
    async def run(target: Target, backend: ApiBackend, params: SamplingParams) -> None:
        print(f"chatting with {target.model} ({target.where}); {HELP}", file=sys.stderr)
        conversation = Conversation(backend, target, params, args.system)
        await chat_loop(conversation, StdinLines(), sys.stdout)

    await _open(args, args.params, run)


async def _run(args: argparse.Namespace, printer: Any) -> None:
    async def run(target: Target, backend: ApiBackend, params: SamplingParams) -> None:
        conversation = Conversation(backend, target, params)
        await conversation.say(args.prompt, partial(_write, sys.stdout))
        _write(sys.stdout, "\n")

    await _open(args, args.params, run)


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def main(name: str, argv: Sequence[str]) -> int:
    """``p2pedge chat ...`` (``name`` "chat") or ``p2pedge run ...`` (``name`` "run")."""
    import logging

    from p2pedge.node.cli import Printer, _unwrapped

    args = _parser(name).parse_args(list(argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    command = _chat if name == "chat" else _run
    try:
        args = _named(args)
        try:
            args.params = SamplingParams.make(
                max_tokens=args.max_tokens, temperature=args.temperature
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        trio.run(_unwrapped, command, args, Printer(False))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (P2PEdgeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
