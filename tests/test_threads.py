"""Row-partitioned kernels (one accumulator per OpenMP thread, single-threaded BLAS inside) against the
independent references of tests/reference.py, on problems large enough that the partitioned path runs.

The partitioned path only runs with 2 or more threads; these tests are skipped on a 1-core machine."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import pyinfluence
from pyinfluence import _core

import reference as ref

torch.set_num_threads(1)

THREADS = min(2, os.cpu_count() or 1)
pytestmark = pytest.mark.skipif(
    not _core.has_openmp or THREADS < 2, reason="row partitioning needs OpenMP and 2 threads"
)

# (family, K, d, n): n·p² ≥ 1e7, the threshold the fixture below sets, so that partition_threads() picks more
# than one thread (the default threshold, 2e9 flops, would run problems this small on one thread)
PROBLEMS = [("logistic", 1, 60, 3000), ("multinomial", 3, 30, 3000), ("squared", 1, 60, 3000)]


@pytest.fixture(autouse=True)
def two_threads():
    before = pyinfluence.get_num_threads()
    threshold = _core.parallel_min_flops()
    pyinfluence.set_num_threads(THREADS)
    _core.set_parallel_min_flops(1e7)
    yield
    _core.set_parallel_min_flops(threshold)
    pyinfluence.set_num_threads(before)


def test_small_work_runs_on_one_thread():
    _core.set_parallel_min_flops(2e9)  # the default
    assert _core.parallel_min_flops() == 2e9
    assert _core.partition_threads(3000, 1.9e9) == 1
    assert _core.partition_threads(100_000, 2.1e9) == THREADS
    _core.set_parallel_min_flops(-5.0)  # negative counts as 0: always split when rows allow
    assert _core.parallel_min_flops() == 0.0
    assert _core.partition_threads(3000, 1.0) == THREADS


@pytest.mark.skipif(_core.blas_threads() < 0, reason="the core's BLAS pool is not one pyinfluence controls")
def test_serial_sections_restore_blas_threads_across_caller_threads():
    # Small calls (below the threshold) switch the core's BLAS pool to one thread while they run. Several Python
    # threads in the core at once (the GIL is released) must leave the pool as configured, not at 1.
    import threading

    _core.set_parallel_min_flops(2e9)
    spec, cs, X, y, Xt, yt, theta = _setup("multinomial", 3, 30, 3000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = _core.LinearEngine(cs, X, y, theta, 0.05)
    want = engine.up_loss(Xt, yt, None, None)
    assert _core.blas_threads() == THREADS
    errors = []

    def work():
        try:
            for _ in range(30):
                got = engine.up_loss(Xt, yt, None, None)
                assert np.array_equal(got, want) or rel(got, want) <= 1e-12
                engine.self_influence(None, None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert _core.blas_threads() == THREADS


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
