"""GGUF reader and importer on tiny synthetic files written with ``gguf.GGUFWriter``.

The files are built the way llama.cpp's converter builds them: HF-layout matrices whose Q/K
rows are permuted for interleaved rotary, quantised with ``gguf.quants``. The reader must
give back the HF layout exactly, and name the tensor at fault in every error.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import onnxruntime_genai as og
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.errors import ConfigError, ModelLoadError
from p2pedge.models.cli_import import main as cli_main
from p2pedge.models.convert.gguf_header import GGUFLimits, scan_file, scan_header
from p2pedge.models.convert.gguf_reader import GGUFFormatError, _rotary_rows, read_gguf
from p2pedge.models.convert.importer import import_gguf
from p2pedge.models.convert.layout import read_model_facts
from p2pedge.models.convert.weights import LlamaConfig, Q4_1Matrix, as_float

Q = gguf.GGMLQuantizationType
CFG = LlamaConfig(
    n_layers=2,
    hidden=64,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn=96,
    vocab=40,
    rope_base=100000.0,
    rms_eps=1e-5,
    context_length=256,
)
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *[chr(ord("a") + i) for i in range(26)]]
TOKENS += ["ab", "ba", "cd", "Ġ", "Ġa", "x1", "x2", "x3", "x4", "x5", "x6"]
MERGES = ["a b", "b a", "c d", "Ġ a"]
MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF converter does to Q/K rows (written independently of the reader)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
        "attn_q": (q, c.hidden),
        "attn_k": (kv, c.hidden),
        "attn_v": (kv, c.hidden),
        "attn_output": (c.hidden, q),
        "ffn_gate": (c.ffn, c.hidden),
        "ffn_up": (c.ffn, c.hidden),
        "ffn_down": (c.hidden, c.ffn),
    }


def write_tiny(
    path: Path,
    *,
    qtype: gguf.GGMLQuantizationType = Q.Q4_1,
    overrides: dict[str, np.ndarray] | None = None,
    drop: str | None = None,
    arch: str = "llama",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF; returns the HF-layout float weights it encodes."""
    rng = np.random.default_rng(seed)
    c = CFG
    hf: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((c.vocab, c.hidden))}
    hf["output_norm.weight"] = 1 + 0.1 * rng.standard_normal(c.hidden)
    for i in range(c.n_layers):
        hf[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(c.hidden)
        hf[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(c.hidden)
        for m, shape in hf_shapes(c).items():
            hf[f"blk.{i}.{m}.weight"] = 0.05 * rng.standard_normal(shape)
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.hidden)
    w.add_feed_forward_length(c.ffn)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_vocab_size(c.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{{ messages }}")
    for name, value in hf.items():
        if name == drop:
            continue
        data = value
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.n_heads if "attn_q" in name else c.n_kv_heads
            data = llama_cpp_permute(value, heads)
        if overrides and name in overrides:
            data = overrides[name]
        if data.ndim == 2 and name != "token_embd.weight" and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def roundtrip(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return x
    back = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    return np.asarray(back, dtype=np.float32).reshape(x.shape)


def test_config_and_tokenizer_facts(tmp_path: Path) -> None:
    write_tiny(tmp_path / "m.gguf")
    weights, tok = read_gguf(tmp_path / "m.gguf")
    assert weights.config == CFG
    assert tok.tokens == tuple(TOKENS)
    assert tok.merges == tuple(MERGES)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.special_ids == (0, 1, 2)
    assert (tok.model, tok.pre, tok.chat_template) == ("gpt2", "smollm", "{{ messages }}")
    assert weights.lm_head is None


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.F32, Q.Q8_0])
def test_matrices_come_back_in_hf_layout(tmp_path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    hf = write_tiny(tmp_path / "m.gguf", qtype=qtype)
    weights, _ = read_gguf(tmp_path / "m.gguf")
    for i, block in enumerate(weights.blocks):
        got = dict(
            zip(
                MATS,
                (block.wq, block.wk, block.wv, block.wo, block.w_gate, block.w_up, block.w_down),
                strict=True,
            )
        )
        for m, matrix in got.items():
            assert isinstance(matrix, Q4_1Matrix) == (qtype == Q.Q4_1)
            expected = roundtrip(hf[f"blk.{i}.{m}.weight"], qtype)
            np.testing.assert_array_equal(as_float(matrix), expected, err_msg=m)
        np.testing.assert_array_equal(block.attn_norm, hf[f"blk.{i}.attn_norm.weight"])


def test_q4_1_blocks_are_the_files_bytes(tmp_path: Path) -> None:
    write_tiny(tmp_path / "m.gguf")
    weights, _ = read_gguf(tmp_path / "m.gguf")
    tensor = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}[
        "blk.1.ffn_down.weight"
    ]
    mat = weights.blocks[1].w_down
    assert isinstance(mat, Q4_1Matrix)
    assert mat.quants.shape == (CFG.hidden, CFG.ffn // 32, 16)
    raw = np.asarray(tensor.data).reshape(CFG.hidden, CFG.ffn // 32, 20)
    np.testing.assert_array_equal(mat.quants, raw[..., 4:])
    np.testing.assert_array_equal(
        mat.scales, raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    )
    np.testing.assert_array_equal(mat.dequantize(), gguf.quants.dequantize(tensor.data, Q.Q4_1))


@given(st.integers(1, 6), st.sampled_from([2, 4, 8, 64]))
def test_rotary_rows_invert_llama_cpp_permute(n_head: int, head_dim: int) -> None:
    w = np.arange(n_head * head_dim * 3, dtype=np.float32).reshape(n_head * head_dim, 3)
    np.testing.assert_array_equal(llama_cpp_permute(w, n_head)[_rotary_rows(n_head, head_dim)], w)


def test_wrong_shape_tensor_is_named(tmp_path: Path) -> None:
    bad = np.zeros((CFG.n_kv_heads * CFG.head_dim + 32, CFG.hidden), np.float32)
    write_tiny(tmp_path / "m.gguf", overrides={"blk.1.attn_k.weight": bad})
    with pytest.raises(GGUFFormatError, match=r"blk\.1\.attn_k\.weight") as info:
        read_gguf(tmp_path / "m.gguf")
    assert info.value.tensor == "blk.1.attn_k.weight"
    assert isinstance(info.value, ModelLoadError)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    write_tiny(tmp_path / "m.gguf", drop="blk.0.ffn_up.weight")
    with pytest.raises(GGUFFormatError, match=r"blk\.0\.ffn_up\.weight.*missing"):
        read_gguf(tmp_path / "m.gguf")


def test_nan_norm_is_named(tmp_path: Path) -> None:
    nan = np.full(CFG.hidden, np.nan, np.float32)
    write_tiny(tmp_path / "m.gguf", overrides={"output_norm.weight": nan})
    with pytest.raises(GGUFFormatError, match=r"output_norm\.weight.*NaN"):
        read_gguf(tmp_path / "m.gguf")


def test_truncated_file_names_a_tensor(tmp_path: Path) -> None:
    write_tiny(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFFormatError, match="truncated") as info:
        read_gguf(tmp_path / "t.gguf")
    assert info.value.tensor is not None


@pytest.mark.parametrize("cut", [0, 3, 10, 200])
def test_truncated_header_or_garbage_is_typed(tmp_path: Path, cut: int) -> None:
    write_tiny(tmp_path / "m.gguf")
    (tmp_path / "t.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:cut])
    with pytest.raises(GGUFFormatError):
        read_gguf(tmp_path / "t.gguf")
    (tmp_path / "g.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFFormatError):
        read_gguf(tmp_path / "g.gguf")


def test_missing_file_and_wrong_architecture(tmp_path: Path) -> None:
    with pytest.raises(GGUFFormatError, match="no such"):
        read_gguf(tmp_path / "absent.gguf")
    write_tiny(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(GGUFFormatError, match="architecture"):
        read_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("variant", ["fp32", "lossless4"])
def test_import_writes_a_directory_genai_loads(tmp_path: Path, variant: str) -> None:
    write_tiny(tmp_path / "m.gguf")
    out = tmp_path / "models" / "tiny"
    for _ in range(2):  # a second import replaces the first in place
        assert (
            cli_main(
                [
                    str(tmp_path / "m.gguf"),
                    "--name",
                    "tiny",
                    "--variant",
                    variant,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no staging left
    facts = read_model_facts(out)
    assert (facts.variant, facts.n_layers, facts.vocab, facts.eos_token_id) == (variant, 2, 40, 2)
    assert facts.int8_activations == (variant == "lossless4")
    model = og.Model(str(out))
    assert [int(i) for i in og.Tokenizer(model).encode("abcd")] == [
        TOKENS.index("ab"),
        TOKENS.index("cd"),
    ]


def test_import_of_a_bad_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny(tmp_path / "m.gguf", drop="blk.1.attn_v.weight")
    out = tmp_path / "models" / "tiny"
    assert cli_main([str(tmp_path / "m.gguf"), "--name", "tiny", "--out", str(out)]) == 2
    assert "blk.1.attn_v.weight" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError):
        import_gguf(tmp_path / "m.gguf", out, "../escape")


# -- header bounds: crafted headers must fail fast, naming the key, before gguf parses them --


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", kind) + payload


def _array(item: int, count: int, body: bytes = b"") -> bytes:
    return struct.pack("<IQ", item, count) + body


def _tensor(name: str, dims: tuple[int, ...], kind: int = 0, offset: int = 0) -> bytes:
    packed = struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
    return _s(name) + packed + struct.pack("<IQ", kind, offset)


def _header(kvs: list[bytes], tensors: list[bytes] = (), **counts: int) -> bytes:  # type: ignore[assignment]
    n_tensors = counts.get("n_tensors", len(tensors))
    n_kv = counts.get("n_kv", len(kvs))
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)


SMALL = GGUFLimits(
    max_kv=8,
    max_tensors=4,
    max_key_bytes=32,
    max_string_bytes=64,
    max_array_len=100,
    max_items=150,
    max_name_bytes=16,
    max_dims=4,
    max_elements=1 << 20,
)
ARRAY, STRING, U8, U32 = 9, 8, 0, 4


@pytest.mark.parametrize(
    ("data", "match", "key"),
    [
        (
            _header([_kv("evil.count", ARRAY, _array(U8, 1 << 60, b"\0" * 8))]),
            "items exceeds",
            "evil.count",
        ),
        (
            _header([_kv("evil.short", ARRAY, _array(U32, 100, b"\0" * 8))]),
            "past the end",
            "evil.short",
        ),
        (
            _header([_kv("evil.strs", ARRAY, _array(STRING, 3, _s("a") + _s("b")))]),
            "ends inside",
            "evil.strs",
        ),
        (
            _header(
                [
                    _kv("a", ARRAY, _array(U8, 100, b"\0" * 100)),
                    _kv("b", ARRAY, _array(U8, 60, b"\0" * 60)),
                ]
            ),
            "in all",
            "b",
        ),
        (
            _header([_kv("evil.nest", ARRAY, _array(ARRAY, 1, _array(U8, 1, b"\0")))]),
            "not supported",
            "evil.nest",
        ),
        (_header([_kv("evil.type", 13, b"\0" * 8)]), "unknown value type", "evil.type"),
        (_header([_kv("evil.str", STRING, _s("x" * 65))]), "exceeds 64", "evil.str"),
        (_header([_kv("evil.str", STRING, struct.pack("<Q", 1 << 62))]), "exceeds 64", "evil.str"),
        (_header([_kv("twice", U8, b"\0"), _kv("twice", U8, b"\0")]), "appears twice", "twice"),
        (_header([], n_kv=9), "9 metadata keys exceed 8", None),
        (_header([], n_kv=1 << 63), "metadata keys exceed", None),
        (_header([], n_tensors=1 << 40), "tensors exceed", None),
        (_header([_s("k" * 33) + struct.pack("<I", U8) + b"\0"]), "exceeds 32", None),
        (_header([_s(b"\xff\xfe") + struct.pack("<I", U8) + b"\0"]), "not UTF-8", None),
        (b"GGUF" + struct.pack("<I", 1) + b"\0" * 16, "version 1", None),
        (b"GGUX" + b"\0" * 20, "bad magic", None),
    ],
)
def test_header_bounds_name_the_key(data: bytes, match: str, key: str | None) -> None:
    with pytest.raises(GGUFFormatError, match=match) as info:
        scan_header(data, SMALL)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (_tensor("t", (2, 2, 2, 2, 2)), "5 dimensions"),
        (_tensor("t", ()), "0 dimensions"),
        (_tensor("t", (1 << 30, 1 << 30)), "elements"),
        (_tensor("t", (4, 0)), "empty dimension"),
        (_tensor("t", (4,), kind=999), "unknown tensor type 999"),
        (_tensor("t", (4,), offset=1 << 50), "past the end"),
        (_tensor("t" * 17, (4,)), "exceeds 16"),
    ],
)
def test_tensor_info_bounds(tensor: bytes, match: str) -> None:
    with pytest.raises(GGUFFormatError, match=match):
        scan_header(_header([], [tensor]), SMALL)
    with pytest.raises(GGUFFormatError, match="appears twice") as info:
        scan_header(_header([], [_tensor("dup", (4,)), _tensor("dup", (4,))]), SMALL)
    assert info.value.tensor == "dup"


def test_absurd_array_count_fails_fast_before_gguf(tmp_path: Path) -> None:
    """The corruption that hung the gguf library for minutes: a truncated array, huge count."""
    path = tmp_path / "evil.gguf"
    write_tiny(path)
    data = path.read_bytes()
    evil = _kv("evil.array", ARRAY, _array(U8, (1 << 64) - 1))
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    path.write_bytes(data[:16] + struct.pack("<Q", n_kv + 1) + evil + data[24:])
    started = time.monotonic()
    with pytest.raises(GGUFFormatError, match="not a readable GGUF") as info:
        read_gguf(path)
    assert time.monotonic() - started < 2.0  # it is microseconds; gguf alone never returns
    assert info.value.key == "evil.array"


def test_a_real_header_passes_the_default_limits(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    write_tiny(path)
    header = scan_file(path)
    assert "tokenizer.ggml.tokens" in header.keys and "output_norm.weight" in header.tensors
    assert header.version == 3 and header.byte_order == "<"
    tight = GGUFLimits(max_array_len=len(TOKENS) - 1)
    with pytest.raises(GGUFFormatError, match="items exceeds") as info:
        read_gguf(path, tight)
    assert info.value.key == "tokenizer.ggml.tokens"
