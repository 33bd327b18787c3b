"""``p2pedge``: the one console command, dispatching to each part's own program.

``p2pedge node ...`` is ``python -m p2pedge.node ...``, ``p2pedge models ...`` is
``python -m p2pedge.models ...`` and ``p2pedge registry ...`` is
``python -m p2pedge.registry ...``: the rest of the command line goes to that program
unchanged, so each keeps one parser and one set of exit codes. ``pull``, ``import`` and
``publish`` are short for ``registry pull``, ``models import-gguf`` and ``registry
publish``; ``chat`` and ``run`` are :mod:`p2pedge.chat`. A subcommand's modules
load only when it is chosen, which keeps ``p2pedge --help`` quick and light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from p2pedge.errors import EXIT_USAGE, OneLineParser


def _node(argv: list[str]) -> int:
    from p2pedge.node.cli import main

    return main(argv)


def _models(argv: list[str]) -> int:
    from p2pedge.models.__main__ import main

    return main(argv)


def _registry(argv: list[str]) -> int:
    from p2pedge.registry.__main__ import main

    return main(argv)


def _chat(argv: list[str]) -> int:
    from p2pedge.chat import main

    return main("chat", argv)


def _run(argv: list[str]) -> int:
    from p2pedge.chat import main

    return main("run", argv)


def _alias(program: Callable[[list[str]], int], *head: str) -> Callable[[list[str]], int]:
    """``p2pedge pull ...`` is ``p2pedge models pull ...``, and so on."""
    return lambda argv: program([*head, *argv])


# name -> (program, one-line help); the order is the order of --help.
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "chat": (_chat, "chat with a model in the terminal: streams, keeps history"),
    "run": (_run, 'answer one prompt: p2pedge run MODEL "prompt"'),
    "node": (_node, "run a node: join or start a swarm, serve shards, list peers"),
    "pull": (_alias(_registry, "pull"), "pull a model from a registry (= registry pull)"),
    "import": (_alias(_models, "import-gguf"), "import a GGUF file (= models import-gguf)"),
    "publish": (_alias(_registry, "publish"), "sign and publish a model (= registry publish)"),
    "models": (_models, "the model store: import-gguf, import-hf, list, verify, gc, keygen"),
    "registry": (_registry, "run a model registry, pull from one, or publish to one"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; used for ``--help`` and errors, not to parse subcommands."""
    from p2pedge import __version__

    parser = OneLineParser(
        prog="p2pedge",
        description="Turn ordinary computers into one AI swarm.",
        epilog="Run 'p2pedge COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"p2pedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``p2pedge COMMAND ARGS...``; returns the exit code of COMMAND's program."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        program, _ = COMMANDS[args[0]]
        return program(args[1:])
    parser = build_parser()
    if not args:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    parser.parse_args(args)  # --help / --version exit here; anything else is an error
    parser.error(f"unknown command {args[0]!r}")  # pragma: no cover - parse_args exits first


if __name__ == "__main__":
    sys.exit(main())
