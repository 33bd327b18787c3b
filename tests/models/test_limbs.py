"""Int8 limbs: fp32 activations through MatMulNBits' int8 kernel without losing precision."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from onnx import TensorProto

from p2pedge.models.convert.onnx_ops import INT8_LIMBS, GraphBuilder, Linear
from p2pedge.models.convert.weights import Q4_1_BLOCK, Q4_1Matrix

K, N = 256, 96


def _q4_1(rng: np.random.Generator) -> Q4_1Matrix:
    blocks = K // Q4_1_BLOCK
    scales = (0.02 * rng.uniform(0.5, 1.5, (N, blocks))).astype(np.float16).astype(np.float32)
    mins = (-7.5 * scales * rng.uniform(0.8, 1.2, (N, blocks))).astype(np.float16)
    quants = rng.integers(0, 256, size=(N, blocks, Q4_1_BLOCK // 2), dtype=np.uint8)
    return Q4_1Matrix(N, K, scales, mins.astype(np.float32), quants)


def _activations(rng: np.random.Generator, rows: int) -> npt.NDArray[np.float32]:
    """Magnitudes spread over ~6 decades, plus the awkward blocks: all zero, one spike."""
    x = rng.standard_normal((1, rows, K)) * np.exp(2.0 * rng.standard_normal((1, rows, K)))
    x[0, 0, :Q4_1_BLOCK] = 0.0
    x[0, 0, Q4_1_BLOCK : 2 * Q4_1_BLOCK] = 0.0
    x[0, 0, Q4_1_BLOCK + 5] = 3.0e4
    return x.astype(np.float32)


def _run(
    matrix: Q4_1Matrix, x: npt.NDArray[np.float32], accuracy_level: int, limbs: bool
) -> npt.NDArray[np.float32]:
    return run_matmul(lambda g: Linear(g, accuracy_level, limbs=limbs)("x", [matrix], "m"), x, N)


def run_matmul(
    emit: Callable[[GraphBuilder], str], x: npt.NDArray[np.float32], n: int
) -> npt.NDArray[np.float32]:
    """Run the graph ``emit`` builds from input ``x`` ``[1, s, K]`` to a ``[1, s, n]``
    output, on one onnxruntime CPU thread."""
    g = GraphBuilder("matmul")
    g.add_input("x", TensorProto.FLOAT, [1, "s", x.shape[-1]])
    g.op("Identity", [emit(g)], outputs=["y"])
    g.add_output("y", TensorProto.FLOAT, [1, "s", n])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(g.model().SerializeToString(), opts, ["CPUExecutionProvider"])
    y: npt.NDArray[np.float32] = sess.run(None, {"x": x})[0]
    return y


@pytest.mark.parametrize("rows", [1, 5])
def test_limbs_are_as_precise_as_the_fp32_kernel(rows: int) -> None:
    rng = np.random.default_rng(rows)
    matrix = _q4_1(rng)
    x = _activations(rng, rows)
    exact = x.astype(np.float64) @ matrix.dequantize().astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(matrix.dequantize()).astype(np.float64).T

    def err(y: npt.NDArray[np.float32]) -> float:
        return float((np.abs(y - exact) / scale).max())  # relative to the sum's magnitude

    fp32, limbs, int8 = (
        _run(matrix, x, 0, False),
        _run(matrix, x, 0, True),
        _run(matrix, x, 4, False),
    )
    assert np.isfinite(limbs).all()
    # Float32 rounding, relative to the size of each dot product's terms: both kernels stay
    # within a few dozen ulps (measured ~1e-6); one int8 pass is ~1000x worse.
    bound = 32 * float(np.finfo(np.float32).eps)
    assert err(fp32) <= bound
    assert err(limbs) <= bound, (err(limbs), err(fp32))
    assert err(int8) > 100 * bound


def test_three_limbs_sum_to_the_input_exactly() -> None:
    rng = np.random.default_rng(3)
    x = _activations(rng, 2)
    g = GraphBuilder("split")
    g.add_input("x", TensorProto.FLOAT, [1, 2, K])
    g.op("Identity", [Linear(g, 0, limbs=True).limbs("x", K)], outputs=["limbs"])
    g.add_output("limbs", TensorProto.FLOAT, [1, 2, INT8_LIMBS, K])
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    limbs = sess.run(None, {"x": x})[0]
    assert np.array_equal(limbs.astype(np.float64).sum(axis=2), x.astype(np.float64))
    # Limbs 1 and 2 are int8 steps of their block's own scale, with a full-scale element.
    for limb in (limbs[:, :, 0], limbs[:, :, 1]):
        blocks = limb.reshape(-1, Q4_1_BLOCK).astype(np.float64)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        live = amax[:, 0] > 0
        steps = blocks[live] / amax[live] * 127
        assert np.allclose(steps, np.rint(steps), atol=1e-4)
        assert np.allclose(np.abs(steps).max(axis=1), 127.0)
