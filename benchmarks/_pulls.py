"""A pull timed for ``benchmarks/hostile.py``: some files of a model from whoever in the
swarm claims it (a hanging attacker included), into a fresh store, verified."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from p2pedge.errors import P2PEdgeError
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore
from p2pedge.models.pull import pull
from p2pedge.models.store import Store
from p2pedge.node.node import Node
from p2pedge.protocols.blob.handler import swarm_sources


async def timed_pull(
    node: Node, model: str, into: Path, trust: TrustStore, files: Sequence[str]
) -> float | None:
    """Seconds to pull ``files``, or None when the pull failed."""
    mid = ModelId.parse(model)
    began = trio.current_time()
    sources = await swarm_sources(node.context, mid)
    try:
        await pull(mid, Store(into), sources, trust, files=files)
    except P2PEdgeError as exc:
        print(f"pull failed: {exc!r}", flush=True)
        return None
    finally:
        for source in sources:
            await source.aclose()
    return trio.current_time() - began
