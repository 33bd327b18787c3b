"""A hop whose output has another width than the chain's fails itself: the client does
not pass a wrong-width hidden state on, where it would break (and be blamed on) the next
hop, nor take logits over another vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from p2pedge.errors import RemoteProtocolError
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline.chain import ClientConfig, HopFailed, HopState
from p2pedge.protocols.pipeline.client_machine import ClientMachine
from p2pedge.protocols.pipeline.hop_machine import HopMachine
from p2pedge.records.peer_ids import peer_id_from_ed25519

A, B = (peer_id_from_ed25519(bytes([i]) * 32) for i in range(2))


class Link:
    def __init__(self, machine: HopMachine) -> None:
        self.machine = machine
        self.peer = machine.peer


def chain(config: ClientConfig) -> ClientMachine:
    m = ClientMachine(config)
    hops = [HopMachine(A, LayerRange(0, 1)), HopMachine(B, LayerRange(1, 2))]
    m.started([HopState(Link(h)) for h in hops])  # type: ignore[arg-type]
    m.boundaries[0].write(0, np.array([1, 2], np.int64))
    return m


def test_hidden_width_is_pinned_by_the_first_hop_output() -> None:
    m = chain(ClientConfig())
    m.accept(0, np.zeros((1, 1, 8), np.float32), 0, 1, 2)
    with pytest.raises(HopFailed) as failed:
        m.accept(0, np.zeros((1, 1, 9), np.float32), 1, 2, 2)
    assert failed.value.peer == A and isinstance(failed.value.cause, RemoteProtocolError)
    assert "hidden width 9" in str(failed.value.cause)


def test_known_widths_refuse_the_first_wrong_output() -> None:
    m = chain(ClientConfig(hidden_size=8, vocab_size=11))
    with pytest.raises(HopFailed, match="hidden width 7"):
        m.accept(0, np.zeros((1, 2, 7), np.float32), 0, 2, 2)
    m.accept(0, np.zeros((1, 2, 8), np.float32), 0, 2, 2)
    with pytest.raises(HopFailed) as failed:
        m.accept(1, np.zeros((1, 2), np.float32), 0, 2, 2)  # two logits, not eleven
    assert failed.value.peer == B and "vocab width 2" in str(failed.value.cause)
    m.accept(1, np.zeros((1, 11), np.float32), 0, 2, 2)
    assert m.last_logits is not None and m.last_logits.shape == (11,)
