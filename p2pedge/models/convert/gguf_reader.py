"""Read a llama.cpp GGUF file into :class:`LlamaWeights` and :class:`TokenizerFacts`.

Only the ``gguf`` package and numpy are used (no torch). Q4_1 matrices stay as their blocks
(so the ONNX builder can map them losslessly onto ``MatMulNBits``); every other quantisation
is dequantised to float32. llama.cpp's converter permutes the rows of Q and K inside each
head for its interleaved rotary; we undo that so weights use the HF rotate-half layout.

A file is untrusted input: every tensor's extent is checked against the file size before it
is mapped, shapes are checked against the header's hyper-parameters, and every failure is
a :class:`GGUFFormatError` that names the tensor or key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from p2pedge.errors import ModelLoadError
from p2pedge.models.convert.weights import (
    F32,
    Q4_1_BLOCK,
    LlamaBlock,
    LlamaConfig,
    LlamaWeights,
    Matrix,
    Q4_1Matrix,
)

_Q4_1_BYTES = 20  # f16 scale, f16 minimum, 16 bytes of packed nibbles


class GGUFFormatError(ModelLoadError):
    """A GGUF file is truncated, corrupt or not a supported Llama model."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(f"tensor {tensor!r}: {message}" if tensor else message)
        self.tensor = tensor


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


def _open(path: Path) -> Any:
    if not path.is_file():
        raise GGUFFormatError(f"no such GGUF file: {path}")
    try:
        return _CheckedReader(path)
    except GGUFFormatError:
        raise
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise GGUFFormatError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None, *, required: bool = False) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFFormatError(f"metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise GGUFFormatError(f"metadata key {key!r} is unreadable: {exc}") from exc


def _f32(value: Any) -> float:
    """A float32 header value as the decimal it was written from (1e-5, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _config(reader: Any, n_vocab_tokens: int) -> LlamaConfig:
    arch = _field(reader, "general.architecture", required=True)
    if arch != "llama":
        raise GGUFFormatError(f"unsupported architecture {arch!r} (only 'llama')")

    def num(key: str, default: Any = None) -> Any:
        return _field(reader, f"llama.{key}", default, required=default is None)

    hidden = int(num("embedding_length"))
    n_heads = int(num("attention.head_count"))
    n_kv = int(num("attention.head_count_kv", n_heads))
    head_dim = int(num("attention.key_length", hidden // max(n_heads, 1)))
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
    )
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
    )
    if not sane:
        raise GGUFFormatError(f"inconsistent hyper-parameters: {config}")
    return config


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
        """A ``[out, in]`` matrix; Q4_1 stays blocked. ``rows`` re-orders output rows."""
        tensor = self._by_name.get(name)
        if tensor is None or tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            dense = self.floats(name, shape)
            return dense if rows is None else np.ascontiguousarray(dense[rows])
        self._get(name, shape)
        out_f, in_f = shape
        if in_f % Q4_1_BLOCK:
            raise GGUFFormatError(f"in_features {in_f} not a multiple of {Q4_1_BLOCK}", name)
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(
            out_f, in_f // Q4_1_BLOCK, _Q4_1_BYTES
        )
        if rows is not None:
            blocks = blocks[rows]
        scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
        mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        if not (np.isfinite(scales).all() and np.isfinite(mins).all()):
            raise GGUFFormatError("Q4_1 scales or minimums contain NaN or infinity", name)
        return Q4_1Matrix(
            out_features=out_f,
            in_features=in_f,
            scales=scales.astype(np.float32),
            mins=mins.astype(np.float32),
            quants=np.ascontiguousarray(blocks[..., 4:]),
        )


def _block(t: _Tensors, config: LlamaConfig, i: int) -> LlamaBlock:
    h, f, d = config.hidden, config.ffn, config.head_dim
    q_out, kv_out = config.n_heads * d, config.n_kv_heads * d
    p = f"blk.{i}."
    mat = t.matrix
    return LlamaBlock(
        attn_norm=t.floats(p + "attn_norm.weight", (h,)),
        wq=mat(p + "attn_q.weight", (q_out, h), _rotary_rows(config.n_heads, d)),
        wk=mat(p + "attn_k.weight", (kv_out, h), _rotary_rows(config.n_kv_heads, d)),
        wv=mat(p + "attn_v.weight", (kv_out, h), None),
        wo=mat(p + "attn_output.weight", (h, q_out), None),
        ffn_norm=t.floats(p + "ffn_norm.weight", (h,)),
        w_gate=mat(p + "ffn_gate.weight", (f, h), None),
        w_up=mat(p + "ffn_up.weight", (f, h), None),
        w_down=mat(p + "ffn_down.weight", (h, f), None),
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _tokenizer(reader: Any) -> TokenizerFacts:
    tokens = tuple(str(s) for s in _field(reader, "tokenizer.ggml.tokens", required=True))
    types = _field(reader, "tokenizer.ggml.token_type", None)
    token_types = tuple(int(x) for x in types) if types is not None else (1,) * len(tokens)
    if len(token_types) != len(tokens):
        raise GGUFFormatError(f"{len(token_types)} token types for {len(tokens)} tokens")
    facts = TokenizerFacts(
        model=str(_field(reader, "tokenizer.ggml.model", required=True)),
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=token_types,
        merges=tuple(str(s) for s in _field(reader, "tokenizer.ggml.merges", [])),
        bos_id=_opt_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=_opt_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_id=_opt_int(_field(reader, "tokenizer.ggml.padding_token_id")),
        unk_id=_opt_int(_field(reader, "tokenizer.ggml.unknown_token_id")),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    for key, tid in (("bos", facts.bos_id), ("eos", facts.eos_id), ("pad", facts.pad_id)):
        if tid is not None and not 0 <= tid < len(tokens):
            raise GGUFFormatError(f"{key} token id {tid} outside the vocabulary")
    return facts


def read_gguf(path: str | Path) -> tuple[LlamaWeights, TokenizerFacts]:
    """Load every weight of a Llama GGUF (copied out of the memory map) and its tokenizer."""
    reader = _open(Path(path))
    tok = _tokenizer(reader)
    config = _config(reader, len(tok.tokens))
    if len(tok.tokens) != config.vocab:
        raise GGUFFormatError(f"{len(tok.tokens)} tokens but vocab_size {config.vocab}")
    tensors = _Tensors(reader)
    vocab_shape = (config.vocab, config.hidden)
    weights = LlamaWeights(
        config=config,
        token_embd=tensors.floats("token_embd.weight", vocab_shape),
        blocks=tuple(_block(tensors, config, i) for i in range(config.n_layers)),
        output_norm=tensors.floats("output_norm.weight", (config.hidden,)),
        lm_head=tensors.floats("output.weight", vocab_shape)
        if tensors.has("output.weight")
        else None,
    )
    return weights, tok
