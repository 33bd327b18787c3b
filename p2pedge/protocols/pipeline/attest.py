"""A shard server's signature over each step it answers, so that evidence of a wrong
output proves to anyone what that server sent, and for which inputs.

Pure (hashlib and ``cryptography``'s Ed25519, both in C): no trio, no onnxruntime.

Every output a server sends carries ``sig``, its libp2p identity's Ed25519 signature over
:func:`reply_digest`, which binds

- the session: the model, the blocks and the server's session id (:func:`chain_seed`);
- the step's positions ``start .. end``;
- the *input chain* at ``end``: a running SHA-256 over every input row the session has
  computed, position by position from 0 (:class:`InputChain`; a rewound step restarts the
  chain at its start, as the server's KV cache does), so the signature names the whole
  input history the output depends on, not only the step's own rows;
- the output exactly as sent (dtype, shape and bytes of the hidden states or logits, the
  top-k ids, the vocabulary width and a ring's token: :func:`output_digest`).

The reply carries the chain value (``ic``) beside the signature, since a client does not
see what other servers push into a session; it checks the signature over it on receipt,
and a third party who holds the evidence's inputs recomputes the chain
(:func:`check_attested`). Every output is signed, so a server cannot sign only the steps
that will be checked (it never learns which are); a session whose server signed once
must sign every later output.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pedge.errors import LocalProtocolError
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline.codec import CHAIN_BYTES, SIG_BYTES

_TAG = b"p2pedge/pipeline/attest/1\0"
# byte-order-explicit names: ``dtype.name`` is slow on a cold cache (see wire/tensors.py)
_DTYPE = {
    np.dtype("<f4"): b"f4",
    np.dtype("<f2"): b"f2",
    np.dtype("<i8"): b"i8",
    np.dtype("<i4"): b"i4",
}

Signer = Callable[[bytes], bytes]


def chain_seed(model: str, layers: LayerRange, session: int) -> bytes:
    """Where a session's input chain starts: what the session is."""
    head = struct.pack("<IIQ", layers.start, layers.end, session)
    return hashlib.sha256(_TAG + b"seed" + head + model.encode()).digest()


class InputChain:
    """The running hash of a session's input rows, one 32-byte value per position.

    ``extend(start, x)`` forgets positions from ``start`` on (the server rewinds its cache
    there too) and hashes each row of ``x`` onto the value before it; the value at the
    last row is what the step's signature binds."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self._values = bytearray()

    @property
    def length(self) -> int:
        return len(self._values) // CHAIN_BYTES

    def at(self, end: int) -> bytes:
        """The chain over positions ``0 .. end`` (the seed for 0)."""
        if not 0 <= end <= self.length:
            raise LocalProtocolError(f"input chain holds {self.length} positions, not {end}")
        if end == 0:
            return self.seed
        return bytes(self._values[(end - 1) * CHAIN_BYTES : end * CHAIN_BYTES])

    def extend(self, start: int, x: npt.NDArray[Any]) -> bytes:
        """Hash ``x`` (``[1, n]`` token ids or ``[1, n, hidden]`` states) in from ``start``."""
        value = self.at(start)
        del self._values[start * CHAIN_BYTES :]
        rows = np.ascontiguousarray(x[0])
        sha = hashlib.sha256
        for i in range(rows.shape[0]):
            value = sha(value + rows[i].tobytes()).digest()
            self._values += value
        return value


def chain_of(seed: bytes, inputs: npt.NDArray[Any]) -> bytes:
    """The chain value over ``inputs`` (every position from 0, one row each)."""
    chain = InputChain(seed)
    return chain.extend(0, inputs[None]) if len(inputs) else seed


def _tensor(array: npt.NDArray[Any]) -> bytes:
    array = np.ascontiguousarray(array)
    name = _DTYPE.get(array.dtype)
    if name is None:
        raise LocalProtocolError(f"dtype {array.dtype} is not a wire dtype")
    shape = struct.pack(f"<B{array.ndim}Q", array.ndim, *array.shape)
    return name + shape + hashlib.sha256(array.data).digest()


def output_digest(
    y: npt.NDArray[Any],
    ids: npt.NDArray[Any] | None = None,
    vocab: int = 0,
    token: int | None = None,
) -> bytes:
    """The hash of an output as the wire carries it: the array, and for top-k logits their
    ids, the vocabulary width and a ring's picked token (-1 for none)."""
    parts = [_tensor(y)]
    if ids is not None:
        parts += [_tensor(ids), struct.pack("<Qq", vocab, -1 if token is None else token)]
    return hashlib.sha256(b"".join(parts)).digest()


def reply_digest(chain: bytes, start: int, end: int, output: bytes) -> bytes:
    """What a server signs for the step ``start .. end`` of a session (see the module)."""
    if len(chain) != CHAIN_BYTES or len(output) != 32:
        raise LocalProtocolError("chain and output digests are 32 bytes")
    return hashlib.sha256(_TAG + struct.pack("<QQ", start, end) + chain + output).digest()


def signature_ok(public_key: bytes, digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature over ``digest``."""
    if len(signature) != SIG_BYTES:
        return False
    try:
        _key(public_key).verify(signature, digest)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=256)
def _key(public_key: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key)


@dataclass(frozen=True, eq=False)
class Attested:
    """One signed reply, as evidence keeps it: enough for anyone holding the server's
    public key (its peer id embeds it) to check what the server sent and for what."""

    model: str
    layers: LayerRange
    session: int
    start: int
    end: int
    inputs: npt.NDArray[Any]  # the session's input rows at positions 0 .. end
    y: npt.NDArray[Any]  # the output as sent
    ids: npt.NDArray[Any] | None
    vocab: int
    token: int | None
    chain: bytes  # the input chain the server signed (``ic``)
    signature: bytes

    def digest(self) -> bytes:
        out = output_digest(self.y, self.ids, self.vocab, self.token)
        return reply_digest(self.chain, self.start, self.end, out)


def check_attested(record: Attested, public_key: bytes) -> str | None:
    """What is wrong with ``record`` as proof, or None when it proves that the holder of
    ``public_key`` sent output ``y`` for the session's inputs ``inputs``: the signature
    must verify over the record's fields, and the inputs must hash to the signed chain."""
    if not signature_ok(public_key, record.digest(), record.signature):
        return "the signature does not verify over this output"
    if record.inputs.shape[0] != record.end:
        return f"{record.inputs.shape[0]} input rows for a step ending at {record.end}"
    seed = chain_seed(record.model, record.layers, record.session)
    if chain_of(seed, record.inputs) != record.chain:
        return "the inputs are not those the server signed for"
    return None
