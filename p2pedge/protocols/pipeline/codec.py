"""Messages of ``/p2pedge/pipeline/1.0.0``: typed dataclasses <-> msgpack maps.

Pure: no trio, no onnxruntime. Every field a peer sends is checked (type, range,
tensor limits) before anything is allocated from it; a violation is a
:class:`~p2pedge.errors.RemoteProtocolError`. Frames are the shared 4-byte length
prefix from :mod:`p2pedge.wire.framing`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.pipeline.sampling import GREEDY, SamplingSpec, spec_from
from p2pedge.records.peer_ids import is_peer_id
from p2pedge.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from p2pedge.wire.messages import pack, require, unpack_map
from p2pedge.wire.tensors import ALLOWED_DTYPES, TensorLimits, decode_tensor, encode_tensor

PROTOCOL_ID = "/p2pedge/pipeline/1.0.0"
MAX_FRAME = DEFAULT_MAX_FRAME
MAX_ID = (1 << 63) - 1
MAX_LENGTH = 1 << 20
WIRE_DTYPES = ("float32", "float16")
TENSOR_LIMITS = TensorLimits(max_bytes=MAX_FRAME, max_rank=3, max_dim=MAX_LENGTH)
MAX_TOP_K = 4096
MAX_VOCAB = 1 << 20

# Error codes a server may answer with; the client maps them to exceptions.
E_BAD_REQUEST = "bad_request"
E_UNSUPPORTED = "unsupported"
E_BUDGET = "budget"
E_UNKNOWN_SESSION = "unknown_session"
E_CLOSED = "session_closed"
E_EXPIRED = "session_expired"
E_BUSY = "busy"
E_INTERNAL = "internal"
ERROR_CODES = frozenset(
    {
        E_BAD_REQUEST,
        E_UNSUPPORTED,
        E_BUDGET,
        E_UNKNOWN_SESSION,
        E_CLOSED,
        E_EXPIRED,
        E_BUSY,
        E_INTERNAL,
    }
)
MAX_TEXT = 1024
PUSH_KEY_BYTES = 16
MAX_FORWARDS = 16
BUSY_SCOPES = frozenset({"", "peer", "source", "total"})
MAX_LIMIT_NAME = 64
NO_EOS = -1
SIG_BYTES = 64  # Ed25519 (see attest.py)
CHAIN_BYTES = 32


@dataclass(frozen=True)
class Forward:
    """Where a server pushes a step's output next (server-to-server push): the next
    server's peer id, the session the client opened there, that session's push key (from
    its ``opened``), and the top-k to ask of it."""

    peer: str
    session: int
    key: bytes
    top_k: int = 0


@dataclass(frozen=True)
class Ring:
    """Decode without the client in each token's loop: the last server picks the next
    token from its output as ``sampling`` says (greedy by default; see ``sampling.py``)
    and pushes it, as the next step, to ``chain[0]`` (every server of the chain, in
    order), so each token costs one hop less. ``left`` counts the tokens still to
    produce, this step's included; the ring stops after the last of them, or after
    ``eos`` (:data:`NO_EOS` for none)."""

    chain: tuple[Forward, ...]
    left: int
    eos: int = NO_EOS
    sampling: SamplingSpec = GREEDY

    def then(self) -> Ring:
        return dataclasses.replace(self, left=self.left - 1)


@dataclass(frozen=True)
class Open:
    """Ask for a session on ``[start, end)`` of ``model`` holding up to ``max_length`` tokens.

    ``next`` names the server this one will push to (the next hop, or round a ring the
    first), so that it can open that stream while the prompt is still being relayed.
    """

    rid: int
    model: str
    start: int
    end: int
    max_length: int
    dtype: str = "float32"
    next: str = ""


@dataclass(frozen=True)
class Opened:
    """``key`` lets the client's other servers push steps into this session."""

    rid: int
    session: int
    kv_bytes: int
    key: bytes = b""


@dataclass(frozen=True, eq=False)
class Step:
    """Run ``x`` at positions ``start .. start + n``; the server first rewinds its cache to
    ``start`` (so a resent step is idempotent). ``x`` is token ids ``int64 [1, n]`` for a
    first shard, hidden states ``[1, n, hidden]`` otherwise. ``top_k > 0`` asks a last
    shard for only the ``top_k`` largest logits (what greedy or top-k sampling needs: 4 bytes
    of 196 KB for SmolLM2's greedy token); 0 asks for all of them.

    ``fwd`` asks the server to push its output on to the next servers as a step (the first
    entry gets it, with the rest as its ``fwd``). A pushed step carries the target
    session's ``key``; its output goes to the session's owner with ``rid`` 0.

    ``ring`` goes along with the pushes (see :class:`Ring`). ``epoch`` is the client's ring
    count: a step the client sends itself raises the session's floor to it, and a pushed
    step from an older epoch is refused, so a ring the client gave up on cannot run on
    under the steps it sends instead."""

    rid: int
    session: int
    start: int
    x: npt.NDArray[Any]
    top_k: int = 0
    fwd: tuple[Forward, ...] = ()
    key: bytes = b""
    ring: Ring | None = None
    epoch: int = 0


@dataclass(frozen=True, eq=False)
class Output:
    """Hidden states ``[1, n, hidden]``, or last-position logits ``[1, vocab]`` (last shard).

    When the step asked for a top-k, ``y`` holds the ``k`` largest logits ``[1, k]``, ``ids``
    their token ids ``int64 [1, k]`` and ``vocab`` the full width (see :func:`full_logits`).
    A ring's last server also names the ``token`` it picked (and fed on, unless the ring
    ended there). The output of a pushed step (``rid`` 0) says where it starts (``at``), so
    the client can tell it from one of a step it already gave up waiting for.
    """

    rid: int
    session: int
    y: npt.NDArray[Any]
    ids: npt.NDArray[Any] | None = None
    vocab: int = 0
    token: int | None = None
    at: int | None = None
    sig: bytes = b""  # the server's signature over the step (see ``attest.py``)
    chain: bytes = b""  # the session's input chain the signature binds


@dataclass(frozen=True)
class Close:
    rid: int
    session: int


@dataclass(frozen=True)
class Closed:
    rid: int
    session: int


@dataclass(frozen=True)
class Error:
    """A refused request. A quota's refusal (code ``budget``) names the ``limit`` and the
    ``scope`` (peer, source or total) that ran out, as :class:`~p2pedge.errors.Busy` does."""

    rid: int
    code: str
    message: str = field(default="")
    limit: str = ""
    scope: str = ""


Message = Open | Opened | Step | Output | Close | Closed | Error
Request = Open | Step | Close
Reply = Opened | Output | Closed | Error


def _tensor(array: npt.NDArray[Any]) -> dict[str, Any]:
    return encode_tensor(array)


def _forward_maps(fwd: tuple[Forward, ...]) -> list[dict[str, Any]]:
    if len(fwd) > MAX_FORWARDS:
        raise LocalProtocolError(f"{len(fwd)} forwards; at most {MAX_FORWARDS}")
    return [{"peer": f.peer, "session": f.session, "key": f.key, "k": f.top_k} for f in fwd]


def _spec_map(spec: SamplingSpec) -> dict[str, Any]:
    return {
        "t": float(spec.temperature),
        "k": spec.top_k,
        "p": float(spec.top_p),
        "seed": spec.seed,
    }


def to_map(msg: Message) -> dict[str, Any]:
    """The msgpack map for ``msg`` (what :class:`FramedStream.send` takes)."""
    match msg:
        case Open():
            if msg.dtype not in WIRE_DTYPES:
                raise LocalProtocolError(f"wire dtype {msg.dtype!r} not supported")
            opening = {
                "t": "open",
                "rid": msg.rid,
                "model": msg.model,
                "start": msg.start,
                "end": msg.end,
                "max_length": msg.max_length,
                "dtype": msg.dtype,
            }
            return opening | {"next": msg.next} if msg.next else opening
        case Opened():
            opened = {"t": "opened", "rid": msg.rid, "session": msg.session, "kv": msg.kv_bytes}
            return opened | {"key": msg.key} if msg.key else opened
        case Step():
            if not 0 <= msg.top_k <= MAX_TOP_K:
                raise LocalProtocolError(f"top_k {msg.top_k} outside [0, {MAX_TOP_K}]")
            step = {
                "t": "step",
                "rid": msg.rid,
                "session": msg.session,
                "start": msg.start,
                "x": _tensor(msg.x),
            }
            if msg.top_k:
                step["k"] = msg.top_k
            if msg.fwd:
                step["fwd"] = _forward_maps(msg.fwd)
            if msg.key:
                step["key"] = msg.key
            if msg.ring is not None:
                if not msg.ring.chain or not 1 <= msg.ring.left <= MAX_LENGTH:
                    raise LocalProtocolError(f"bad ring {msg.ring!r}")
                ring = msg.ring
                step["ring"] = {
                    "chain": _forward_maps(ring.chain),
                    "left": ring.left,
                    "eos": ring.eos,
                    **({"s": _spec_map(ring.sampling)} if not ring.sampling.greedy else {}),
                }
            if msg.epoch:
                step["ep"] = msg.epoch
            return step
        case Output():
            out = {"t": "out", "rid": msg.rid, "session": msg.session, "y": _tensor(msg.y)}
            if msg.ids is not None:
                out |= {"ids": _tensor(msg.ids), "vocab": msg.vocab}
                if msg.token is not None:
                    out["tok"] = msg.token
            if msg.at is not None:
                out["at"] = msg.at
            if msg.sig:
                out |= {"sig": msg.sig, "ic": msg.chain}
            return out
        case Close():
            return {"t": "close", "rid": msg.rid, "session": msg.session}
        case Closed():
            return {"t": "closed", "rid": msg.rid, "session": msg.session}
        case Error():
            error = {"t": "error", "rid": msg.rid, "code": msg.code, "message": msg.message}
            return error | {"limit": msg.limit, "scope": msg.scope} if msg.limit else error
    raise LocalProtocolError(f"not a pipeline message: {msg!r}")


def _int(m: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_ID) -> int:
    value: int = require(m, key, int)
    if not lo <= value <= hi:
        raise RemoteProtocolError(f"field {key!r}={value} outside [{lo}, {hi}]")
    return value


def _str(m: dict[str, Any], key: str) -> str:
    value: str = require(m, key, str)
    if len(value) > MAX_TEXT:
        raise RemoteProtocolError(f"field {key!r} is longer than {MAX_TEXT} characters")
    return value


def _key(m: dict[str, Any]) -> bytes:
    value: bytes = require(m, "key", bytes)
    if len(value) != PUSH_KEY_BYTES:
        raise RemoteProtocolError(f"push key must be {PUSH_KEY_BYTES} bytes, got {len(value)}")
    return value


def _peer(m: dict[str, Any], field: str) -> str:
    """An optional peer id ('' when absent) that must be a real one (:func:`is_peer_id`)."""
    if field not in m:
        return ""
    peer = _str(m, field)
    if not is_peer_id(peer):
        raise RemoteProtocolError(f"{field!r} is not a base58 libp2p peer id")
    return peer


def _forwards(value: Any) -> tuple[Forward, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_FORWARDS:
        raise RemoteProtocolError(f"fwd must be a list of 1 to {MAX_FORWARDS} entries")
    out = []
    for entry in value:
        if not isinstance(entry, dict):
            raise RemoteProtocolError("fwd entries must be maps")
        peer = _peer(entry, "peer")
        if not peer:
            raise RemoteProtocolError("fwd entries need a peer id")
        out.append(
            Forward(peer, _int(entry, "session"), _key(entry), _int(entry, "k", 0, MAX_TOP_K))
        )
    return tuple(out)


def _ring(value: Any) -> Ring:
    if not isinstance(value, dict):
        raise RemoteProtocolError("ring must be a map")
    return Ring(
        _forwards(value.get("chain")),
        _int(value, "left", 1, MAX_LENGTH),
        _int(value, "eos", NO_EOS, MAX_VOCAB),
        _spec(value["s"]) if "s" in value else GREEDY,
    )


def _spec(value: Any) -> SamplingSpec:
    if not isinstance(value, dict):
        raise RemoteProtocolError("ring sampling must be a map")
    try:  # the one set of ranges, shared with local generation and the infer protocol
        return spec_from(value.get("t"), value.get("k"), value.get("p"), value.get("seed"))
    except ValueError as exc:
        raise RemoteProtocolError(f"ring sampling: {exc}") from exc


def from_map(m: dict[str, Any], limits: TensorLimits = TENSOR_LIMITS) -> Message:
    """Validate a decoded map from a peer and build the typed message."""
    kind = _str(m, "t")
    rid = _int(m, "rid")
    if kind == "open":
        start, end = _int(m, "start", 0, MAX_LENGTH), _int(m, "end", 1, MAX_LENGTH)
        if start >= end:
            raise RemoteProtocolError(f"empty layer range [{start}, {end})")
        dtype = _str(m, "dtype")
        if dtype not in WIRE_DTYPES:
            raise RemoteProtocolError(f"wire dtype {dtype!r} not supported")
        max_length = _int(m, "max_length", 1, MAX_LENGTH)
        return Open(rid, _str(m, "model"), start, end, max_length, dtype, _peer(m, "next"))
    if kind == "opened":
        return Opened(rid, _int(m, "session"), _int(m, "kv"), _key(m) if "key" in m else b"")
    if kind == "step":
        x = decode_tensor(m.get("x"), limits)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            # refused before it runs, session intact: the hop that made it takes the blame
            raise RemoteProtocolError("step input is not finite")
        return Step(
            rid,
            _int(m, "session"),
            _int(m, "start", 0, MAX_LENGTH),
            x,
            _int(m, "k", 0, MAX_TOP_K) if "k" in m else 0,
            _forwards(m["fwd"]) if "fwd" in m else (),
            _key(m) if "key" in m else b"",
            _ring(m["ring"]) if "ring" in m else None,
            _int(m, "ep") if "ep" in m else 0,
        )
    if kind == "out":
        y = decode_tensor(m.get("y"), limits)
        at = _int(m, "at", 0, MAX_LENGTH) if "at" in m else None
        sig, chain = _signed(m)
        if "ids" not in m:
            return Output(rid, _int(m, "session"), y, at=at, sig=sig, chain=chain)
        ids, vocab = decode_tensor(m.get("ids"), limits), _int(m, "vocab", 1, MAX_VOCAB)
        _check_top_k(y, ids, vocab)
        token = _int(m, "tok", 0, vocab - 1) if "tok" in m else None
        return Output(rid, _int(m, "session"), y, ids, vocab, token, at, sig, chain)
    if kind == "close":
        return Close(rid, _int(m, "session"))
    if kind == "closed":
        return Closed(rid, _int(m, "session"))
    if kind == "error":
        code = _str(m, "code")
        if code not in ERROR_CODES:
            raise RemoteProtocolError(f"unknown error code {code!r}")
        if "limit" not in m:
            return Error(rid, code, _str(m, "message"))
        limit, scope = _str(m, "limit"), _str(m, "scope")
        if len(limit) > MAX_LIMIT_NAME or scope not in BUSY_SCOPES:
            raise RemoteProtocolError(f"bad limit {limit[:MAX_LIMIT_NAME]!r} or scope {scope!r}")
        return Error(rid, code, _str(m, "message"), limit, scope)
    raise RemoteProtocolError(f"unknown message type {kind!r}")


def _signed(m: dict[str, Any]) -> tuple[bytes, bytes]:
    """An output's signature and the input chain it binds (both or neither)."""
    if "sig" not in m and "ic" not in m:
        return b"", b""
    sig, chain = require(m, "sig", bytes), require(m, "ic", bytes)
    if len(sig) != SIG_BYTES or len(chain) != CHAIN_BYTES:
        raise RemoteProtocolError(f"signature of {len(sig)} bytes or chain of {len(chain)}")
    return sig, chain


def _check_top_k(values: npt.NDArray[Any], ids: npt.NDArray[Any], vocab: int) -> None:
    if values.ndim != 2 or values.shape[0] != 1 or values.dtype != np.float32:
        raise RemoteProtocolError(f"top-k logits must be float32 [1, k], got {values.shape}")
    if ids.shape != values.shape or ids.dtype != np.int64:
        raise RemoteProtocolError(f"top-k ids must be int64 {list(values.shape)}")
    k = values.shape[1]
    if not 1 <= k <= min(MAX_TOP_K, vocab):
        raise RemoteProtocolError(f"top-k of {k} logits outside [1, {min(MAX_TOP_K, vocab)}]")
    # Python over at most MAX_TOP_K items: numpy's reductions are slow cold (hop_cold.py)
    id_list = ids.ravel().tolist()
    if min(id_list) < 0 or max(id_list) >= vocab or len(set(id_list)) != k:
        raise RemoteProtocolError(f"top-k ids must be distinct and in [0, {vocab})")
    if not all(map(math.isfinite, values.ravel().tolist())):
        raise RemoteProtocolError("top-k logits must be finite")


def top_k_of(
    logits: npt.NDArray[Any], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The ``k`` largest of last-position logits ``[1, vocab]``, largest first.

    Ties rank by lower token id, so ``k == 1`` names exactly the token ``np.argmax`` picks.
    """
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    k = min(k, row.size)
    if k == 1:
        ids = np.array([int(row.argmax())], dtype=np.int64)
    else:
        part = np.argpartition(row, row.size - k)[row.size - k :]
        ids = part[np.lexsort((part, -row[part]))].astype(np.int64)
    return row[ids][None], ids[None]


def full_logits(
    values: npt.NDArray[Any], ids: npt.NDArray[Any], vocab: int
) -> npt.NDArray[np.float32]:
    """A ``[1, vocab]`` logits row holding ``values`` at ``ids`` and -inf elsewhere.

    Greedy and top-k sampling over it pick what they would pick over the full row.
    """
    row = np.full(vocab, -np.inf, dtype=np.float32)
    row[ids.reshape(-1)] = values.reshape(-1)
    return row[None]


def encode(msg: Message, max_frame: int = MAX_FRAME) -> bytes:
    """One whole frame (length prefix included)."""
    return encode_frame(pack(to_map(msg)), max_frame)


class Decoder:
    """Bytes in, typed messages out; limits are checked before a frame is buffered."""

    def __init__(self, max_frame: int = MAX_FRAME, limits: TensorLimits = TENSOR_LIMITS) -> None:
        self._frames = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._limits = limits

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def feed(self, data: bytes) -> list[Message]:
        return [
            from_map(unpack_map(f, self._max_frame), self._limits) for f in self._frames.feed(data)
        ]


def as_wire(array: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """Cast hidden states to the session's wire dtype (token ids stay int64)."""
    want = ALLOWED_DTYPES["int64" if array.dtype.kind in "iu" else dtype]
    return np.ascontiguousarray(array, dtype=want)
