"""What peers may hold of this node: every protocol's limits, in one place for NodeConfig.

Each limit is charged per peer id, per source address (so minting peer ids does not
multiply a machine's share) and in total; a refusal is :class:`~p2pedge.errors.Busy`
naming the limit. The defaults are safe for a home device on an open swarm; a private
swarm of trusted machines may raise them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pedge.dht.limits import DhtLimits
from p2pedge.protocols.blob.machine import BlobLimits
from p2pedge.protocols.direct.machine import LaneLimits
from p2pedge.protocols.infer.codec import InferLimits
from p2pedge.protocols.pipeline.limits import PipelineLimits


@dataclass(frozen=True)
class Limits:
    """One field per protocol: model chunks, remote inference, the DHT, shard sessions and
    the direct lane's handshakes."""

    blob: BlobLimits = field(default_factory=BlobLimits)
    pipeline: PipelineLimits = field(default_factory=PipelineLimits)
    lane: LaneLimits = field(default_factory=LaneLimits)
    infer: InferLimits = field(default_factory=InferLimits)
    dht: DhtLimits = field(default_factory=DhtLimits)
