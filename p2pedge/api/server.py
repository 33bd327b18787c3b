"""Run the API app under hypercorn's trio worker, inside the caller's nursery.

``port = await nursery.start(serve_api, app)`` binds ``127.0.0.1:0`` by default and
reports the real port; cancelling the enclosing scope stops it. The key file holds the
bearer key on its first line, so the key never appears in a process listing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from p2pedge.api.app import ApiApp
from p2pedge.errors import ConfigError

MAX_KEY_FILE = 4096


def parse_api_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` / ``PORT``, which bind 127.0.0.1) for ``--api``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--api wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_key(path: Path) -> str:
    """The bearer key: the first line of ``path``, which must not be empty."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            raw = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc}") from exc
    if len(raw) > MAX_KEY_FILE:
        raise ConfigError(f"the API key file {path} is larger than {MAX_KEY_FILE} bytes")
    lines = raw.decode("utf-8", "replace").splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"the API key file {path} is empty")
    return key


async def serve_api(
    app: ApiApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``task_status.started(port)`` once listening.

    ``task_status`` is typed ``Any`` because the installed trio stubs lack ``TaskStatus``.
    """
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("p2pedge.api")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = app.limits.header_s  # also bounds a slowly sent request head
    started = False
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(serve, app, config, shutdown_trigger=shutdown_trigger or trio.sleep_forever)
            )
            started = True
            task_status.started(int(binds[0].rsplit(":", 1)[1]))
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if started or len(leaves) != 1 or not isinstance(leaves[0], OSError):
            raise
        # one line for the operator (port taken, address not here), not nested groups
        raise ConfigError(f"cannot serve the API on {host}:{port}: {leaves[0]}") from leaves[0]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out
