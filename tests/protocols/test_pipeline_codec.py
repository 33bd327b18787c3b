"""The pipeline codec: round trips, byte-by-byte feeding, trailing bytes, hostile input."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.sampling import SEED_BITS, SamplingSpec
from p2pedge.records.peer_ids import MAX_PEER_ID_CHARS, b58encode, is_peer_id, peer_id_from_ed25519
from p2pedge.wire.tensors import TensorLimits

A, B, PEER = (peer_id_from_ed25519(bytes([i]) * 32) for i in range(3))
MAX_SEED = (1 << SEED_BITS) - 1
HIDDEN = np.arange(2 * 8, dtype=np.float32).reshape(1, 2, 8)
KEY = bytes(range(codec.PUSH_KEY_BYTES))
MESSAGES: list[codec.Message] = [
    codec.Open(1, "tiny", 0, 4, 128, "float16"),
    codec.Opened(1, 7, 4096),
    codec.Step(2, 7, 3, HIDDEN),
    codec.Step(3, 7, 0, np.array([[1, 2, 3]], dtype=np.int64)),
    codec.Output(2, 7, HIDDEN.astype(np.float16)),
    codec.Close(4, 7),
    codec.Closed(4, 7),
    codec.Error(5, codec.E_BUDGET, "no room"),
    codec.Step(6, 7, 3, HIDDEN, top_k=5),
    codec.Output(
        6, 7, np.array([[3.0, 2.0, 1.0]], np.float32), np.array([[9, 4, 70]], np.int64), 100
    ),
    codec.Opened(7, 8, 4096, KEY),
    codec.Step(8, 7, 3, HIDDEN, 0, (codec.Forward(PEER, 9, KEY, 1),)),
    codec.Step(9, 9, 3, HIDDEN, 1, (), KEY),
    codec.Step(
        10,
        9,
        3,
        np.array([[5]], np.int64),
        0,
        (codec.Forward(B, 2, KEY, 1),),
        ring=codec.Ring((codec.Forward(A, 1, KEY), codec.Forward(B, 2, KEY, 1)), 7, 2),
        epoch=3,
    ),
    codec.Step(11, 9, 3, HIDDEN, 1, (), KEY, codec.Ring((codec.Forward(A, 1, KEY),), 1), 1),
    codec.Step(12, 9, 3, HIDDEN, ring=codec.Ring((codec.Forward(A, 1, KEY),), 2)),
    codec.Step(
        13,
        9,
        3,
        HIDDEN,
        ring=codec.Ring(
            (codec.Forward(A, 1, KEY),),
            2,
            sampling=SamplingSpec(0.7, 40, 0.9, (1 << SEED_BITS) - 1),
        ),
    ),
    codec.Output(14, 7, np.array([[3.0]], np.float32), np.array([[9]], np.int64), 100, token=42),
    codec.Open(15, "tiny", 4, 8, 128, next=B),
    codec.Error(16, codec.E_BUDGET, "full", "pipeline.sessions", "source"),
    codec.Open(17, "tiny", 4, 8, 128, next=b58encode(b"\x12\x20" + bytes(range(32)))),
]


def same(a: codec.Message, b: codec.Message) -> bool:
    if type(a) is not type(b):
        return False
    for key, value in vars(a).items():
        other = getattr(b, key)
        if isinstance(value, np.ndarray):
            if value.dtype != other.dtype or not np.array_equal(value, other):
                return False
        elif value != other:
            return False
    return True


def test_round_trip_whole_stream() -> None:
    data = b"".join(codec.encode(m) for m in MESSAGES)
    got = codec.Decoder().feed(data)
    assert len(got) == len(MESSAGES)
    assert all(same(a, b) for a, b in zip(MESSAGES, got, strict=True))


def test_byte_by_byte_feeding() -> None:
    decoder = codec.Decoder()
    got: list[codec.Message] = []
    for m in MESSAGES:
        frame = codec.encode(m)
        for i in range(len(frame)):
            out = decoder.feed(frame[i : i + 1])
            assert out == [] or i == len(frame) - 1
            got += out
    assert all(same(a, b) for a, b in zip(MESSAGES, got, strict=True))
    assert decoder.buffered == 0


def test_trailing_bytes_stay_buffered_until_complete() -> None:
    decoder = codec.Decoder()
    frame = codec.encode(MESSAGES[0])
    assert len(decoder.feed(frame + frame[:5])) == 1
    assert decoder.buffered == 5 - 4  # prefix consumed, one payload byte waiting
    assert len(decoder.feed(frame[5:])) == 1


def test_trailing_garbage_inside_a_frame_is_rejected() -> None:
    payload = msgpack.packb(codec.to_map(MESSAGES[5])) + b"\x00"
    with pytest.raises(RemoteProtocolError):
        codec.Decoder().feed(struct.pack(">I", len(payload)) + payload)


def test_oversized_frame_refused_from_prefix_alone() -> None:
    decoder = codec.Decoder(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack(">I", 1 << 30))


def test_tensor_size_checked_before_allocation() -> None:
    m = codec.to_map(MESSAGES[2])
    m["x"]["shape"] = [1, 1 << 19, 1 << 19]
    with pytest.raises(RemoteProtocolError, match=r"exceeds|bad dimension"):
        codec.from_map(m, TensorLimits(max_bytes=1 << 20, max_rank=3, max_dim=1 << 20))


BAD: list[tuple[str, Any]] = [
    ("t", "teleport"),
    ("rid", -1),
    ("rid", True),
    ("session", "7"),
    ("start", 1 << 40),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_bad_fields_are_remote_errors(key: str, value: Any) -> None:
    m = codec.to_map(MESSAGES[2])
    m[key] = value
    with pytest.raises(RemoteProtocolError):
        codec.from_map(m)


def test_bad_open_fields() -> None:
    base = codec.to_map(MESSAGES[0])
    for patch in ({"start": 4}, {"dtype": "bfloat16"}, {"model": "x" * 5000}, {"end": 0}):
        with pytest.raises(RemoteProtocolError):
            codec.from_map({**base, **patch})
    with pytest.raises(RemoteProtocolError, match="unknown error code"):
        codec.from_map({"t": "error", "rid": 1, "code": "oops", "message": ""})


def test_tensor_dtype_allow_list_and_byte_count() -> None:
    m = codec.to_map(MESSAGES[2])
    for patch in ({"dtype": "float64"}, {"data": m["x"]["data"][:-1]}, {"shape": [1, 2, 8, 1, 1]}):
        with pytest.raises(RemoteProtocolError):
            codec.from_map({**m, "x": {**m["x"], **patch}})


def test_local_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        codec.to_map(codec.Open(1, "m", 0, 1, 8, "bfloat16"))
    with pytest.raises(LocalProtocolError):
        codec.encode(codec.Step(1, 1, 0, np.zeros((1, 1024, 8), np.float32)), max_frame=64)


def test_as_wire_casts_hidden_only() -> None:
    assert codec.as_wire(HIDDEN, "float16").dtype == np.float16
    assert codec.as_wire(np.array([[1]], np.int32), "float16").dtype == np.int64


def test_top_k_names_the_argmax_and_ranks_ties_by_token_id() -> None:
    logits = np.array([[1.0, 5.0, 3.0, 5.0, -2.0, 3.0]], np.float32)
    values, ids = codec.top_k_of(logits, 1)
    assert ids.tolist() == [[1]] and values.tolist() == [[5.0]]
    values, ids = codec.top_k_of(logits, 4)
    assert ids.tolist() == [[1, 3, 2, 5]] and values.tolist() == [[5.0, 5.0, 3.0, 3.0]]
    assert codec.top_k_of(logits, 99)[1].shape == (1, 6)


@pytest.mark.parametrize("seed", range(5))
def test_sampling_from_top_k_logits_equals_sampling_from_all(seed: int) -> None:
    from p2pedge.protocols.pipeline.sampling import greedy, logits_needed, make_sampler

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, 500)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (0.8, 20, 1.0), (1.2, 40, 0.9)]:
        k = logits_needed(temperature, top_k)
        assert k > 0
        rebuilt = codec.full_logits(*codec.top_k_of(logits, k), 500)
        a, b = (
            make_sampler(temperature, top_k, seed, top_p),
            make_sampler(temperature, top_k, seed, top_p),
        )
        assert [a(logits[0], i) for i in range(20)] == [b(rebuilt[0], i) for i in range(20)]
        assert greedy(rebuilt[0], 0) == greedy(logits[0], 0)
    assert logits_needed(0.7, 0) == 0  # plain temperature sampling needs every logit


@pytest.mark.parametrize(
    ("ids", "values", "vocab"),
    [
        ([[1, 1]], [[2.0, 1.0]], 10),  # duplicate ids
        ([[1, 10]], [[2.0, 1.0]], 10),  # id outside the vocabulary
        ([[-1]], [[2.0]], 10),
        ([[1, 2]], [[2.0, float("nan")]], 10),
        ([[1, 2, 3]], [[2.0, 1.0]], 10),  # shapes differ
        ([[0, 1, 2]], [[3.0, 2.0, 1.0]], 2),  # more than the vocabulary
    ],
)
def test_hostile_top_k_replies_are_remote_errors(
    ids: list[list[int]], values: list[list[float]], vocab: int
) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.from_map(top_k_reply(ids, values, vocab))
    control = codec.from_map(top_k_reply([[1, 2]], [[2.0, 1.0]], 10))
    assert isinstance(control, codec.Output) and control.ids is not None


def top_k_reply(ids: list[list[int]], values: list[list[float]], vocab: int) -> dict[str, Any]:
    """An ``out`` map as a peer could send it, bypassing our own checks."""
    out = codec.to_map(codec.Output(1, 1, np.array(values, np.float32)))
    out["ids"] = codec.to_map(codec.Output(1, 1, np.array(ids, np.int64)))["y"]
    out["vocab"] = vocab
    return out


def test_top_k_request_limits() -> None:
    with pytest.raises(LocalProtocolError):
        codec.to_map(codec.Step(1, 1, 0, HIDDEN, top_k=codec.MAX_TOP_K + 1))
    raw = codec.to_map(codec.Step(1, 1, 0, HIDDEN, top_k=3))
    raw["k"] = -1
    with pytest.raises(RemoteProtocolError):
        codec.from_map(raw)


def _step_map(**extra: Any) -> dict[str, Any]:
    return codec.to_map(codec.Step(1, 7, 0, HIDDEN)) | extra


def _fwd(**changes: Any) -> dict[str, Any]:
    return {"peer": PEER, "session": 9, "key": KEY, "k": 0} | changes


@pytest.mark.parametrize(
    "extra",
    [
        {"key": b"short"},
        {"key": "not bytes"},
        {"fwd": []},
        {"fwd": "not a list"},
        {"fwd": [_fwd()] * (codec.MAX_FORWARDS + 1)},
        {"fwd": [_fwd(key=b"x" * 17)]},
        {"fwd": [_fwd(peer="")]},
        {"fwd": [_fwd(peer="p" * (MAX_PEER_ID_CHARS + 1))]},
        {"fwd": [_fwd(session=-1)]},
        {"fwd": [_fwd(k=codec.MAX_TOP_K + 1)]},
        {"fwd": ["not a map"]},
    ],
)
def test_hostile_push_fields_are_remote_errors(extra: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.from_map(_step_map(**extra))


NOT_PEER_IDS = [
    "",
    "p" * (MAX_PEER_ID_CHARS + 1),
    "12D3KooW0OIl",  # not base58: the audit's node-killing id
    "12D3KooWpeer",  # base58 and an identity multihash, but not of a public key
    b58encode(b"\x12\x20" + bytes(31)),  # sha2-256 multihash one byte short
    b58encode(b"\x00\x24" + bytes(35)),  # identity multihash one byte short
    b58encode(b"\x00\x30" + bytes(48)),  # identity multihash of a key too large to inline
    b58encode(b"\x13\x20" + bytes(32)),  # not sha2-256
]


@pytest.mark.parametrize("bad", [*NOT_PEER_IDS, 7, b"12D3KooW"])
def test_hostile_next_peer_in_open_is_a_remote_error(bad: object) -> None:
    opening = codec.to_map(codec.Open(1, "tiny", 0, 4, 128)) | {"next": bad}
    with pytest.raises(RemoteProtocolError, match="next"):
        codec.from_map(opening)


@pytest.mark.parametrize("bad", NOT_PEER_IDS)
def test_forward_peers_that_are_not_peer_ids_are_remote_errors(bad: str) -> None:
    for extra in ({"fwd": [_fwd(), _fwd(peer=bad)]}, {"ring": _ring(chain=[_fwd(peer=bad)])}):
        with pytest.raises(RemoteProtocolError, match="peer"):
            codec.from_map(_step_map(**extra))


def test_real_peer_ids_are_peer_ids() -> None:
    assert all(is_peer_id(p) for p in (A, B, "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"))
    assert not any(is_peer_id(p) for p in NOT_PEER_IDS)


@pytest.mark.parametrize(
    "extra",
    [{"limit": "x" * 65, "scope": "peer"}, {"limit": "q", "scope": "galaxy"}, {"limit": "q"}],
)
def test_hostile_busy_fields_are_remote_errors(extra: dict[str, Any]) -> None:
    error = codec.to_map(codec.Error(1, codec.E_BUDGET, "full")) | extra
    with pytest.raises(RemoteProtocolError):
        codec.from_map(error)


def test_too_many_forwards_is_a_local_error() -> None:
    many = tuple(codec.Forward(A, 1, KEY) for _ in range(codec.MAX_FORWARDS + 1))
    with pytest.raises(LocalProtocolError):
        codec.to_map(codec.Step(1, 7, 0, HIDDEN, 0, many))


def _spec(**changes: Any) -> dict[str, Any]:
    return {"t": 0.7, "k": 0, "p": 1.0, "seed": 1} | changes


def _ring(**changes: Any) -> dict[str, Any]:
    return {"chain": [_fwd()], "left": 3, "eos": 2} | changes


@pytest.mark.parametrize(
    "extra",
    [
        {"ring": "not a map"},
        {"ring": _ring(chain=[])},
        {"ring": _ring(chain=[_fwd(key=b"short")])},
        {"ring": _ring(chain=[_fwd()] * (codec.MAX_FORWARDS + 1))},
        {"ring": _ring(left=0)},
        {"ring": _ring(left=codec.MAX_LENGTH + 1)},
        {"ring": _ring(eos=-2)},
        {"ring": _ring(eos="2")},
        {"ring": {"chain": [_fwd()], "eos": 2}},
        {"ring": _ring(s="greedy")},
        {"ring": _ring(s=_spec(t=0.0))},
        {"ring": _ring(s=_spec(t=1e-300))},  # would overflow the logits: greedy instead
        {"ring": _ring(s=_spec(t=float("nan")))},
        {"ring": _ring(s=_spec(t=1000.0))},
        {"ring": _ring(s=_spec(t=1))},
        {"ring": _ring(s=_spec(p=0.0))},
        {"ring": _ring(s=_spec(p=1.5))},
        {"ring": _ring(s=_spec(k=-1))},
        {"ring": _ring(s=_spec(seed=2**64))},
        {"ring": _ring(s={"t": 0.7, "k": 0, "p": 1.0})},
        {"ep": -1},
        {"ep": "1"},
    ],
)
def test_hostile_ring_fields_are_remote_errors(extra: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.from_map(_step_map(**extra))


def test_a_ring_without_tokens_left_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        codec.to_map(codec.Step(1, 7, 0, HIDDEN, ring=codec.Ring((codec.Forward(A, 1, KEY),), 0)))


@pytest.mark.parametrize("tok", [-1, 100, "7"])
def test_a_named_token_outside_the_vocabulary_is_a_remote_error(tok: Any) -> None:
    out = codec.Output(1, 7, np.array([[3.0]], np.float32), np.array([[9]], np.int64), 100)
    with pytest.raises(RemoteProtocolError):
        codec.from_map(codec.to_map(out) | {"tok": tok})


def test_a_vanishing_temperature_picks_greedily() -> None:
    from p2pedge.protocols.pipeline.sampling import GREEDY, SamplingSpec, pick

    logits = np.array([[1.0, 7.5, -3.0, 7.4]], np.float32)
    tiny = SamplingSpec(temperature=1e-300, seed=3)
    assert tiny.greedy
    assert [pick(logits, tiny, q) for q in range(20)] == [pick(logits, GREEDY, 0)] * 20 == [1] * 20
    # the wire carries no spec for it: the server picks greedily too
    ring = codec.Ring((codec.Forward(A, 1, KEY),), 2, sampling=tiny)
    assert "s" not in codec.to_map(codec.Step(1, 1, 0, HIDDEN, ring=ring))["ring"]
