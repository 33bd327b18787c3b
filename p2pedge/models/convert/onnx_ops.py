"""A small ONNX graph builder plus the Q4_1 -> ``MatMulNBits`` repacking.

Kept separate from the decoder layout so the exactness-critical packing code is easy to
audit on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from p2pedge.models.convert.weights import Q4_1_BLOCK, Matrix, Q4_1Matrix

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


def zero_points_4bit(n: int, k: int, value: int) -> npt.NDArray[np.uint8]:
    """``MatMulNBits`` bits=4 zero points, all ``value``: two 4-bit points per byte, each
    of the ``n`` rows padded to whole bytes over its ``k / 32`` blocks."""
    per_row = (k // Q4_1_BLOCK + 1) // 2
    return np.full(n * per_row, value | (value << 4), dtype=np.uint8)


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

    def _blocked(self, x: str, k: int) -> str:
        """``x`` viewed as ``[batch, seq, K/32, 32]``, the kernel's activation blocks."""
        if x not in self._blocks:
            g = self.g
            self._blocks[x] = g.op1("Reshape", [x, g.i64(0, 0, k // Q4_1_BLOCK, Q4_1_BLOCK)])
        return self._blocks[x]

    def _blocksum(self, x: str, k: int) -> str:
        if x not in self._blocksums:
            g = self.g
            blocks = self._blocked(x, k)
            self._blocksums[x] = g.op1("ReduceSum", [blocks, g.i64(-1)], keepdims=0)
        return self._blocksums[x]

    def limbs(self, x: str, k: int) -> str:
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
        if x not in self._limbs:
            g = self.g
            rest = self._blocked(x, k)
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
            self._limbs[x] = g.op1("Reshape", [stacked, g.i64(0, 0, INT8_LIMBS, k)])
        return self._limbs[x]

    def sum_limbs(self, y: str) -> str:
        """``[b, s, 3, N]`` kernel output (one row per limb) -> ``[b, s, N]``."""
        return self.g.op1("ReduceSum", [y, self.g.i64(2)], keepdims=0)

    def __call__(self, x: str, matrices: Sequence[Matrix], prefix: str) -> str:
        g = self.g
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
            offsets_t = g.initializer(offset_name, np.ascontiguousarray(offsets.T))
            offset = g.op1("MatMul", [self._blocksum(x, k), offsets_t], name=f"{prefix}/MinsMatMul")
            return g.op1("Add", [main, offset], name=f"{prefix}/AddMins")
        dense = [np.asarray(m.dequantize() if isinstance(m, Q4_1Matrix) else m) for m in matrices]
        w_t = np.ascontiguousarray(np.concatenate(dense, axis=0).T.astype(np.float32))
        return g.op1(
            "MatMul", [x, g.initializer(f"{prefix}.weight_t", w_t)], name=f"{prefix}/MatMul"
        )


Q8_ZERO_POINT = 128


def q8_0_blocks(matrix: F32Array) -> tuple[npt.NDArray[np.uint8], F32Array] | None:
    """Recover GGUF Q8_0 blocks from a dequantised ``[N, K]`` matrix, or None if not Q8_0.

    llama.cpp quantises a block with ``d = amax / 127`` so its largest element has
    ``|q| = 127``; after the fp16 rounding of ``d`` the stored values are exactly
    ``d * q``. Hence ``d = amax / 127`` (exact in float32) and ``q = v / d``. The result is
    only returned when ``d * q`` reproduces every value bit for bit, so using it is exact.
    Returns ``(q + 128 as uint8 [N, K/32, 32], d [N, K/32])``.
    """
    n, k = matrix.shape
    if k % Q4_1_BLOCK:
        return None
    blocks = matrix.reshape(n, k // Q4_1_BLOCK, Q4_1_BLOCK)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(d == 0, np.float32(1.0), d)
    q = np.rint(blocks / safe[..., None])
    if np.abs(q).max(initial=0.0) > 127:
        return None
    if not np.array_equal((q * d[..., None]).astype(np.float32), blocks):
        return None
    return (q + Q8_ZERO_POINT).astype(np.uint8), d


class Q8Table:
    """One Q8_0 ``[N, K]`` table used as a ``GatherBlockQuantized`` embedding and/or an LM
    head; every form dequantises to ``(u - 128) * d``, i.e. exactly the GGUF values.

    The head runs as ``MatMulNBits`` bits=8 (zero point 128) on the int8 path, or, with fp32
    activations, as two 4-bit halves of the same numbers (:meth:`matmul_fp32`). Initializers
    are written on first use, so a shard holds only the forms it runs."""

    def __init__(self, g: GraphBuilder, prefix: str, quants: npt.NDArray[np.uint8], d: F32Array):
        self.g = g
        self.prefix = prefix
        self.quants = quants
        self.d = d
        self.n, blocks, _ = quants.shape
        self.k = blocks * Q4_1_BLOCK
        self._q8: tuple[str, str, str] | None = None

    def _q8_inputs(self) -> tuple[str, str, str]:
        """Weights, scales and zero points in the ``MatMulNBits`` bits=8 layout."""
        if self._q8 is None:
            g, p = self.g, self.prefix
            self._q8 = (
                g.initializer(f"{p}.q8_weight", self.quants),
                g.initializer(f"{p}.q8_scales", self.d.reshape(-1)),
                g.initializer(
                    f"{p}.q8_zero_points", np.full(self.d.size, Q8_ZERO_POINT, dtype=np.uint8)
                ),
            )
        return self._q8

    def gather(self, ids: str) -> str:
        g, blocks = self.g, self.k // Q4_1_BLOCK
        weight, scales, zeros = self._q8_inputs()
        return g.op1(
            "GatherBlockQuantized",
            [
                g.op1("Reshape", [weight, g.i64(self.n, self.k)]),
                ids,
                g.op1("Reshape", [scales, g.i64(self.n, blocks)]),
                g.op1("Reshape", [zeros, g.i64(self.n, blocks)]),
            ],
            domain=MS_DOMAIN,
            name="embed/GatherBlockQuantized",
            bits=8,
            block_size=Q4_1_BLOCK,
            gather_axis=0,
            quantize_axis=1,
        )

    def matmul(self, x: str, accuracy_level: int) -> str:
        return self.g.op1(
            "MatMulNBits",
            [x, *self._q8_inputs()],
            domain=MS_DOMAIN,
            name="lm_head/MatMulNBits",
            K=self.k,
            N=self.n,
            bits=8,
            block_size=Q4_1_BLOCK,
            accuracy_level=accuracy_level,
        )

    def matmul_fp32(self, x: str) -> str:
        """The head for fp32 activations without rounding a weight, on the 4-bit kernel.

        ``MatMulNBits`` bits=8 has no fast fp32 path (~30x slower than a dense ``Gemm``), and
        the dense ``Gemm`` reads a 4-byte float per weight. Each stored ``u = q + 128`` is
        two nibbles, ``q = 16 (hi - 8) + lo``, so ``d q = (16 d)(hi - 8) + d (lo - 0)``: two
        4-bit matmuls (scales ``16 d``, exact in float32, with the default zero point 8; and
        ``d`` with zero point 0) whose sum is ``x @ (d q)`` up to float32 summation order,
        like every other matmul here. A quarter of the bytes per token; measured faster
        than the ``Gemm`` on AVX-512 (docs/model-format.md)."""
        g, p = self.g, self.prefix
        hi, lo = self.quants >> 4, self.quants & 0x0F
        halves = [
            (hi, (self.d * np.float32(16.0)).astype(np.float32), None),
            (lo, self.d, zero_points_4bit(self.n, self.k, 0)),
        ]
        outs = []
        for name, (nibbles, scales, zeros) in zip(("hi", "lo"), halves, strict=True):
            packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
            inputs = [
                x,
                g.initializer(f"{p}.head_{name}_qweight", packed),
                g.initializer(f"{p}.head_{name}_scales", scales.reshape(-1)),
            ]
            if zeros is not None:
                inputs.append(g.initializer(f"{p}.head_{name}_zero_points", zeros))
            outs.append(
                g.op1(
                    "MatMulNBits",
                    inputs,
                    domain=MS_DOMAIN,
                    name=f"lm_head/{name}/MatMulNBits",
                    K=self.k,
                    N=self.n,
                    bits=4,
                    block_size=Q4_1_BLOCK,
                    accuracy_level=0,
                )
            )
        return g.op1("Add", outs, name="lm_head/Add")
