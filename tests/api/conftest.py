"""A real node (local mode, tiny model) behind the real API server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from api_helpers import MODEL, Serve

from p2pedge.api import ApiApp, serve_api
from p2pedge.api.backend import ApiBackend
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("api") / "tiny", seed=3)


@dataclass
class Running:
    node: Node
    app: ApiApp
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def serve(tiny: Path, config: Callable[..., NodeConfig]) -> Serve:
    """``async with serve(**app_kwargs) as api``: a node with the tiny model and its API.

    ``wrap`` (optional) wraps the node's backend, e.g. in :class:`Gated`.
    """

    @asynccontextmanager
    async def run(
        wrap: Callable[[ApiBackend], ApiBackend] | None = None, **kwargs: Any
    ) -> AsyncIterator[Running]:
        cfg = config("api", local_only=True, model_dirs=((MODEL, tiny),))
        async with Node(cfg) as node:
            backend: ApiBackend = api_for(node)
            app = ApiApp(wrap(backend) if wrap else backend, **kwargs)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, app)
                yield Running(node, app, port)
                nursery.cancel_scope.cancel()

    return run
