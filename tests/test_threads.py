"""Row-partitioned kernels (one accumulator per OpenMP thread, single-threaded BLAS inside) against the
independent references of tests/reference.py, on problems large enough that the partitioned path runs.

The partitioned path only runs with 2 or more threads; these tests are skipped on a 1-core machine."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

import pyinfluence
from pyinfluence import _core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

torch.set_num_threads(1)

THREADS = min(2, os.cpu_count() or 1)
pytestmark = pytest.mark.skipif(
    not _core.has_openmp or THREADS < 2, reason="row partitioning needs OpenMP and 2 threads"
)

# (family, K, d, n): n·p² ≥ 1e7 so that partition_threads() picks more than one thread
PROBLEMS = [("logistic", 1, 60, 3000), ("multinomial", 3, 30, 3000), ("squared", 1, 60, 3000)]


@pytest.fixture(autouse=True)
def two_threads():
    before = pyinfluence.get_num_threads()
    pyinfluence.set_num_threads(THREADS)
    yield
    pyinfluence.set_num_threads(before)


def _setup(family, K, d, n, dtype=np.float64):
    X, y, Xt, yt = ref.make_problem(family, n, d, n_classes=K, seed=11, m_test=6)
    spec = ref.Spec(family, K, True, False, 1e-2)
    rng = np.random.default_rng(3)
    theta = rng.normal(scale=0.1, size=(K, d + 1))  # any θ: the kernels do not assume an optimum
    core_spec = _core.ModelSpec(family, K, True, False, 1e-2, 1.0)
    cast = lambda a: np.ascontiguousarray(a.astype(dtype))  # noqa: E731
    return spec, core_spec, cast(X), cast(y), cast(Xt), cast(yt), cast(theta)


def rel(got, want):
    return np.abs(np.asarray(got, float) - want).max() / np.abs(want).max()


@pytest.mark.parametrize("family,K,d,n", PROBLEMS)
def test_partition_is_used(family, K, d, n):
    p = K * (d + 1)
    assert _core.partition_threads(n, float(n) * p * p) == THREADS


@pytest.mark.parametrize("family,K,d,n", PROBLEMS)
@pytest.mark.parametrize("weighted", [False, True])
def test_hessian(family, K, d, n, weighted):
    spec, cs, X, y, _, _, theta = _setup(family, K, d, n)
    w = np.random.default_rng(5).uniform(0.0, 2.0, size=n) if weighted else None
    want = ref.hessian(spec, X, y, theta, weights=w)
    got = _core.hessian(cs, X, y, theta, w)
    assert rel(got, want) <= 1e-10


@pytest.mark.parametrize("family,K,d,n", PROBLEMS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_engine_scores(family, K, d, n, dtype):
    spec, cs, X, y, Xt, yt, theta = _setup(family, K, d, n, dtype)
    tol = 1e-8 if dtype == np.float64 else 2e-4
    damping = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = _core.LinearEngine(cs, X, y, theta, damping)
    want_up = ref.up_loss(spec, X, y, theta, Xt, yt, damping=damping)
    assert rel(engine.up_loss(Xt, yt, None, None), want_up) <= tol
    idx = np.arange(0, n, 3)
    assert rel(engine.up_loss(Xt, yt, X[idx], y[idx]), want_up[idx]) <= tol
    want_self = ref.self_influence(spec, X, y, theta, damping=damping)
    assert rel(engine.self_influence(None, None), want_self) <= tol
