"""The Q8_0 head for fp32 activations: two 4-bit halves that add up to the table exactly."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from p2pedge.models.convert.tables import Q8_ZERO_POINT, Q8Table
from p2pedge.models.convert.weights import Q4_1_BLOCK
from tests.models.test_limbs import run_matmul

N, K = 200, 256


def _table(rng: np.random.Generator) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Q8_0 blocks as the GGUF stores them: fp16 scales, quants in [-127, 127] (+128)."""
    d = (rng.uniform(1e-3, 5e-2, (N, K // Q4_1_BLOCK))).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, size=(N, K // Q4_1_BLOCK, Q4_1_BLOCK))
    q[0, 0, :] = -127  # the extremes: nibbles 0x1 / 0x1 and 0xF / 0xF
    q[1, 0, :] = 127
    return (q + Q8_ZERO_POINT).astype(np.uint8), d


def _values(u: npt.NDArray[np.uint8], d: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    q = u.astype(np.float32) - np.float32(Q8_ZERO_POINT)
    return (q * d[..., None]).astype(np.float32).reshape(N, K)


def _head(
    u: npt.NDArray[np.uint8], d: npt.NDArray[np.float32], x: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    return run_matmul(lambda g: Q8Table(g, "t", u, d).matmul_fp32("x"), x, N)


def test_one_hot_rows_give_every_weight_bit_for_bit() -> None:
    u, d = _table(np.random.default_rng(0))
    y = _head(u, d, np.eye(K, dtype=np.float32)[None])  # row k of x picks column k of W
    assert np.array_equal(y[0].T, _values(u, d))


@pytest.mark.parametrize("rows", [1, 3])
def test_head_is_as_precise_as_a_dense_fp32_matmul(rows: int) -> None:
    rng = np.random.default_rng(rows)
    u, d = _table(rng)
    w = _values(u, d).astype(np.float64)
    x = (rng.standard_normal((1, rows, K)) * np.exp(rng.standard_normal((1, rows, K)))).astype(
        np.float32
    )
    exact = x.astype(np.float64) @ w.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T
    err = float((np.abs(_head(u, d, x) - exact) / scale).max())
    dense = float((np.abs((x @ w.T.astype(np.float32)) - exact) / scale).max())
    bound = 32 * float(np.finfo(np.float32).eps)  # float32 summation order, nothing more
    assert err <= bound, (err, dense)
