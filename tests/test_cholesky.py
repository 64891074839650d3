"""pyinfluence._core.CholeskyFactor against numpy's dense solves (independent LAPACK getrf path)."""

from __future__ import annotations

import numpy as np
import pytest

import pyinfluence  # noqa: F401  (loads the core's BLAS)
from pyinfluence import _core
from pyinfluence.errors import NotPositiveDefiniteError


def spd(p: int, seed: int = 0, cond_shift: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((p, p))
    return M @ M.T / p + cond_shift * np.eye(p)


@pytest.mark.parametrize("p", [1, 7, 300])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_solve_matches_numpy(p, damping):
    A = spd(p, seed=p)
    rng = np.random.default_rng(1)
    B = rng.standard_normal((p, 4))
    f = _core.CholeskyFactor(A, damping)
    want = np.linalg.solve(A + damping * np.eye(p), B)
    got = f.solve(B)
    assert got.shape == (p, 4) and f.size == p
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
    got1 = f.solve(np.ascontiguousarray(B[:, 0]))
    assert got1.shape == (p,)
    assert np.abs(got1 - want[:, 0]).max() <= 1e-10 * np.abs(want[:, 0]).max()


def test_float32():
    A = spd(50, seed=3)
    B = np.random.default_rng(2).standard_normal((50, 3))
    f = _core.CholeskyFactor(A.astype(np.float32))
    got = f.solve(B.astype(np.float32))
    assert got.dtype == np.float32
    want = np.linalg.solve(A, B)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_only_lower_triangle_is_read():
    A = spd(20, seed=4)
    garbage = A.copy()
    garbage[np.triu_indices(20, 1)] = 1e6
    B = np.ones((20, 1))
    np.testing.assert_allclose(
        _core.CholeskyFactor(garbage).solve(B),
        np.linalg.solve(A, B),
        rtol=1e-10,
    )


def test_indefinite_and_singular_raise():
    A = spd(10)
    A[4, 4] = -5.0
    with pytest.raises(NotPositiveDefiniteError, match="pivot"):
        _core.CholeskyFactor(A)
    _core.CholeskyFactor(A, 10.0)  # damping makes it positive definite
    v = np.ones(10)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        _core.CholeskyFactor(np.outer(v, v))  # rank one: exact zero pivots up to rounding


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        _core.CholeskyFactor(np.zeros((3, 4)))
    A = spd(5)
    A[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _core.CholeskyFactor(A)
    with pytest.raises(ValueError, match="damping"):
        _core.CholeskyFactor(spd(5), -1.0)
    f = _core.CholeskyFactor(spd(5))
    with pytest.raises(ValueError, match="5 rows"):
        f.solve(np.ones((4, 2)))
    with pytest.raises(ValueError, match="float64"):
        f.solve(np.ones((5, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        f.solve(np.ones((5, 4))[:, ::2])
