"""p2pedge: turn ordinary computers into one AI swarm.

Heavy parts (trio, libp2p, onnxruntime) load only when a name that needs them is used,
so ``import p2pedge.wire`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pedge.errors import Busy as Busy
from p2pedge.errors import ConfigError as ConfigError
from p2pedge.errors import IntegrityError as IntegrityError
from p2pedge.errors import InvalidRecord as InvalidRecord
from p2pedge.errors import LocalProtocolError as LocalProtocolError
from p2pedge.errors import ModelLoadError as ModelLoadError
from p2pedge.errors import ModelNotCached as ModelNotCached
from p2pedge.errors import P2PEdgeError as P2PEdgeError
from p2pedge.errors import PeerTimeout as PeerTimeout
from p2pedge.errors import PeerUnavailable as PeerUnavailable
from p2pedge.errors import PrivateSwarmRejected as PrivateSwarmRejected
from p2pedge.errors import ProtocolError as ProtocolError
from p2pedge.errors import RemoteProtocolError as RemoteProtocolError
from p2pedge.errors import ShardFailed as ShardFailed
from p2pedge.ids import LayerRange as LayerRange
from p2pedge.ids import ModelId as ModelId

__version__ = "0.1.0"

if TYPE_CHECKING:
    from p2pedge.node.config import ApiConfig as ApiConfig
    from p2pedge.node.config import NodeConfig as NodeConfig
    from p2pedge.node.config import PrivateSwarm as PrivateSwarm
    from p2pedge.node.config import Reach as Reach
    from p2pedge.node.config import ServeSpec as ServeSpec
    from p2pedge.node.config import Tuning as Tuning
    from p2pedge.node.node import Node as Node
    from p2pedge.records.card import CapabilityCard as CapabilityCard
    from p2pedge.runtime.completion import Completion as Completion

_LAZY = {
    "Node": "p2pedge.node.node",
    "NodeConfig": "p2pedge.node.config",
    "ApiConfig": "p2pedge.node.config",
    "PrivateSwarm": "p2pedge.node.config",
    "Reach": "p2pedge.node.config",
    "ServeSpec": "p2pedge.node.config",
    "Tuning": "p2pedge.node.config",
    "Completion": "p2pedge.runtime.completion",
    "CapabilityCard": "p2pedge.records.card",
}

__all__ = [
    "ApiConfig",
    "Busy",
    "CapabilityCard",
    "Completion",
    "ConfigError",
    "IntegrityError",
    "InvalidRecord",
    "LayerRange",
    "LocalProtocolError",
    "ModelId",
    "ModelLoadError",
    "ModelNotCached",
    "Node",
    "NodeConfig",
    "P2PEdgeError",
    "PeerTimeout",
    "PeerUnavailable",
    "PrivateSwarm",
    "PrivateSwarmRejected",
    "ProtocolError",
    "Reach",
    "RemoteProtocolError",
    "ServeSpec",
    "ShardFailed",
    "Tuning",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pedge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
