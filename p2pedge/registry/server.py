"""Run the registry app under hypercorn's trio worker, inside the caller's nursery.

``port = await nursery.start(serve_registry, root)`` binds ``127.0.0.1:0`` by default and
reports the real port; cancelling the enclosing scope (or the ``shutdown_trigger``
returning) stops it. The CLI uses the same function with a fixed ``--listen`` address.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from p2pedge.errors import ConfigError
from p2pedge.models.keys import TrustStore
from p2pedge.models.store import Store
from p2pedge.registry.app import RegistryApp

TOKEN_ENV = "P2PEDGE_REGISTRY_TOKEN"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve_registry(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    trust: TrustStore | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``root`` until cancelled; ``task_status.started(port)`` once listening.

    ``task_status`` is typed ``Any`` because the installed trio stubs lack ``TaskStatus``.
    """
    app = RegistryApp(Store(root), token=token or os.environ.get(TOKEN_ENV), trust=trust)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("p2pedge.registry")
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown_trigger or trio.sleep_forever)
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
