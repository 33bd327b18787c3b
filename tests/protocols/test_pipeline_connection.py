"""Opening a shard connection to a peer that never answers is a typed, recoverable error."""

import pytest
import trio
import trio.testing

from p2pedge.errors import PeerTimeout
from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.pipeline.client import HOP_ERRORS
from p2pedge.protocols.pipeline.connection import ShardConnection


async def hanging_opener(peer: str, protocol: str) -> FramedStream:
    """Fault injector: a peer whose stream negotiation never completes."""
    await trio.sleep_forever()
    raise AssertionError("unreachable")


def test_open_timeout_is_a_peer_timeout_the_client_recovers_from() -> None:
    async def main() -> None:
        start = trio.current_time()
        with pytest.raises(PeerTimeout) as caught:
            await ShardConnection.open(
                hanging_opener, "peer", "m", LayerRange(0, 2), 16, timeout=7.0
            )
        assert trio.current_time() - start == pytest.approx(7.0)
        assert isinstance(caught.value, HOP_ERRORS)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
