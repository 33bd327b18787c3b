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
from p2pedge.registry.app import RegistryApp, RegistryLimits
from p2pedge.registry.owners import Grants

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
    grants: Grants | None = None,
    limits: RegistryLimits | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``root`` until cancelled; ``task_status.started(port)`` once listening.

    ``grants`` adds publisher keys per name (:mod:`p2pedge.registry.owners`); ``limits``
    bounds uploads. ``task_status`` is typed ``Any`` because the installed trio stubs lack
    ``TaskStatus``.
    """
    limits = limits or RegistryLimits()
    app = RegistryApp(
        Store(root),
        token=token or os.environ.get(TOKEN_ENV),
        trust=trust,
        grants=grants,
        limits=limits,
    )
    await serve_app(app, host, port, shutdown_trigger=shutdown_trigger, task_status=task_status)


async def serve_app(
    app: RegistryApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an existing app (tests keep a handle on it to read its quotas)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("p2pedge.registry")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = app.limits.header_s  # also bounds a slowly sent request head
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, config, shutdown_trigger=shutdown_trigger or trio.sleep_forever)
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
