"""GGUF tensor types -> integer quants that ``MatMulNBits`` runs without rounding a weight.

Every supported GGUF type is affine per sub-block: ``value = a * q + c`` with a small
unsigned integer ``q``. Each decoder here returns the integers and the per-block ``a``/``c``
so that float32 reproduces ``gguf.quants.dequantize`` bit for bit (fp16 scales times at
most 8-bit sub-scales are exact in float32, and the same float32 operations are done):

======  ===========  =====  ====  ==========================================
type    kept as      bits   block  value
======  ===========  =====  ====  ==========================================
Q4_0    Q4_1Matrix   4      32    d (q - 8)          (mins = -8 d, exact)
Q4_1    Q4_1Matrix   4      32    d q + m
Q4_K    Q4_1Matrix   4      32    (d sc) q - (dmin m), 6-bit sc and m
Q8_0    QuantMatrix  8      32    d (q - 128)
Q5_0    QuantMatrix  8      32    d (q - 16),  q in 0..31
Q5_1    QuantMatrix  8      32    d q + m,     q in 0..31
Q5_K    QuantMatrix  8      32    (d sc) q - (dmin m)
Q6_K    QuantMatrix  8      16    (d sc) (q - 32), signed 8-bit sc
Q2_K    QuantMatrix  4      16    (d sc) q - (dmin m), 4-bit sc and m, q in 0..3
Q3_K    QuantMatrix  4      16    (d (sc - 32)) (q - 4), q in 0..7
======  ===========  =====  ====  ==========================================

5- and 6-bit integers ride in the 8-bit kernel and 2/3-bit ones in the 4-bit kernel:
exact, at the cost of disk (8 bits for 5.5/6.6 stored, 4 for 2.6/3.4). F32, F16 and
BF16 are exact in float32 (twice the bytes of a 16-bit file). Anything else (IQ*, TQ*,
MXFP4...) is refused by :func:`check_types` before any weight is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K as _GGUF_Q4_K

from p2pedge.models.convert.weights import F32, Q4_1_BLOCK, Matrix, Q4_1Matrix, QuantMatrix

T = GGMLQuantizationType
U8 = npt.NDArray[Any]  # uint8 in practice; numpy widens intermediate shifts
DENSE_TYPES = frozenset({T.F32, T.F16, T.BF16})
MATRIX_TYPES = DENSE_TYPES | frozenset(
    {T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K}
)
QK_K = 256


class UnsupportedType(ValueError):
    """A tensor type this importer cannot map without rounding."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: str
    shape: tuple[int, ...]  # (out, in) order: the GGUF dims reversed
    nbytes: int


def check_types(infos: Iterable[TensorInfo]) -> None:
    """Refuse, naming the first offender, any tensor whose type is not supported.

    Norm weights and biases must be dense; matrices and tables any of ``MATRIX_TYPES``.
    Called on the tensor infos alone, before a weight is decoded.
    """
    for info in infos:
        allowed = DENSE_TYPES if len(info.shape) == 1 else MATRIX_TYPES
        if T[info.qtype] not in allowed:
            names = ", ".join(sorted(t.name for t in allowed))
            raise UnsupportedType(f"{info.name}: type {info.qtype} is not supported ({names})")


def _f16(raw: U8) -> F32:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(raw: U8, groups: int) -> U8:
    """``raw [n, groups * 32 / 2]`` bytes: low nibbles then high nibbles per 32 elements."""
    n = raw.shape[0]
    split = raw.reshape(n, groups, 1, -1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (split & 0x0F).reshape(n, -1).astype(np.uint8)


def _bits(raw: U8, count: int) -> U8:
    """Bit ``i`` of the little-endian bitfield ``raw [n, count / 8]``, for ``i < count``."""
    return np.unpackbits(raw, axis=-1, bitorder="little")[:, :count]


def _as_q4_1(q: U8, scales: F32, mins: F32, out: int, inp: int) -> Q4_1Matrix:
    blocks = q.reshape(out, inp // Q4_1_BLOCK, Q4_1_BLOCK)
    quants = (blocks[..., :16] | (blocks[..., 16:] << 4)).astype(np.uint8)
    return Q4_1Matrix(
        out,
        inp,
        scales.reshape(out, -1).astype(np.float32),
        mins.reshape(out, -1).astype(np.float32),
        np.ascontiguousarray(quants),
    )


def decode(qtype: GGMLQuantizationType, raw: U8, out: int, inp: int) -> Matrix:
    """``raw`` (the tensor's bytes, ``[out, in / block * type_size]``) as a matrix.

    Raises :class:`UnsupportedType` for a type outside ``MATRIX_TYPES`` and ValueError for
    non-finite scales.
    """
    if qtype in DENSE_TYPES:
        from gguf.quants import dequantize

        dense: F32 = np.asarray(dequantize(raw, qtype), np.float32).reshape(out, inp)
        return dense
    if qtype not in MATRIX_TYPES:
        raise UnsupportedType(f"type {qtype.name} is not supported")
    block, size = GGML_QUANT_SIZES[qtype]
    if inp % block:
        raise ValueError(f"in_features {inp} is not a multiple of {qtype.name}'s block {block}")
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    mat = _decode_blocks(qtype, b, b.shape[0], out, inp)
    mins = mat.mins if mat.mins is not None else np.zeros(0, np.float32)
    if not (np.isfinite(mat.scales).all() and np.isfinite(mins).all()):
        raise ValueError(f"{qtype.name} scales or minimums contain NaN or infinity")
    return mat


def _decode_blocks(
    qtype: GGMLQuantizationType, b: U8, n: int, out: int, inp: int
) -> Q4_1Matrix | QuantMatrix:
    if qtype == T.Q4_0:
        d = _f16(b[:, 0:2])
        return _as_q4_1(_nibbles(b[:, 2:], 1), d, d * np.float32(-8.0), out, inp)
    if qtype == T.Q4_1:
        d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        return _as_q4_1(_nibbles(b[:, 4:], 1), d, m, out, inp)
    if qtype == T.Q4_K:
        d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
        sc, m = _GGUF_Q4_K.get_scale_min(b[:, 4:16])
        scales = d * sc.reshape(n, 8).astype(np.float32)
        mins = -(dmin * m.reshape(n, 8).astype(np.float32))
        return _as_q4_1(_nibbles(b[:, 16:], 4), scales, mins, out, inp)
    if qtype == T.Q8_0:
        q = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return _quant(q, _f16(b[:, 0:2]), None, 32, 8, 128, qtype, out, inp)
    if qtype in (T.Q5_0, T.Q5_1):
        d = _f16(b[:, 0:2])
        m5 = _f16(b[:, 2:4]) if qtype == T.Q5_1 else None
        at = 4 if qtype == T.Q5_1 else 2
        q = _nibbles(b[:, at + 4 :], 1) | (_bits(b[:, at : at + 4], 32) << 4)
        return _quant(q, d, m5, 32, 8, 16 if m5 is None else 0, qtype, out, inp)
    if qtype == T.Q5_K:
        d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
        sc, m = _GGUF_Q4_K.get_scale_min(b[:, 4:16])
        ql = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
        qh = _bits(b[:, 16:48], 256).reshape(n, 32, 8).transpose(0, 2, 1)  # bit j of byte i
        q = (ql | (qh << 4)).reshape(n, -1)
        scales = d * sc.reshape(n, 8).astype(np.float32)
        mins = -(dmin * m.reshape(n, 8).astype(np.float32))
        return _quant(q, scales, mins, 32, 8, 0, qtype, out, inp)
    if qtype == T.Q6_K:
        ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(n, 8, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
            1, 1, 4, 1
        )
        qh = (qh & 0x03).reshape(n, 8, 32)
        q = (ql | (qh << 4)).astype(np.uint8).reshape(n, -1)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        scales = _f16(b[:, 208:210])[:, None] * sc
        return _quant(q, scales, None, 16, 8, 32, qtype, out, inp)
    if qtype == T.Q2_K:
        sc = b[:, :16]
        q2: U8 = (
            b[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        ) & 0x03
        d, dmin = _f16(b[:, 80:82])[:, None], _f16(b[:, 82:84])[:, None]
        scales = d * (sc & 0x0F).astype(np.float32)
        mins = -(dmin * (sc >> 4).astype(np.float32))
        return _quant(q2.reshape(n, -1).astype(np.uint8), scales, mins, 16, 4, 0, qtype, out, inp)
    if qtype == T.Q3_K:
        hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
        low = packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)
        high = packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
        sc = (low.reshape(n, 16) & 0x0F) | ((high.reshape(n, 16) & 0x03) << 4)
        scales = _f16(b[:, 108:110])[:, None] * (sc.astype(np.float32) - np.float32(32.0))
        ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        qh = _bits(hmask, 256).reshape(n, 32, 8).transpose(0, 2, 1)  # bit j of byte i
        q = ql.reshape(n, 8, 32) + (qh << 2)  # q - 4 is llama.cpp's signed value
        return _quant(q.reshape(n, -1).astype(np.uint8), scales, None, 16, 4, 4, qtype, out, inp)
    raise UnsupportedType(f"type {qtype.name} is not supported")


def _quant(
    q: U8,
    scales: F32,
    mins: F32 | None,
    block: int,
    bits: int,
    zero: int,
    qtype: GGMLQuantizationType,
    out: int,
    inp: int,
) -> QuantMatrix:
    return QuantMatrix(
        out,
        inp,
        block,
        bits,
        zero,
        np.ascontiguousarray(scales.reshape(out, -1), np.float32),
        None if mins is None else np.ascontiguousarray(mins.reshape(out, -1), np.float32),
        np.ascontiguousarray(q.reshape(out, inp), np.uint8),
        qtype.name,
    )


def take_rows(matrix: Matrix, rows: npt.NDArray[np.intp]) -> Matrix:
    """``matrix`` with output rows ``rows`` (a re-ordering or a subset), in that order."""
    if isinstance(matrix, Q4_1Matrix):
        return Q4_1Matrix(
            len(rows),
            matrix.in_features,
            np.ascontiguousarray(matrix.scales[rows]),
            np.ascontiguousarray(matrix.mins[rows]),
            np.ascontiguousarray(matrix.quants[rows]),
        )
    if isinstance(matrix, QuantMatrix):
        return QuantMatrix(
            len(rows),
            matrix.in_features,
            matrix.block,
            matrix.bits,
            matrix.zero,
            np.ascontiguousarray(matrix.scales[rows]),
            None if matrix.mins is None else np.ascontiguousarray(matrix.mins[rows]),
            np.ascontiguousarray(matrix.q[rows]),
            matrix.qtype,
        )
    return np.ascontiguousarray(matrix[rows])


def stored_bytes(matrix: Matrix | F32) -> int:
    """Bytes the ONNX initializers of ``matrix`` take (weights, scales, offsets)."""
    if isinstance(matrix, Q4_1Matrix):
        return int(matrix.quants.nbytes + matrix.scales.nbytes + matrix.mins.nbytes)
    if isinstance(matrix, QuantMatrix):
        extra = 0 if matrix.mins is None else matrix.mins.nbytes
        return int(matrix.q.size * matrix.bits // 8 + matrix.scales.nbytes + extra)
    return int(matrix.nbytes)


def as_quant(matrix: Q4_1Matrix) -> QuantMatrix:
    """The same numbers as a 4-bit :class:`QuantMatrix` (element order, zero point 0)."""
    low, high = matrix.quants & 0x0F, matrix.quants >> 4
    q = np.concatenate([low, high], axis=-1).reshape(matrix.out_features, matrix.in_features)
    return QuantMatrix(
        matrix.out_features,
        matrix.in_features,
        Q4_1_BLOCK,
        4,
        0,
        matrix.scales,
        matrix.mins,
        np.ascontiguousarray(q, dtype=np.uint8),
    )
