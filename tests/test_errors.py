"""The error contract: typed exceptions with structured fields, from the C++ core up to the public API.

- Every exception of pyinfluence.errors derives from PyInfluenceError and from a builtin; the fields survive
  pickling and default to None.
- The core (pyinfluence._core) raises pyinfluence.errors' classes with their fields set: a failed Cholesky
  factorisation names its pivot, the matrix order, the pivot's value (the Schur complement, also past the first
  block of the blocked/LAPACK factorisation) and a damping that makes that pivot positive.
- LinearInfluence, the estimators' fits, the leave-one-out queries and the torch path's Exact solver pass the
  fields on (Python reads them; nothing parses messages), and their messages keep naming pivot and damping.
- NonFiniteError says what overflowed and where (the likely input).
- The enums the binding exposes (_core.Status, _core.Family) have the values of the C++ enums (static_asserts in
  bindings.cpp keep them so).
- pyinfluence.runtime validates its arguments like set_num_threads does.
"""

from __future__ import annotations

import builtins
import math
import pickle
import warnings

import numpy as np
import pytest

import pyinfluence
from pyinfluence import _core, errors, runtime
from pyinfluence.errors import (
    ConvergenceError,
    NonFiniteError,
    NotAtOptimumWarning,
    NotPositiveDefiniteError,
    PyInfluenceError,
)

# -- the class hierarchy -------------------------------------------------------------------------------------------
_EXPECTED_BUILTINS = {
    "NotPositiveDefiniteError": (ValueError,),
    "ConvergenceError": (RuntimeError,),
    "NonFiniteError": (ArithmeticError,),
    "NotFittedError": (ValueError, AttributeError),
    "DataError": (ValueError,),
}


def _exception_classes(namespace, names):
    out = {}
    for name in names:
        obj = getattr(namespace, name)
        if isinstance(obj, type) and issubclass(obj, BaseException) and not issubclass(obj, Warning):
            out[name] = obj
    return out


def test_every_exception_is_a_pyinfluence_error_and_a_builtin():
    classes = _exception_classes(errors, errors.__all__)
    assert set(classes) == {"PyInfluenceError", *_EXPECTED_BUILTINS}
    builtin_exceptions = {
        c for c in vars(builtins).values() if isinstance(c, type) and issubclass(c, BaseException)
    }
    for name, cls in classes.items():
        assert issubclass(cls, PyInfluenceError), name
        if cls is PyInfluenceError:
            continue
        for base in _EXPECTED_BUILTINS[name]:
            assert issubclass(cls, base), (name, base)
        # a builtin other than the catch-alls, so that `except ValueError` etc. catch it
        assert any(b in builtin_exceptions and b not in (Exception, BaseException) for b in cls.__mro__), name


def test_package_exports_the_base_class_and_every_exception_derives_from_it():
    assert pyinfluence.PyInfluenceError is PyInfluenceError
    exported = _exception_classes(pyinfluence, [n for n in pyinfluence.__all__ if n.endswith("Error")])
    assert "PyInfluenceError" in exported and "NotPositiveDefiniteError" in exported
    for name, cls in exported.items():
        assert issubclass(cls, PyInfluenceError), name


def test_warnings_are_builtin_warning_categories():
    assert issubclass(errors.ConvergenceWarning, RuntimeWarning)
    assert issubclass(NotAtOptimumWarning, UserWarning)


def test_fields_default_to_none_and_survive_pickling():
    plain = NotPositiveDefiniteError("plain")
    fields = (plain.pivot, plain.size, plain.min_pivot, plain.suggested_damping, plain.train_index)
    assert fields == (None,) * 5
    assert str(plain) == "plain"
    cases = [
        NotPositiveDefiniteError("m", pivot=3, size=5, min_pivot=-0.5, suggested_damping=1.1, train_index=2),
        ConvergenceError("c", iterations=7, grad_norm=1e-3, residual=0.2, tol=1e-10),
        NonFiniteError("n", what="the influence scores up_loss", where="X_test"),
    ]
    for exc in cases:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and vars(back) == vars(exc)
    assert ConvergenceError("x").result is None


# -- the core: typed exceptions with fields ------------------------------------------------------------------------
def _spd(p, seed=0):
    M = np.random.default_rng(seed).standard_normal((p, p))
    return M @ M.T + np.eye(p)


def _schur(A, j):
    """d_j = A_jj − a_jᵀ A₁₁⁻¹ a_j: the value of pivot j of a Cholesky factorisation of A."""
    b = A[j, :j]
    return float(A[j, j] - b @ np.linalg.solve(A[:j, :j], b))


# (200, 150) and (300, 40): pivots past the first block of a blocked factorisation (LAPACK's potrf or Eigen's)
@pytest.mark.parametrize("p,j", [(6, 2), (200, 150), (300, 40)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_core_cholesky_reports_pivot_size_value_and_a_working_damping(p, j, dtype):
    A = _spd(p, seed=p)
    A[j, j] -= 1e4
    with pytest.raises(NotPositiveDefiniteError, match=rf"not positive definite.*pivot {j}\b") as info:
        _core.CholeskyFactor(A.astype(dtype))
    exc = info.value
    assert isinstance(exc, ValueError) and isinstance(exc, PyInfluenceError)
    assert exc.pivot == j and exc.size == p and exc.train_index is None
    want = _schur(A, j)
    assert exc.min_pivot == pytest.approx(want, rel=1e-3 if dtype == np.float32 else 1e-8)
    assert exc.suggested_damping > -want  # the pivot rises by at least the damping
    _core.CholeskyFactor(A.astype(dtype), exc.suggested_damping)  # this matrix has one indefinite direction


def test_core_cholesky_numerically_singular_pivot():
    v = np.ones(10)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite") as info:
        _core.CholeskyFactor(np.outer(v, v))  # rank one
    exc = info.value
    assert exc.size == 10 and 0 <= exc.pivot < 10
    assert exc.min_pivot <= 10 * np.finfo(np.float64).eps * 1.0  # at most the threshold p·ε·max|diag|
    assert 0 < exc.suggested_damping < 1e-6
    _core.CholeskyFactor(np.outer(v, v), exc.suggested_damping)


def test_core_engine_and_fit_raise_typed_errors():
    X, y = _zero_column_problem()
    spec = _core.ModelSpec("squared", 1, True, False, 0.0)
    theta = np.zeros((1, 5))
    with pytest.raises(NotPositiveDefiniteError, match="pivot 3.*damping > 0") as info:
        _core.LinearEngine(spec, X, y, theta, 0.0)
    assert (info.value.pivot, info.value.size) == (3, 5)
    assert info.value.min_pivot == 0.0 and info.value.suggested_damping > 0
    engine = _core.LinearEngine(spec, X, y, theta, info.value.suggested_damping)
    assert not hasattr(engine, "factorized") and not hasattr(engine, "failed_pivot")  # no half-built engine
    np.testing.assert_allclose(
        engine.solve(np.eye(5)) @ (engine.hessian() + info.value.suggested_damping * np.eye(5)),
        np.eye(5),
        atol=1e-8,
    )
    with pytest.raises(NotPositiveDefiniteError, match="Newton's method") as info:
        _core.fit_newton(spec, X, y, theta)
    assert (info.value.pivot, info.value.size) == (3, 5)
    big = X.copy()
    big[4] = 1e160
    with pytest.raises(NonFiniteError, match="training Hessian") as nf:
        _core.LinearEngine(spec, big, y, theta, 1e-3)
    assert nf.value.what == "the training Hessian H (or the training residuals)"
    assert nf.value.where is None  # the core does not guess; LinearInfluence does


# -- the public API passes the fields on ---------------------------------------------------------------------------
def _zero_column_problem(n=40, seed=3):
    rng = np.random.default_rng(seed)
    X = np.hstack([rng.standard_normal((n, 3)), np.zeros((n, 1))])  # column 3 is zero: H has a zero pivot
    y = X[:, :3] @ np.array([1.0, 2.0, -1.0]) + 0.1 * rng.standard_normal(n)
    return X, y


def test_linear_influence_not_positive_definite_fields():
    X, y = _zero_column_problem()
    model = pyinfluence.RidgeRegression(l2=1e-2).fit(X, y)
    model.l2 = 0.0  # the same θ̂ (the zero column's weight is 0), objective without the penalty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAtOptimumWarning)
        with pytest.raises(NotPositiveDefiniteError, match=r"pivot 3.*damping=λ > 0") as info:
            pyinfluence.LinearInfluence(model, X, y)
        exc = info.value
        assert (exc.pivot, exc.size, exc.min_pivot) == (3, 5, 0.0)
        assert exc.suggested_damping is not None and exc.suggested_damping > 0
        assert "l2=0" in str(exc)
        inf = pyinfluence.LinearInfluence(model, X, y, damping=exc.suggested_damping)
    assert np.all(np.isfinite(inf.up_loss(X[:2], y[:2])))


def test_leave_one_out_names_the_training_point():
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([1.0, 2.0])
    model = pyinfluence.RidgeRegression(l2=0.0, fit_intercept=False).fit(X, y)
    inf = pyinfluence.LinearInfluence(model, X, y)
    for i in (0, 1):
        match = f"without training point {i}.*damping > 0"
        with pytest.raises(NotPositiveDefiniteError, match=match) as info:
            inf.loo_change(X, y, train_idx=[i], method="newton")
        assert info.value.train_index == i and info.value.size == 2
        with pytest.raises(NotPositiveDefiniteError) as group:
            inf.loo_change(X, y, train_idx=[i], method="newton", group=True)
        assert group.value.size == 2 and group.value.pivot is not None


def test_estimator_fit_on_a_singular_hessian_chains_the_diagnosis():
    X, y = _zero_column_problem()
    with pytest.raises(ConvergenceError, match="l2 > 0") as info:
        pyinfluence.RidgeRegression(l2=0.0).fit(X, y)
    cause = info.value.__cause__
    assert isinstance(cause, NotPositiveDefiniteError)
    assert (cause.pivot, cause.size) == (3, 5)
    assert info.value.tol == pytest.approx(1e-10)


def test_estimator_fit_that_runs_out_of_iterations_reports_them():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 4))
    y = (X @ np.array([1.0, -2.0, 0.5, 1.0]) + rng.standard_normal(200) > 0).astype(int)
    with pytest.raises(ConvergenceError, match="did not converge in 1 iterations") as info:
        pyinfluence.LogisticRegression(l2=1e-2, max_iter=1).fit(X, y)
    exc = info.value
    assert exc.iterations == 1 and exc.tol == pytest.approx(1e-10)
    assert exc.grad_norm is not None and exc.grad_norm > exc.tol


def test_non_finite_error_says_what_and_where():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 3))
    y = X @ np.array([1.0, 0.5, -1.0]) + 0.1 * rng.standard_normal(60)
    model = pyinfluence.RidgeRegression(l2=1e-2).fit(X, y)
    inf = pyinfluence.LinearInfluence(model, X, y)
    with pytest.raises(NonFiniteError, match="X_test is the likely cause") as info:
        inf.up_loss(X[:2] * 1e200, y[:2])
    assert info.value.where == "X_test"
    assert info.value.what and str(info.value).startswith(info.value.what)
    X_bad = X.copy()
    X_bad[7] = 1e160
    with pytest.raises(NonFiniteError, match="X_train is the likely cause") as info:
        pyinfluence.LinearInfluence(model, X_bad, y)
    assert info.value.where == "X_train"
    assert info.value.what == "the training Hessian H (or the training residuals)"
    assert not isinstance(info.value, NotPositiveDefiniteError)


class _DenseOperator:
    """The least a Hessian operator needs for Exact: n_params, dtype, device and dense()."""

    def __init__(self, H):
        import torch

        self._H = torch.as_tensor(H, dtype=torch.float64)
        self.n_params = int(H.shape[0])
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def dense(self):
        return self._H.clone()


def test_torch_exact_solver_fields():
    pytest.importorskip("torch")
    from pyinfluence.torch.solvers import Exact

    H = _spd(9, seed=4) / 10
    H[3, 3] -= 20.0  # indefinite: the core's factorisation fails at pivot 3
    lam_min = float(np.linalg.eigvalsh(H)[0])
    with pytest.raises(NotPositiveDefiniteError, match=r"pivot 3.*damping=") as info:
        Exact().prepare(_DenseOperator(H))
    exc = info.value
    assert exc.pivot == 3 and exc.size == 9
    assert exc.min_pivot == pytest.approx(_schur(H, 3), rel=1e-8)
    assert exc.suggested_damping > -lam_min  # from H's spectrum: enough for the whole matrix
    Exact().prepare(_DenseOperator(H), exc.suggested_damping)


def test_cuda_engine_wrapper_reports_the_same_fields():
    """CudaLinearEngine's factorisation (torch on any device; here CPU tensors) raises as the CPU engine does."""
    torch = pytest.importorskip("torch")
    from pyinfluence.linear import cuda as _cuda

    X, y = _zero_column_problem()
    spec = _core.ModelSpec("squared", 1, True, False, 0.0)
    theta = np.zeros((1, 5))
    H = _core.hessian(spec, X, y, theta)
    engine = object.__new__(_cuda.CudaLinearEngine)  # only what _factorize reads
    engine._torch, engine._spec, engine._damping = torch, spec, 0.0
    engine._device, engine._tdtype = torch.device("cpu"), torch.float64
    engine._K, engine._d, engine._de, engine._p = 1, 4, 5, 5
    engine._H, engine._R = torch.from_numpy(H), torch.zeros(len(y), 1, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="pivot 3") as info:
        engine._factorize()
    with pytest.raises(NotPositiveDefiniteError) as core:
        _core.LinearEngine(spec, X, y, theta, 0.0)
    assert (info.value.pivot, info.value.size, info.value.min_pivot) == (3, 5, 0.0)
    assert info.value.suggested_damping == pytest.approx(core.value.suggested_damping)


# -- the enums the binding exposes ---------------------------------------------------------------------------------
def test_bound_enums_have_the_cpp_values():
    status = {name: int(member) for name, member in _core.Status.__members__.items()}
    assert status == {"ok": 0, "not_positive_definite": 1, "not_converged": 2, "non_finite": 3}
    family = {name: int(member) for name, member in _core.Family.__members__.items()}
    assert family == {"logistic": 0, "multinomial": 1, "smooth_hinge": 2, "squared": 3}
    for name in family:  # ModelSpec.family reports the same names
        assert _core.ModelSpec(name, 3 if name == "multinomial" else 1, True, False, 0.1).family == name


# -- pyinfluence.runtime -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None, 10**9])
def test_set_num_threads_validates(bad):
    with pytest.raises(ValueError, match="n must be"):
        runtime.set_num_threads(bad)


def test_num_threads_round_trip():
    before = runtime.get_num_threads()
    try:
        runtime.set_num_threads(1)
        assert runtime.get_num_threads() == 1
    finally:
        runtime.set_num_threads(before)
    assert runtime.get_num_threads() == before


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True, "1e9", None, [1e9]])
def test_set_parallel_min_flops_validates(bad):
    before = runtime.get_parallel_min_flops()
    with pytest.raises(ValueError, match="flops must be a real number >= 0"):
        runtime.set_parallel_min_flops(bad)
    assert runtime.get_parallel_min_flops() == before  # nothing changed


def test_parallel_min_flops_round_trip():
    before = runtime.get_parallel_min_flops()
    try:
        for value in (0, 1e7, np.float32(5e8), math.inf):
            runtime.set_parallel_min_flops(value)
            assert runtime.get_parallel_min_flops() == float(value)
    finally:
        runtime.set_parallel_min_flops(before)
    assert runtime.get_parallel_min_flops() == before == _core.parallel_min_flops()


def test_build_features():
    assert runtime.has_openmp() is bool(_core.has_openmp)
    assert runtime.has_cuda() is bool(_core.has_cuda)


def test_package_exports_runtime():
    for name in ("set_num_threads", "get_num_threads"):
        assert getattr(pyinfluence, name) is getattr(runtime, name), name
