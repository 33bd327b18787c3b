"""Every decoder a peer's bytes reach, with known-good samples and its documented errors.

A target's ``build(scratch)`` returns a :class:`Harness`: samples to mutate, the check that
feeds one input to the decoder, and the exception types that decoder documents. Anything
else it raises (or a hang, or running out of memory) is a crash. A one-byte ``prefix``
picks a sub-decoder where a module has several (``Q`` request, ``P`` response, ...), so
mutations that change it also mix the decoders' inputs.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fuzz.mutators import Sample

ED25519_SEED = bytes(range(32))
NOW = 1_700_000_000.0


@dataclass
class Harness:
    samples: list[Sample]
    allowed: tuple[type[BaseException], ...]
    check: Callable[[bytes], None] | None = None
    acheck: Callable[[bytes], Awaitable[None]] | None = None  # run inside one trio.run


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(ED25519_SEED)


def _peer_id() -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from p2pedge.records.peer_ids import peer_id_from_ed25519

    return peer_id_from_ed25519(_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _split(data: bytes) -> list[bytes]:
    """Deterministic chunking, so stream decoders also see frames cut across reads."""
    if len(data) < 3:
        return [data]
    a, b = len(data) // 3, 2 * len(data) // 3 + (data[0] % 5)
    return [data[:a], data[a:b], data[b:]]


# -- wire ---------------------------------------------------------------------------------


def wire_framing(scratch: Path) -> Harness:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.wire.framing import FrameDecoder

    def check(data: bytes) -> None:
        decoder = FrameDecoder(4096, min_frame=data[0] % 4 if data else 0)
        for piece in _split(data):
            frames = decoder.feed(piece)
            assert all(len(f) <= 4096 for f in frames), "frame over its limit"
            assert decoder.buffered <= 4096 + 4, "buffered more than one frame"

    frames = [b"", b"x", b"y" * 100, b"z" * 4096]
    samples = [Sample(b"".join(struct.pack(">I", len(f)) + f for f in frames))]
    samples += [Sample(f, framed=True) for f in frames]
    return Harness(samples, (RemoteProtocolError,), check)


def wire_tensors(scratch: Path) -> Harness:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.wire.messages import unpack
    from p2pedge.wire.tensors import TensorLimits, decode_tensor, encode_tensor

    limits = TensorLimits(max_bytes=1 << 16, max_dim=1 << 12)

    def check(data: bytes) -> None:
        array = decode_tensor(unpack(data, 1 << 17), limits)
        assert array.nbytes <= limits.max_bytes

    arrays: list[np.ndarray[Any, Any]] = [
        np.zeros((1, 3, 4), np.float32),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.ones((2,), np.float16),
        np.zeros((0, 4), np.int32),
    ]
    samples = [Sample(_pack(encode_tensor(a)), "msgpack") for a in arrays]
    return Harness(samples, (RemoteProtocolError,), check)


# -- protocol codecs ----------------------------------------------------------------------


def blob_codec(scratch: Path) -> Harness:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.protocols.blob import codec

    def check(data: bytes) -> None:
        tag, body = data[:1], data[1:]
        if tag == b"Q":
            codec.decode_request(body)
        elif tag == b"P":
            codec.decode_response(body)
        elif tag == b"F":
            decoder = codec.RequestDecoder()
            for piece in _split(body):
                decoder.feed(piece)
        else:
            response_decoder = codec.ResponseDecoder()
            for piece in _split(body):
                response_decoder.feed(piece)

    requests = [
        codec.encode_request(codec.ChunkRequest("ab" * 32, 3, 4096)),
        _pack({"op": "manifest", "model": "tiny@1"}),
    ]
    responses = [
        codec.encode_response(codec.DataResponse(b"d" * 100)),
        codec.encode_response(codec.ErrorResponse("busy", "full", "blob.bytes", "source")),
        codec.encode_response(codec.ErrorResponse("not_found", "no")),
    ]
    samples = [Sample(r, "msgpack", b"Q") for r in requests]
    samples += [Sample(r, "msgpack", b"P") for r in responses]
    samples += [Sample(r, "msgpack", b"F", framed=True) for r in requests]
    samples += [Sample(r, "msgpack", b"R", framed=True) for r in responses]
    return Harness(samples, (RemoteProtocolError,), check)


def pipeline_codec(scratch: Path) -> Harness:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.protocols.pipeline import codec
    from p2pedge.protocols.pipeline.sampling import SamplingSpec
    from p2pedge.wire.tensors import TensorLimits

    limits = TensorLimits(max_bytes=1 << 16, max_rank=3, max_dim=1 << 12)

    def check(data: bytes) -> None:
        decoder = codec.Decoder(1 << 16, limits)
        for piece in _split(data):
            decoder.feed(piece)

    peer = _peer_id()
    fwd = codec.Forward(peer, 7, b"k" * 16, 4)
    ring = codec.Ring((fwd, fwd), 5, 2, SamplingSpec(0.7, 5, 0.9, 42))
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    messages: list[Any] = [
        codec.Open(1, "tiny@1", 0, 4, 64, "float32", peer),
        codec.Opened(1, 9, 1024, b"k" * 16),
        codec.Step(2, 9, 0, x, 3, (fwd,), b"k" * 16, ring, 1),
        codec.Step(3, 9, 2, np.array([[1, 2]], dtype=np.int64)),
        codec.Output(2, 9, x),
        codec.Output(
            0, 9, np.array([[3.0, 2.0, 1.0]], np.float32), np.array([[4, 1, 7]]), 10, 4, 5
        ),
        codec.Close(4, 9),
        codec.Closed(4, 9),
        codec.Error(5, "budget", "full", "pipeline.sessions", "peer"),
    ]
    samples = [Sample(codec.encode(m)[4:], "msgpack", framed=True) for m in messages]
    return Harness(samples, (RemoteProtocolError,), check)


def infer_codec(scratch: Path) -> Harness:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.protocols.infer import codec
    from p2pedge.protocols.infer.machine import InferClient, InferServerMachine
    from p2pedge.wire.messages import unpack_map

    limits = codec.InferLimits()
    request = codec.InferRequest(7, "tiny@1", None, "hello", codec.GenParams(max_tokens=8))

    def check(data: bytes) -> None:
        msg = unpack_map(data, limits.max_request_bytes)
        if msg.get("t") == "infer":
            InferServerMachine(limits).receive_request(msg)
            return
        client = InferClient(request, limits=limits)
        client.start(0.0)
        client.receive({"t": "accepted", "id": 7, "queue": 0}, 0.0)
        client.receive(msg, 0.0)

    chat = codec.InferRequest(
        3,
        "tiny@1",
        (("system", "be brief"), ("user", "hi")),
        None,
        codec.GenParams(16, 0.7, 0.9, 40, 123, ("\n",)),
    )
    frames = [
        codec.encode_request(request),
        codec.encode_request(chat),
        codec.encode_piece(7, "hel"),
        codec.encode_done(7, codec.InferResult("hello", 3, 2, 0.1, 20.0, "stop", "cpu")),
        codec.encode_error(7, "busy", "queue full", limit="infer.queue_slots", scope="peer"),
        codec.encode_error(7, "bad_request", "no"),
    ]
    samples = [Sample(_pack(f), "msgpack") for f in frames]
    return Harness(samples, (RemoteProtocolError,), check)


def direct_codec(scratch: Path) -> Harness:
    from p2pedge.errors import RemoteProtocolError
    from p2pedge.protocols.direct import codec
    from p2pedge.protocols.direct.tls import FINGERPRINT_BYTES
    from p2pedge.wire.messages import unpack_map

    def check(data: bytes) -> None:
        tag, body = data[:1], data[1:]
        if tag == b"R":
            codec.decode_request(unpack_map(body, codec.MAX_TICKET_FRAME))
        elif tag == b"T":
            codec.decode_ticket(unpack_map(body, codec.MAX_TICKET_FRAME))
        else:  # what a stranger sends first on the lane's TCP port
            codec.hello_ticket(body[: codec.HELLO_PREFIX])
            codec.check_greeting(body[codec.HELLO_PREFIX :])

    asking = codec.encode_request(codec.TicketRequest("/p2pedge/pipeline/1.0.0"))
    ticket = codec.Ticket(4242, b"t" * 16, b"s" * codec.SECRET_BYTES, b"c" * FINGERPRINT_BYTES)
    samples = [
        Sample(_pack(asking), "msgpack", b"R"),
        Sample(_pack(codec.encode_ticket(ticket)), "msgpack", b"T"),
        Sample(_pack(codec.encode_ticket(codec.refusal("busy"))), "msgpack", b"T"),
        Sample(codec.hello_prefix(b"t" * 16) + codec.GREETING, prefix=b"H"),
    ]
    return Harness(samples, (RemoteProtocolError,), check)


# -- records and manifests ----------------------------------------------------------------


def card(scratch: Path) -> Harness:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from p2pedge.errors import InvalidRecord
    from p2pedge.records import card as cards

    key = _key()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def check(data: bytes) -> None:
        tag, body = data[:1], data[1:]
        if tag == b"B":  # a body we sign: its fields reach every check after the signature
            data = _pack({"body": body, "sig": key.sign(body)})
        else:
            data = body
        cards.verify_card(data, NOW + 1, cards.card_key(_peer_id()) if tag == b"K" else None)

    good = cards.CapabilityCard(
        peer_id=_peer_id(),
        public_key=public,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        software_version="0.1.0",
        os="linux",
        arch="x86_64",
        cpu_cores=2,
        ram_total=24 << 30,
        ram_available=20 << 30,
        accelerators=(),
        execution_providers=("CPUExecutionProvider",),
        compute_gflops=50.0,
        models=(cards.CachedModel("smollm2@1", "ab" * 32),),
        layers_served=(cards.ServedLayers("smollm2@1", 0, 10),),
        load=0.25,
        issued_at=NOW,
        expires_at=NOW + 180,
        extra={"lane": 1},
    )
    record = cards.sign_card(good, key)
    body = msgpack.unpackb(record, raw=False)["body"]
    samples = [
        Sample(record, "msgpack", b"R"),
        Sample(record, "msgpack", b"K"),
        Sample(body, "msgpack", b"B"),
    ]
    return Harness(samples, (InvalidRecord,), check)


def _tiny_model_dir(scratch: Path) -> Path:
    folder = scratch / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 20)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "config.json").write_bytes(b'{"x": 1}')
    return folder


def models_manifest(scratch: Path) -> Harness:
    from p2pedge.errors import IntegrityError
    from p2pedge.ids import ModelId
    from p2pedge.models.keys import TrustStore, public_key_hex
    from p2pedge.models.manifest import build_manifest, load_verified, parse_manifest

    key = _key()
    trust = TrustStore([public_key_hex(key)])
    manifest = build_manifest(
        _tiny_model_dir(scratch), ModelId("tiny", "1"), "llm", key, tags=["t"], chunk_size=1024
    )

    def check(data: bytes) -> None:
        parsed = parse_manifest(data)
        if data[:1] == b"{":
            load_verified(data, trust, ModelId("tiny", "latest"))
        assert parsed.model.name

    return Harness([Sample(manifest.to_bytes(), "json")], (IntegrityError,), check)


def runtime_manifest(scratch: Path) -> Harness:
    from p2pedge.errors import ModelLoadError
    from p2pedge.runtime.manifest import GENAI_CONFIG, MANIFEST, read_manifest

    folder = scratch / "runtime-model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"")
    genai = {"model": {"context_length": 2048, "vocab_size": 49152, "decoder": {
        "filename": "model.onnx", "num_hidden_layers": 30}}}  # fmt: skip
    tensor = {"kind": "tensor", "file": "model.onnx", "inputs": [
        {"name": "x", "dtype": "float32", "shape": [1, "n", 4]}], "outputs": [
        {"name": "y", "dtype": "int64", "shape": None}]}  # fmt: skip
    decoder = {"kind": "decoder", "context_length": 2048, "vocab": 49152, "n_layers": 30}

    def check(data: bytes) -> None:
        tag, body = data[:1], data[1:]
        manifest, config = (body, json.dumps(genai).encode())
        if tag == b"G":
            manifest, config = json.dumps(decoder).encode(), body
        (folder / MANIFEST).write_bytes(manifest)
        (folder / GENAI_CONFIG).write_bytes(config)
        read_manifest(folder)

    samples = [
        Sample(json.dumps(tensor).encode(), "json", b"M"),
        Sample(json.dumps(decoder).encode(), "json", b"M"),
        Sample(json.dumps(genai).encode(), "json", b"G"),
    ]
    return Harness(samples, (ModelLoadError,), check)


def gguf_header(scratch: Path) -> Harness:
    import gguf

    from p2pedge.models.convert.gguf_header import GGUFFormatError, GGUFLimits, scan_header
    from p2pedge.models.convert.gguf_reader import read_gguf

    limits = GGUFLimits(max_items=1 << 12, max_array_len=1 << 10, max_string_bytes=1 << 12)
    tokens = ["<s>", "</s>", "a", "b", "ab", "c", "d", "cd"]
    metadata: dict[str, Any] = {
        "llama.block_count": 1, "llama.context_length": 32, "llama.embedding_length": 8,
        "llama.feed_forward_length": 8, "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": len(tokens), "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3] + [1] * 6,
        "tokenizer.ggml.merges": ["a b", "c d"], "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.chat_template": "{{ messages }}",
    }  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (8, 8), "output_norm.weight": (8,)}
    shapes |= {f"blk.0.{n}.weight": (8,) for n in ("attn_norm", "ffn_norm")}
    shapes |= {"blk.0.attn_q.weight": (8, 8), "blk.0.attn_output.weight": (8, 8)}
    shapes |= {f"blk.0.{n}.weight": (4, 8) for n in ("attn_k", "attn_v")}
    shapes |= {f"blk.0.{n}.weight": (8, 8) for n in ("ffn_gate", "ffn_up", "ffn_down")}
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

    def write(values: dict[str, Any]) -> bytes:
        path = scratch / "sample.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        for key, value in values.items():
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            else:
                writer.add_uint32(key, value)
        for name, array in weights.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()

    samples = [Sample(write(metadata))]
    # hostile seeds: each key given a value of another type (a string count, a NaN...)
    confusions: list[Any] = ["x", [1, 2], math.nan, True, 7, ["a"], [1.5]]
    for index, key in enumerate(metadata):
        wrong = [v for v in confusions if type(v) is not type(metadata[key])]
        samples.append(Sample(write(metadata | {key: wrong[index % len(wrong)]}), good=False))
    target = scratch / "input.gguf"

    def check(data: bytes) -> None:
        scan_header(data, limits)
        target.write_bytes(data)
        read_gguf(target, limits)

    return Harness(samples, (GGUFFormatError,), check)


def registry_requests(scratch: Path) -> Harness:
    from fuzz.registry_target import registry_requests as build

    return build(scratch)


TARGETS: dict[str, Callable[[Path], Harness]] = {
    "wire.framing": wire_framing,
    "wire.tensors": wire_tensors,
    "blob.codec": blob_codec,
    "pipeline.codec": pipeline_codec,
    "infer.codec": infer_codec,
    "direct.codec": direct_codec,
    "records.card": card,
    "models.manifest": models_manifest,
    "runtime.manifest": runtime_manifest,
    "gguf.header": gguf_header,
    "registry.requests": registry_requests,
}
