"""Embedding and LM-head tables kept as their GGUF integers: Q8_0 (:class:`Q8Table`) and
every other quantised type (:class:`QuantTable`), gathered and multiplied exactly."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from p2pedge.models.convert.onnx_ops import (
    MS_DOMAIN,
    F32Array,
    GraphBuilder,
    Linear,
    NBits,
    zero_points_4bit,
)
from p2pedge.models.convert.weights import Q4_1_BLOCK, QuantMatrix

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


class QuantTable:
    """A quantised ``[vocab, hidden]`` table (a K-quant embedding or head) kept as its
    integers: gathered with ``GatherBlockQuantized`` (plus the gathered per-block offsets)
    and used as the head through :meth:`Linear.nbits_matmul`; one set of initializers
    ``<prefix>.nbits_*`` serves both, written on first use."""

    def __init__(self, linear: Linear, prefix: str, matrix: QuantMatrix) -> None:
        self.linear = linear
        self.prefix = prefix
        self.matrix = matrix
        self._inputs: NBits | None = None

    def inputs(self) -> NBits:
        if self._inputs is None:
            self._inputs = self.linear.nbits_inputs(self.prefix, [self.matrix])
        return self._inputs

    def _gather(self, ids: str, weight: str, scales: str, zeros: str, bits: int, name: str) -> str:
        g, m = self.linear.g, self.matrix
        blocks = m.in_features // m.block
        zeros_per_row = blocks if bits == 8 else (blocks + 1) // 2
        return g.op1(
            "GatherBlockQuantized",
            [
                g.op1("Reshape", [weight, g.i64(m.out_features, m.in_features * bits // 8)]),
                ids,
                g.op1("Reshape", [scales, g.i64(m.out_features, blocks)]),
                g.op1("Reshape", [zeros, g.i64(m.out_features, zeros_per_row)]),
            ],
            domain=MS_DOMAIN,
            name=name,
            bits=bits,
            block_size=m.block,
            gather_axis=0,
            quantize_axis=1,
        )

    def gather(self, ids: str) -> str:
        """Rows ``ids``; as two 4-bit halves when the head runs so (their sum may round
        by an ulp where ``s (q - z)`` needs over 24 bits)."""
        g, m, w = self.linear.g, self.matrix, self.inputs()
        blocks = m.in_features // m.block
        name = "embed/GatherBlockQuantized"
        values = self._gather(ids, w.weight, w.scales, w.zeros, w.bits, name)
        if w.hi is not None:
            high = self._gather(ids, *w.hi, 4, "embed/hi/GatherBlockQuantized")
            values = g.op1("Add", [high, values], name="embed/AddHalves")
        if w.mins_t is None:
            return values
        # [vocab, blocks] rows (onnxruntime folds the constant Transpose at load), so that
        # a Gather on input_ids always indexes a table with one row per token
        rows = g.op1("Transpose", [w.mins_t], perm=[1, 0])
        mins = g.op1("Unsqueeze", [g.op1("Gather", [rows, ids], axis=0), g.i64(-1)])
        blocked = g.op1("Reshape", [values, g.i64(0, 0, blocks, m.block)])
        summed = g.op1("Add", [blocked, mins], name="embed/AddMins")
        return g.op1("Reshape", [summed, g.i64(0, 0, m.in_features)])

    def matmul(self, x: str) -> str:
        return self.linear.nbits_matmul(x, self.inputs(), "lm_head")
