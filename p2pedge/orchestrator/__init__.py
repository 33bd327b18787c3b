"""Specialists, explainable routing, fan-out, predictive pre-load and federated batches.

Attributes load lazily so ``import p2pedge.orchestrator`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pedge.orchestrator.catalog import Catalog as Catalog
    from p2pedge.orchestrator.catalog import Specialist as Specialist
    from p2pedge.orchestrator.catalog import UnknownCategory as UnknownCategory
    from p2pedge.orchestrator.federated import FederatedMapError as FederatedMapError
    from p2pedge.orchestrator.orchestrator import Answer as Answer
    from p2pedge.orchestrator.orchestrator import FanOut as FanOut
    from p2pedge.orchestrator.orchestrator import Orchestrator as Orchestrator
    from p2pedge.orchestrator.remote import NodePeers as NodePeers
    from p2pedge.orchestrator.remote import install_infer as install_infer
    from p2pedge.orchestrator.router import Decision as Decision

_LAZY = {
    "Catalog": "catalog",
    "Specialist": "catalog",
    "UnknownCategory": "catalog",
    "FederatedMapError": "federated",
    "Answer": "orchestrator",
    "FanOut": "orchestrator",
    "Orchestrator": "orchestrator",
    "NodePeers": "remote",
    "install_infer": "remote",
    "Decision": "router",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pedge.orchestrator' has no attribute {name!r}")
    return getattr(importlib.import_module(f"p2pedge.orchestrator.{module}"), name)
