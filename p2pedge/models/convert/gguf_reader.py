"""Read a llama.cpp GGUF file into :class:`LlamaWeights` and :class:`TokenizerFacts`.

Only the ``gguf`` package and numpy are used (no torch). Quantised matrices stay as their
integer quants (:mod:`.quants`: the ONNX builder maps them losslessly onto ``MatMulNBits``);
a tensor type that cannot be mapped is refused from the tensor infos before any weight is
read. For ``llama``, llama.cpp's converter permutes the rows of Q and K inside each head
for its interleaved rotary; we undo that so weights use the HF rotate-half layout. ``phi3``
fuses Q/K/V and gate/up into one tensor each, split here by rows; ``gemma2``/``gemma3``
add post norms, Q/K norms (gemma3) and the hyper-parameters of :func:`_gemma`.

A file is untrusted input. Before the ``gguf`` library sees it, :mod:`.gguf_header` walks
the header with :class:`GGUFLimits` on every count and size (the library loops over an
array's claimed length even past the end of the file; one absurd count hung it for minutes),
and metadata values must have the types we read them as. Every tensor's extent is checked
against the file size before it is mapped, shapes are checked against the header's
hyper-parameters, and every failure is a :class:`GGUFFormatError` that names the tensor or
key at fault.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from p2pedge.models.convert import quants
from p2pedge.models.convert.gguf_header import (
    DEFAULT_LIMITS,
    scan_file,
)
from p2pedge.models.convert.gguf_header import GGUFFormatError as GGUFFormatError
from p2pedge.models.convert.gguf_header import GGUFLimits as GGUFLimits
from p2pedge.models.convert.weights import (
    F32,
    LlamaBlock,
    LlamaConfig,
    LlamaWeights,
    Matrix,
    Q4_1Matrix,
    Table,
)

_NUMBER = (int, float)


ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3")


@dataclass(frozen=True)
class TokenizerFacts:
    """What a GGUF says about its tokenizer: enough to rebuild a HF ``tokenizer.json``."""

    model: str  # "gpt2" = byte-level BPE
    pre: str  # llama.cpp pre-tokenizer name, e.g. "smollm"
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # llama.cpp: 1 normal, 2 unknown, 3 control, 4 user, 6 byte
    merges: tuple[str, ...]  # "left right"
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None
    scores: tuple[float, ...] = ()  # SentencePiece piece scores (GGUF "llama" model)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Control and user-defined tokens: never split by the BPE model."""
        return tuple(i for i, kind in enumerate(self.token_types) if kind in (3, 4))


class _CheckedReader(gguf.GGUFReader):  # type: ignore[misc]
    """``GGUFReader`` that refuses tensors reaching past the end of the file, by name."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        file_size = len(self.data)
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError as exc:
                raise GGUFFormatError(f"unknown tensor type {int(raw_dtype[0])}", name) from exc
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(dims.astype(np.uint64), dtype=np.uint64))
            if n_elems % block:
                raise GGUFFormatError(f"{n_elems} elements is not a multiple of {block}", name)
            end = int(start_offs) + int(offset_tensor[0]) + n_elems // block * type_size
            if end > file_size:
                raise GGUFFormatError(
                    f"data ends at byte {end} but the file has {file_size} (truncated?)", name
                )
        super()._build_tensors(start_offs, fields)


def _open(path: Path, limits: GGUFLimits) -> Any:
    if not path.is_file():
        raise GGUFFormatError(f"no such GGUF file: {path}")
    scan_file(path, limits)
    try:
        return _CheckedReader(path)
    except GGUFFormatError:
        raise
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise GGUFFormatError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(
    reader: Any,
    key: str,
    default: Any = None,
    *,
    required: bool = False,
    kind: type | tuple[type, ...] = object,
    items: type | tuple[type, ...] | None = None,
) -> Any:
    """A metadata value of type ``kind`` (a list of ``items``); floats must be finite.

    The file chooses each value's type, so an ``int()`` of a string, a list or a NaN would
    otherwise raise an untyped error far from the key at fault (found by fuzzing).
    """
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFFormatError(f"metadata key {key!r} is missing")
        return default
    try:
        value = field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise GGUFFormatError(f"metadata key {key!r} is unreadable: {exc}") from exc
    for item in value if items is not None and isinstance(value, list) else [value]:
        want = items if items is not None and item is not value else kind
        if not _is(item, want):
            raise GGUFFormatError(f"holds a {type(item).__name__}", key=key)
    if items is not None and not isinstance(value, list):
        raise GGUFFormatError(f"holds a {type(value).__name__}, not a list", key=key)
    return value


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds and object not in kinds:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, kind)


def _f32(value: Any) -> float:
    """A float32 header value as the decimal it was written from (1e-5, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _config(reader: Any, n_vocab_tokens: int) -> LlamaConfig:
    arch = _field(reader, "general.architecture", required=True, kind=str)
    if arch not in ARCHITECTURES:
        raise GGUFFormatError(f"unsupported architecture {arch!r} (only {ARCHITECTURES})")

    def num(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default, required=default is None, kind=_NUMBER)

    scaling = _field(reader, f"{arch}.rope.scaling.type", kind=str)
    if scaling not in (None, "none"):
        raise GGUFFormatError(
            f"rope scaling {scaling!r} unsupported", key=f"{arch}.rope.scaling.type"
        )
    hidden = int(num("embedding_length"))
    n_heads = int(num("attention.head_count"))
    n_kv = int(num("attention.head_count_kv", n_heads))
    head_dim = int(num("attention.key_length", hidden // max(n_heads, 1)))
    rotary = int(num("rope.dimension_count", head_dim))
    if rotary != head_dim:  # e.g. Phi-4-mini's partial rotary
        raise GGUFFormatError(
            f"rotary over {rotary} of {head_dim} head dims unsupported",
            key=f"{arch}.rope.dimension_count",
        )
    config = LlamaConfig(
        n_layers=int(num("block_count")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=int(num("feed_forward_length")),
        vocab=int(num("vocab_size", n_vocab_tokens)),
        rope_base=_f32(num("rope.freq_base", 10000.0)),
        rms_eps=_f32(num("attention.layer_norm_rms_epsilon")),
        context_length=int(num("context_length")),
        arch=str(arch),
    )
    if arch in GEMMA:
        config = _gemma(reader, config)
    sane = (
        0 < config.n_layers <= 1024
        and 0 < config.n_heads
        and 0 < config.n_kv_heads <= config.n_heads
        and config.n_heads % config.n_kv_heads == 0
        and 0 < config.head_dim
        and config.head_dim % 2 == 0
        and 0 < config.hidden
        and 0 < config.ffn
        and 0 < config.vocab
        and 0 <= config.sliding_window
        and config.attn_softcap >= 0
        and config.final_softcap >= 0
    )
    if not sane:
        raise GGUFFormatError(f"inconsistent hyper-parameters: {config}")
    return config


def _gemma(reader: Any, config: LlamaConfig) -> LlamaConfig:
    """Gemma 2/3 hyper-parameters, with llama.cpp's defaults where a key is absent."""
    arch, gemma2 = config.arch, config.arch == "gemma2"

    def num(key: str, default: float) -> float:
        return float(_field(reader, f"{arch}.{key}", default, kind=_NUMBER))

    window = int(num("attention.sliding_window", 4096 if gemma2 else 0))
    key = f"{arch}.attention.sliding_window_pattern"
    field = reader.fields.get(key)
    if field is not None and len(field.types) > 1:  # an array: one flag per block
        flags = _field(reader, key, items=bool)
        if len(flags) != config.n_layers:
            raise GGUFFormatError(f"{len(flags)} flags for {config.n_layers} blocks", key=key)
        swa = tuple(bool(f) for f in flags)
    else:  # every n-th block is global, the others slide
        n = int(num("attention.sliding_window_pattern", 2 if gemma2 else 6))
        swa = tuple(n == 0 or i % n < n - 1 for i in range(config.n_layers)) if n >= 0 else ()
    if window <= 0:
        swa = ()
    # llama.cpp: the 27B models scale queries by hidden / heads, the others by head_dim.
    big = config.n_layers == (46 if gemma2 else 62)
    return dataclasses.replace(
        config,
        activation="gelu_tanh",
        embed_scale=float(np.sqrt(np.float32(config.hidden))),
        attn_scale=1.0 / math.sqrt(config.hidden // config.n_heads) if big else 0.0,
        attn_softcap=_f32(num("attn_logit_softcapping", 50.0)) if gemma2 else 0.0,
        final_softcap=_f32(num("final_logit_softcapping", 30.0 if gemma2 else 0.0)),
        sliding_window=window if swa else 0,
        swa_layers=swa if any(swa) else (),
        rope_base_swa=_f32(num("rope.freq_base_swa", config.rope_base if gemma2 else 10000.0)),
    )


def _rotary_rows(n_heads: int, head_dim: int) -> npt.NDArray[np.intp]:
    """Row ``i`` of the HF matrix is row ``perm[i]`` of llama.cpp's permuted matrix.

    llama.cpp stores each head's rows as interleaved pairs ``[head, head_dim/2, 2]``; HF
    rotate-half wants ``[head, 2, head_dim/2]``.
    """
    rows = np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2)
    return rows.swapaxes(1, 2).reshape(-1)


class _Tensors:
    """Named access to a reader's tensors with shape checks and dequantisation."""

    def __init__(self, reader: Any) -> None:
        self._by_name: dict[str, Any] = {t.name: t for t in reader.tensors}

    def has(self, name: str) -> bool:
        return name in self._by_name

    def _get(self, name: str, shape: tuple[int, ...]) -> Any:
        tensor = self._by_name.get(name)
        if tensor is None:
            raise GGUFFormatError("missing from the file", name)
        found = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ne0 is innermost
        if found != shape:
            raise GGUFFormatError(f"shape {found} (out, in), expected {shape}", name)
        return tensor

    def floats(self, name: str, shape: tuple[int, ...]) -> F32:
        tensor = self._get(name, shape)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise GGUFFormatError(
                f"cannot dequantise {tensor.tensor_type.name}: {exc}", name
            ) from exc
        out = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(shape))
        if not np.isfinite(out).all():
            raise GGUFFormatError("contains NaN or infinity", name)
        return out

    def matrix(
        self, name: str, shape: tuple[int, int], rows: npt.NDArray[np.intp] | None
    ) -> Matrix:
        """A ``[out, in]`` matrix kept as its integer quants (see ``quants``); dense
        types as float32. ``rows`` re-orders output rows."""
        tensor = self._get(name, shape)
        try:
            matrix = quants.decode(tensor.tensor_type, tensor.data, *shape)
        except ValueError as exc:
            raise GGUFFormatError(str(exc), name) from exc
        if isinstance(matrix, np.ndarray) and not np.isfinite(matrix).all():
            raise GGUFFormatError("contains NaN or infinity", name)
        return matrix if rows is None else quants.take_rows(matrix, rows)

    def table(self, name: str, shape: tuple[int, int]) -> Table:
        """An embedding or head table: Q8_0 and dense types as float32 (the builder
        recovers Q8_0 blocks exactly), any other type as its integers."""
        kind = self._get(name, shape).tensor_type
        if kind == gguf.GGMLQuantizationType.Q8_0 or kind in quants.DENSE_TYPES:
            return self.floats(name, shape)
        matrix = self.matrix(name, shape, None)
        return matrix if not isinstance(matrix, Q4_1Matrix) else quants.as_quant(matrix)

    def bias(self, name: str, n: int) -> F32 | None:
        return self.floats(name, (n,)) if self.has(name) else None


def _block(t: _Tensors, config: LlamaConfig, i: int) -> LlamaBlock:
    h, f, d = config.hidden, config.ffn, config.head_dim
    q_out, kv_out = config.n_heads * d, config.n_kv_heads * d
    p = f"blk.{i}."
    mat = t.matrix
    # llama.cpp permutes only `llama` Q/K rows (its NORM rotary); the others are NEOX.
    interleaved = config.arch == "llama"
    q_rows = _rotary_rows(config.n_heads, d) if interleaved else None
    k_rows = _rotary_rows(config.n_kv_heads, d) if interleaved else None
    if config.arch == "phi3":  # fused Q/K/V and gate/up, split here (the graph re-fuses)
        qkv = mat(p + "attn_qkv.weight", (q_out + 2 * kv_out, h), None)
        wq, wk, wv = _row_split(qkv, (q_out, kv_out, kv_out))
        gate_up = mat(p + "ffn_up.weight", (2 * f, h), None)
        w_gate, w_up = _row_split(gate_up, (f, f))
    else:
        wq = mat(p + "attn_q.weight", (q_out, h), q_rows)
        wk = mat(p + "attn_k.weight", (kv_out, h), k_rows)
        wv = mat(p + "attn_v.weight", (kv_out, h), None)
        w_gate = mat(p + "ffn_gate.weight", (f, h), None)
        w_up = mat(p + "ffn_up.weight", (f, h), None)
    head_norms = config.arch in ("qwen3", "gemma3")
    post = config.arch in GEMMA
    return LlamaBlock(
        attn_norm=t.floats(p + "attn_norm.weight", (h,)),
        wq=wq,
        wk=wk,
        wv=wv,
        wo=mat(p + "attn_output.weight", (h, q_out), None),
        ffn_norm=t.floats(p + "ffn_norm.weight", (h,)),
        w_gate=w_gate,
        w_up=w_up,
        w_down=mat(p + "ffn_down.weight", (h, f), None),
        bq=t.bias(p + "attn_q.bias", q_out),
        bk=t.bias(p + "attn_k.bias", kv_out),
        bv=t.bias(p + "attn_v.bias", kv_out),
        q_norm=t.floats(p + "attn_q_norm.weight", (d,)) if head_norms else None,
        k_norm=t.floats(p + "attn_k_norm.weight", (d,)) if head_norms else None,
        attn_post_norm=t.floats(p + "post_attention_norm.weight", (h,)) if post else None,
        ffn_post_norm=t.floats(p + "post_ffw_norm.weight", (h,)) if post else None,
    )


def _row_split(matrix: Matrix, sizes: tuple[int, ...]) -> list[Matrix]:
    """Consecutive row ranges of a fused matrix, each its own matrix."""
    out, start = [], 0
    for n in sizes:
        out.append(quants.take_rows(matrix, np.arange(start, start + n)))
        start += n
    return out


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _tokenizer(reader: Any) -> TokenizerFacts:
    def text(key: str, default: Any = None, *, required: bool = False) -> Any:
        return _field(reader, f"tokenizer.{key}", default, required=required, kind=str)

    def ints(key: str) -> Any:
        return _field(reader, f"tokenizer.ggml.{key}", kind=int)

    def listed(key: str, items: type | tuple[type, ...], *, required: bool = False) -> Any:
        default: list[Any] | None = None if required else []
        return _field(reader, f"tokenizer.ggml.{key}", default, required=required, items=items)

    tokens = tuple(listed("tokens", str, required=True))
    types = _field(reader, "tokenizer.ggml.token_type", None, items=int)
    token_types = tuple(int(x) for x in types) if types is not None else (1,) * len(tokens)
    if len(token_types) != len(tokens):
        raise GGUFFormatError(f"{len(token_types)} token types for {len(tokens)} tokens")
    facts = TokenizerFacts(
        model=text("ggml.model", required=True),
        pre=text("ggml.pre", "default"),
        tokens=tokens,
        token_types=token_types,
        merges=tuple(listed("merges", str)),
        bos_id=_opt_int(ints("bos_token_id")),
        eos_id=_opt_int(ints("eos_token_id")),
        pad_id=_opt_int(ints("padding_token_id")),
        unk_id=_opt_int(ints("unknown_token_id")),
        add_bos=_field(reader, "tokenizer.ggml.add_bos_token", False, kind=bool),
        chat_template=text("chat_template"),
        scores=tuple(float(x) for x in listed("scores", _NUMBER)),
    )
    if facts.scores and len(facts.scores) != len(tokens):
        raise GGUFFormatError(f"{len(facts.scores)} token scores for {len(tokens)} tokens")
    for key, tid in (("bos", facts.bos_id), ("eos", facts.eos_id), ("pad", facts.pad_id)):
        if tid is not None and not 0 <= tid < len(tokens):
            raise GGUFFormatError(f"{key} token id {tid} outside the vocabulary")
    return facts


def tensor_infos(reader: Any) -> list[quants.TensorInfo]:
    """Each tensor's name, type, ``(out, in)`` shape and stored bytes, from the infos only."""
    return [
        quants.TensorInfo(
            t.name,
            t.tensor_type.name,
            tuple(int(d) for d in reversed(t.shape.tolist())),
            int(t.n_bytes),
        )
        for t in reader.tensors
    ]


def read_tensor_infos(
    path: str | Path, limits: GGUFLimits = DEFAULT_LIMITS
) -> list[quants.TensorInfo]:
    """The tensor infos of a GGUF file, every type checked (no weight is read)."""
    infos = tensor_infos(_open(Path(path), limits))
    _check_types(infos)
    return infos


def _check_types(infos: list[quants.TensorInfo]) -> None:
    try:
        quants.check_types(infos)
    except quants.UnsupportedType as exc:
        name, _, reason = str(exc).partition(": ")
        raise GGUFFormatError(reason, name) from exc


def read_gguf(
    path: str | Path, limits: GGUFLimits = DEFAULT_LIMITS
) -> tuple[LlamaWeights, TokenizerFacts]:
    """Load every weight of a GGUF (copied out of the memory map) and its tokenizer."""
    reader = _open(Path(path), limits)
    _check_types(tensor_infos(reader))
    tok = _tokenizer(reader)
    config = _config(reader, len(tok.tokens))
    if len(tok.tokens) != config.vocab:
        raise GGUFFormatError(f"{len(tok.tokens)} tokens but vocab_size {config.vocab}")
    tensors = _Tensors(reader)
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if tensors.has(name):  # Phi-3 128k LongRoPE: the factors depend on the context used
            raise GGUFFormatError("LongRoPE scaling unsupported", name)
    if tensors.has("rope_freqs.weight"):  # Llama 3.1+: per-frequency rope divisors
        factors = tensors.floats("rope_freqs.weight", (config.head_dim // 2,))
        if not (factors > 0).all():
            raise GGUFFormatError("rope frequency factors must be positive", "rope_freqs.weight")
        config = dataclasses.replace(config, rope_factors=tuple(float(f) for f in factors))
    vocab_shape = (config.vocab, config.hidden)
    weights = LlamaWeights(
        config=config,
        token_embd=tensors.table("token_embd.weight", vocab_shape),
        blocks=tuple(_block(tensors, config, i) for i in range(config.n_layers)),
        output_norm=tensors.floats("output_norm.weight", (config.hidden,)),
        # gemma2 always ties its head (llama.cpp ignores an ``output.weight``)
        lm_head=tensors.table("output.weight", vocab_shape)
        if tensors.has("output.weight") and config.arch != "gemma2"
        else None,
    )
    return weights, tok
