"""A small ONNX graph builder plus the GGUF blocks -> ``MatMulNBits`` repacking.

Kept separate from the decoder layout so the exactness-critical packing code is easy to
audit on its own; the embedding/head tables are in :mod:`.tables`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from p2pedge.models.convert.weights import Q4_1_BLOCK, Matrix, Q4_1Matrix, QuantMatrix

MS_DOMAIN = "com.microsoft"
OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers; names are made unique with a counter."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counter = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        n_out: int = 1,
        name: str | None = None,
        domain: str = "",
        outputs: Sequence[str] | None = None,
        **attrs: Any,
    ) -> list[str]:
        base = name or self.fresh(op_type)
        outs = list(outputs) if outputs is not None else [f"{base}/out{i}" for i in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs)
        self.nodes.append(node)
        return outs

    def op1(self, op_type: str, inputs: Sequence[str], **kwargs: Any) -> str:
        return self.op(op_type, inputs, **kwargs)[0]

    def initializer(self, name: str, array: npt.NDArray[Any]) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, array: npt.NDArray[Any] | np.generic | Sequence[int] | float) -> str:
        """A small constant, deduplicated by value."""
        arr = np.asarray(array)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        key = (str(arr.dtype), arr.tobytes(), arr.shape)
        if key not in self._consts:
            self._consts[key] = self.initializer(self.fresh("const"), arr)
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def add_input(self, name: str, elem: int, shape: Sequence[str | int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def add_output(self, name: str, elem: int, shape: Sequence[str | int]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="p2pedge",
        )
        model.ir_version = 8
        return model


F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
F32Array = npt.NDArray[np.float32]


def pack_q4_1(
    matrices: Sequence[Q4_1Matrix],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Concatenate matrices along ``out`` and repack them for ``MatMulNBits``.

    Returns ``(B [N, K/32, 16] uint8, scales [N * K/32] f32, mins [N, K/32] f32)``.
    GGUF stores element ``j`` and ``j + 16`` of a block in one byte; ``MatMulNBits``
    wants elements ``2j`` (low nibble) and ``2j + 1`` (high nibble).
    """
    quants = np.concatenate([m.quants for m in matrices], axis=0)
    low = quants & 0x0F
    high = quants >> 4
    q = np.concatenate([low, high], axis=-1)  # [N, blocks, 32] in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = np.concatenate([m.scales for m in matrices], axis=0).astype(np.float32)
    mins = np.concatenate([m.mins for m in matrices], axis=0).astype(np.float32)
    return packed, scales.reshape(-1), mins


Q4_ZERO_POINT = 8


def zero_points_4bit(n: int, k: int, value: int, block: int = Q4_1_BLOCK) -> npt.NDArray[np.uint8]:
    """``MatMulNBits`` bits=4 zero points, all ``value``: two 4-bit points per byte, each
    of the ``n`` rows padded to whole bytes over its ``k / block`` blocks."""
    per_row = (k // block + 1) // 2
    return np.full(n * per_row, value | (value << 4), dtype=np.uint8)


def pack_nbits(q: npt.NDArray[np.uint8], bits: int, block: int) -> npt.NDArray[np.uint8]:
    """``[N, K]`` integers in element order -> ``MatMulNBits`` ``B [N, K/block, bytes]``
    (bits=4: element ``2j`` in the low nibble, ``2j + 1`` in the high one)."""
    n, k = q.shape
    if bits == 8:
        return np.ascontiguousarray(q.reshape(n, k // block, block), dtype=np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed.reshape(n, k // block, block // 2))


def unpack_nbits(packed: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint8]:
    """Inverse of :func:`pack_nbits`: ``[N, K]`` integers."""
    n = packed.shape[0]
    if bits == 8:
        return np.ascontiguousarray(packed.reshape(n, -1))
    flat = packed.reshape(n, -1)
    q = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)
    q[:, 0::2], q[:, 1::2] = flat & 0x0F, flat >> 4
    return q


def matrix_kind(m: Matrix) -> tuple[object, ...]:
    """Matrices of one kind share one kernel call when fused."""
    if isinstance(m, Q4_1Matrix):
        return ("q4_1",)
    if isinstance(m, QuantMatrix):
        return ("nbits", m.bits, m.block, m.zero, m.mins is not None)
    return ("dense",)


def centered_offsets(scales: F32Array, mins: F32Array) -> F32Array | None:
    """``mins + 8 * scales`` when float32 holds it exactly for every block, else None.

    With MatMulNBits' default zero point 8 an element is ``s (q - 8) + (m + 8 s)``: the
    same number as ``s q + m``, but the kernel's sum is centred, so the separate offset sum
    is small and far less precision cancels than with zero point 0 (about 4x closer to the
    float64 reference on SmolLM2). GGUF's fp16 scales and minimums almost always allow it.
    """
    exact = mins.astype(np.float64) + Q4_ZERO_POINT * scales.astype(np.float64)
    offsets = exact.astype(np.float32)
    if not np.array_equal(offsets.astype(np.float64), exact):
        return None
    return offsets


@dataclass(frozen=True)
class NBits:
    """Initializer names and shape of one ``MatMulNBits`` weight (see ``Linear``)."""

    weight: str
    scales: str
    zeros: str
    mins_t: str | None
    k: int
    n: int
    bits: int
    block: int
    # fp32 activations, 8-bit integers: (weight, scales, zero points) of the high nibbles;
    # weight/scales/zeros above then hold the low nibbles (see ``Linear.nbits_inputs``)
    hi: tuple[str, str, str] | None = None


INT8_LIMBS = 3
# Guards the limb scale of an all-zero block; far below any activation that matters.
LIMB_TINY = 2.0**-100


class Linear:
    """Emits ``y = x @ W.T`` for a group of matrices sharing the input ``x``.

    Matrices in a group are fused along ``out`` into one kernel call (QKV, gate+up). For
    Q4_1 groups the kernel is ``MatMulNBits`` with zero point ``z`` = 8 (0 when
    :func:`centered_offsets` refuses), so it computes ``sum_k x_k * s * (q_k - z)`` from the
    published quants, and the rest of each weight is added as ``blocksum(x) @ offsets.T``:
    ``sum_k x_k (s q_k + m) = s sum_k x_k (q_k - z) + (m + z s) sum_k x_k`` per block of 32.
    ``blocksum(x)`` is shared by every group reading the same ``x``.

    ``limbs=True`` feeds the kernel's fast int8 path without rounding the activations:
    see :meth:`limbs`.
    """

    def __init__(self, g: GraphBuilder, accuracy_level: int, limbs: bool = False) -> None:
        self.g = g
        self.accuracy_level = accuracy_level
        self.use_limbs = limbs
        self._blocks: dict[str, str] = {}
        self._blocksums: dict[str, str] = {}
        self._limbs: dict[str, str] = {}

    def _blocked(self, x: str, k: int, block: int = Q4_1_BLOCK) -> str:
        """``x`` viewed as ``[batch, seq, K/block, block]``, the kernel's activation blocks."""
        key = x if block == Q4_1_BLOCK else f"{x}#{block}"
        if key not in self._blocks:
            g = self.g
            self._blocks[key] = g.op1("Reshape", [x, g.i64(0, 0, k // block, block)])
        return self._blocks[key]

    def _blocksum(self, x: str, k: int, block: int = Q4_1_BLOCK) -> str:
        key = x if block == Q4_1_BLOCK else f"{x}#{block}"
        if key not in self._blocksums:
            g = self.g
            blocks = self._blocked(x, k, block)
            self._blocksums[key] = g.op1("ReduceSum", [blocks, g.i64(-1)], keepdims=0)
        return self._blocksums[key]

    def limbs(self, x: str, k: int, block: int = Q4_1_BLOCK) -> str:
        """``x`` ``[b, s, K]`` as three int8 limbs ``[b, s, 3, K]`` that sum to it exactly.

        The int8 path of ``MatMulNBits`` (accuracy_level 4) quantises each block of 32
        activations as ``round(a * 127 / amax) * amax / 127``. A limb built that way is
        reproduced by the kernel without error (its largest element is ``±127`` steps), so
        the kernel's integer dot product with the 4-bit weights is exact for it. Limbs 1
        and 2 are such quantisations of the running remainder (each subtraction is exact,
        Sterbenz); limb 3 is what is left (at most ``amax / 254**2``), which the kernel
        rounds by at most ``amax / 254**3``, about 2**-24 of the block's largest value:
        fp32 precision at about half the fp32 kernel's cost on AVX2 (one weight pass serves
        all three rows). Only exact where the kernel quantises activations per block like
        this (MLAS on x86); see docs/model-format.md.
        """
        key = x if block == Q4_1_BLOCK else f"{x}#{block}"
        if key not in self._limbs:
            g = self.g
            rest = self._blocked(x, k, block)
            limbs = []
            for _ in range(INT8_LIMBS - 1):
                amax = g.op1("ReduceMax", [g.op1("Abs", [rest])], axes=[-1], keepdims=1)
                guarded = g.op1("Max", [amax, g.const(np.float32(LIMB_TINY))])
                inv_step = g.op1("Div", [g.const(np.float32(127.0)), guarded])
                steps = g.op1("Round", [g.op1("Mul", [rest, inv_step])])
                limb = g.op1("Div", [steps, inv_step])
                limbs.append(limb)
                rest = g.op1("Sub", [rest, limb])
            stacked = g.op1("Concat", [*limbs, rest], axis=2)  # [b, s, 3 * K/32, 32]
            self._limbs[key] = g.op1("Reshape", [stacked, g.i64(0, 0, INT8_LIMBS, k)])
        return self._limbs[key]

    def sum_limbs(self, y: str) -> str:
        """``[b, s, 3, N]`` kernel output (one row per limb) -> ``[b, s, N]``."""
        return self.g.op1("ReduceSum", [y, self.g.i64(2)], keepdims=0)

    def __call__(self, x: str, matrices: Sequence[Matrix], prefix: str) -> str:
        """``x @ concat(matrices).T``: one kernel call per run of matrices of one kind
        (initializers ``<prefix>.*``; with several runs ``<prefix>.part<j>.*`` and a
        Concat, e.g. a Q4_K_M file's Q4_K Q/K with its Q6_K V)."""
        runs: list[list[Matrix]] = []
        for m in matrices:
            if runs and matrix_kind(runs[-1][0]) == matrix_kind(m):
                runs[-1].append(m)
            else:
                runs.append([m])
        if len(runs) == 1:
            return self._run(x, runs[0], prefix)
        outs = [self._run(x, run, f"{prefix}.part{j}") for j, run in enumerate(runs)]
        return self.g.op1("Concat", outs, axis=-1, name=f"{prefix}/Concat")

    def nbits_inputs(self, prefix: str, matrices: Sequence[QuantMatrix]) -> NBits:
        """Initializers ``<prefix>.nbits_*`` for ``matrices`` fused along ``out``.

        ``MatMulNBits`` bits=8 has no fast fp32-activation path (about 13x slower than
        bits=4 for one row), so with fp32 activations 8-bit integers whose zero point is a
        multiple of 16 (every GGUF type's) run as two exact 4-bit halves, as ``Q8Table``
        does: ``s (q - z) = 16 s (hi - z / 16) + s lo``."""
        g, first = self.g, matrices[0]
        k, block, bits = first.in_features, first.block, first.bits
        n = sum(m.out_features for m in matrices)
        q = np.concatenate([m.q for m in matrices], axis=0)
        scales = np.concatenate([m.scales for m in matrices], axis=0).astype(np.float32)
        hi = None
        if bits == 8 and first.zero % 16 == 0 and self.accuracy_level == 0 and not self.use_limbs:
            hi = (
                g.initializer(
                    f"{prefix}.nbits_hi_weight", pack_nbits((q >> 4).astype(np.uint8), 4, block)
                ),
                g.initializer(f"{prefix}.nbits_hi_scales", (scales * np.float32(16)).reshape(-1)),
                g.initializer(
                    f"{prefix}.nbits_hi_zero_points",
                    zero_points_4bit(n, k, first.zero // 16, block),
                ),
            )
            q, bits = (q & 0x0F).astype(np.uint8), 4
            zeros = zero_points_4bit(n, k, 0, block)
        elif bits == 8:
            zeros = np.full(scales.size, first.zero, dtype=np.uint8)
        else:
            zeros = zero_points_4bit(n, k, first.zero, block)
        mins_t = None
        if first.mins is not None:
            mins = np.concatenate([m.mins for m in matrices if m.mins is not None], axis=0)
            mins_t = g.initializer(f"{prefix}.nbits_mins_t", np.ascontiguousarray(mins.T))
        return NBits(
            g.initializer(f"{prefix}.nbits_weight", pack_nbits(q, bits, block)),
            g.initializer(f"{prefix}.nbits_scales", scales.reshape(-1)),
            g.initializer(f"{prefix}.nbits_zero_points", zeros),
            mins_t,
            k,
            n,
            bits,
            block,
            hi,
        )

    def nbits_matmul(self, x: str, w: NBits, name: str) -> str:
        """``sum_k x_k s (q_k - z)`` on ``MatMulNBits`` plus ``blocksum(x) @ mins.T``."""
        g = self.g
        main = g.op1(
            "MatMulNBits",
            [self.limbs(x, w.k, w.block) if self.use_limbs else x, w.weight, w.scales, w.zeros],
            domain=MS_DOMAIN,
            name=f"{name}/MatMulNBits",
            K=w.k,
            N=w.n,
            bits=w.bits,
            block_size=w.block,
            accuracy_level=4 if self.use_limbs else self.accuracy_level,
        )
        if self.use_limbs:
            main = self.sum_limbs(main)
        if w.hi is not None:
            high = g.op1(
                "MatMulNBits",
                [x, *w.hi],
                domain=MS_DOMAIN,
                name=f"{name}/hi/MatMulNBits",
                K=w.k,
                N=w.n,
                bits=4,
                block_size=w.block,
                accuracy_level=0,
            )
            main = g.op1("Add", [high, main], name=f"{name}/AddHalves")
        if w.mins_t is None:
            return main
        blocksum = self._blocksum(x, w.k, w.block)
        offset = g.op1("MatMul", [blocksum, w.mins_t], name=f"{name}/Mins")
        return g.op1("Add", [main, offset], name=f"{name}/AddMins")

    def _nbits(self, x: str, matrices: Sequence[QuantMatrix], prefix: str) -> str:
        return self.nbits_matmul(x, self.nbits_inputs(prefix, matrices), prefix)

    def _run(self, x: str, matrices: Sequence[Matrix], prefix: str) -> str:
        g = self.g
        if all(isinstance(m, QuantMatrix) for m in matrices):
            return self._nbits(x, [m for m in matrices if isinstance(m, QuantMatrix)], prefix)
        if all(isinstance(m, Q4_1Matrix) for m in matrices):
            qm = [m for m in matrices if isinstance(m, Q4_1Matrix)]
            k = qm[0].in_features
            n = sum(m.out_features for m in qm)
            packed, scales, mins = pack_q4_1(qm)
            inputs = [
                self.limbs(x, k) if self.use_limbs else x,
                g.initializer(f"{prefix}.qweight", packed),
                g.initializer(f"{prefix}.scales", scales),
            ]
            offsets = centered_offsets(scales.reshape(mins.shape), mins)
            zero_offsets = offsets is not None and not offsets.any()  # Q4_0
            if offsets is not None:
                offset_name = f"{prefix}.offsets_t"  # zero point 8 (the op's default)
            else:
                offsets = mins
                offset_name = f"{prefix}.mins_t"
                zero = zero_points_4bit(n, k, 0)
                inputs.append(g.initializer(f"{prefix}.zero_points", zero))
            main = g.op1(
                "MatMulNBits",
                inputs,
                domain=MS_DOMAIN,
                name=f"{prefix}/MatMulNBits",
                K=k,
                N=n,
                bits=4,
                block_size=Q4_1_BLOCK,
                accuracy_level=4 if self.use_limbs else self.accuracy_level,
            )
            if self.use_limbs:
                main = self.sum_limbs(main)
            if zero_offsets:
                return main
            offsets_t = g.initializer(offset_name, np.ascontiguousarray(offsets.T))
            offset = g.op1("MatMul", [self._blocksum(x, k), offsets_t], name=f"{prefix}/MinsMatMul")
            return g.op1("Add", [main, offset], name=f"{prefix}/AddMins")
        dense = [m if isinstance(m, np.ndarray) else m.dequantize() for m in matrices]
        w_t = np.ascontiguousarray(np.concatenate(dense, axis=0).T.astype(np.float32))
        return g.op1(
            "MatMul", [x, g.initializer(f"{prefix}.weight_t", w_t)], name=f"{prefix}/MatMul"
        )
