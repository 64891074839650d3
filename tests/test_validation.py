"""Bad input gets a clear Python exception that names the argument; nothing crashes.

Covers pyinfluence._validation, the estimators' argument checks, LinearInfluence's argument
checks, the non-positive-definite path, and a hypothesis fuzz of the raw _core bindings and of
LinearInfluence with random shapes/dtypes/values.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import pytest

import pyinfluence as pi
from pyinfluence import _core
from pyinfluence._validation import (
    as_float_matrix,
    as_float_vector,
    as_index_array,
    as_label_array,
    check_damping,
    check_int,
)
from pyinfluence.errors import (
    ConvergenceError,
    NotAtOptimumWarning,
    NotFittedError,
    NotPositiveDefiniteError,
)

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
def _data(n=40, d=5, seed=0, classes=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((classes, d))
    y = np.argmax(X @ W.T + 0.5 * rng.standard_normal((n, classes)), axis=1)
    return X, y


@pytest.fixture(scope="module")
def binary():
    X, y = _data()
    model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    return X, y, model, pi.LinearInfluence(model, X, y)


@pytest.fixture(scope="module")
def multi():
    X, y = _data(n=60, d=4, classes=3, seed=1)
    model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    return X, y, model, pi.LinearInfluence(model, X, y)


@pytest.fixture(scope="module")
def ridge():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(30)
    model = pi.RidgeRegression(l2=1e-2).fit(X, y)
    return X, y, model, pi.LinearInfluence(model, X, y)


# ------------------------------------------------------------------------------------------------
# as_float_matrix
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_matrix_keeps_float_dtype_without_copy(dtype):
    X = np.ones((3, 2), dtype=dtype)
    out = as_float_matrix("X", X)
    assert out is X


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.float16, np.longdouble])
def test_float_matrix_converts_others_to_float64(dtype):
    X = np.ones((3, 2), dtype=dtype)
    out = as_float_matrix("X", X)
    assert out.dtype == np.float64 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, 1.0)


def test_float_matrix_explicit_dtype_and_layout():
    X = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    out = as_float_matrix("X", X, np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, X)
    Y = np.arange(24.0).reshape(4, 6)[:, ::2]
    out = as_float_matrix("X", Y)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, Y)
    with pytest.raises(TypeError, match="dtype"):
        as_float_matrix("X", Y, np.int32)


def test_float_matrix_lists_and_1d():
    assert as_float_matrix("X", [[1, 2], [3, 4]]).dtype == np.float64
    out = as_float_matrix("X_test", [1.0, 2.0, 3.0], allow_1d=True)
    assert out.shape == (1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_matrix_torch_zero_copy(dtype):
    t = torch.randn(5, 3, dtype=dtype)
    out = as_float_matrix("X", t)
    assert out.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    assert np.shares_memory(out, t.numpy())


def test_float_matrix_torch_other_dtypes():
    t = torch.randn(5, 3, requires_grad=True)
    assert as_float_matrix("X", t).shape == (5, 3)  # detached, no error
    assert as_float_matrix("X", torch.randn(5, 3).to(torch.bfloat16)).dtype == np.float64
    assert as_float_matrix("X", torch.randint(0, 3, (5, 3))).dtype == np.float64
    assert as_float_matrix("X", torch.randn(3, 5).T).flags.c_contiguous
    with pytest.raises(TypeError, match="X_train.*complex"):
        as_float_matrix("X_train", torch.randn(5, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="X_train.*sparse"):
        as_float_matrix("X_train", torch.randn(5, 3).to_sparse())


def test_float_matrix_refuses_non_cpu_tensor():
    t = torch.empty(4, 3, device="meta")
    with pytest.raises(TypeError, match=r"X_test.*device 'meta'.*cpu\(\)"):
        as_float_matrix("X_test", t)


@pytest.mark.parametrize(
    "bad, exc, pattern",
    [
        (
            np.array([[1.0, np.nan], [0.0, 1.0]]),
            ValueError,
            r"X_train contains NaN.*row 0, column 1",
        ),
        (
            np.array([[1.0, 0.0], [np.inf, 1.0]]),
            ValueError,
            r"X_train contains NaN or infinity.*infinity at row 1",
        ),
        (
            np.array([[1.0, 0.0], [-np.inf, 1.0]], dtype=np.float32),
            ValueError,
            "X_train contains NaN",
        ),
        (np.ones(3), ValueError, r"X_train must be a 2-D array.*1-D"),
        (np.ones((2, 2, 2)), ValueError, r"X_train must be .*2-D.*3-D"),
        (np.float64(1.0), ValueError, r"X_train must be .*2-D.*0-D"),
        (np.ones((0, 3)), ValueError, "X_train is empty"),
        (np.ones((3, 0)), ValueError, "X_train is empty"),
        (np.ones((2, 2), dtype=complex), TypeError, "X_train has complex dtype"),
        (np.array([[1, None]], dtype=object), TypeError, "X_train has dtype object"),
        (np.array([["a", "b"]]), TypeError, "X_train has dtype <U1"),
        ([[1.0, 2.0], [3.0]], ValueError, "X_train could not be converted"),
        (None, TypeError, "X_train is None"),
    ],
)
def test_float_matrix_rejects(bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        as_float_matrix("X_train", bad)


def test_float_matrix_rejects_sparse_and_masked():
    sp = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match=r"X is a sparse matrix.*toarray"):
        as_float_matrix("X", sp.csr_matrix(np.eye(3)))
    m = np.ma.masked_array(np.ones((2, 2)), mask=[[0, 1], [0, 0]])
    with pytest.raises(ValueError, match="X is a masked array"):
        as_float_matrix("X", m)


def test_float_matrix_feature_count_message():
    with pytest.raises(ValueError, match="X_test has 5 features but the model was trained on 64"):
        as_float_matrix("X_test", np.ones((2, 5)), n_features=64)


def test_finite_check_large_array_blocks():
    X = np.zeros((3000, 400))
    X[2999, 399] = np.nan
    with pytest.raises(ValueError, match="row 2999, column 399"):
        as_float_matrix("X", X)


# ------------------------------------------------------------------------------------------------
# vectors, labels, scalars, indices
# ------------------------------------------------------------------------------------------------
def test_float_vector():
    assert as_float_vector("y", np.arange(3)).dtype == np.float64
    assert as_float_vector("y", np.ones((3, 1)), np.float32).shape == (3,)
    assert as_float_vector("y_test", 2.5, allow_scalar=True).shape == (1,)
    with pytest.raises(ValueError, match="y contains NaN"):
        as_float_vector("y", [1.0, np.nan])
    with pytest.raises(ValueError, match="y has 2 entries but the features have 3 rows"):
        as_float_vector("y", [1.0, 2.0], n=3)
    with pytest.raises(ValueError, match="y must be a 1-D array"):
        as_float_vector("y", np.ones((2, 2)))
    with pytest.raises(ValueError, match="y must be a 1-D array.*scalar"):
        as_float_vector("y", 1.0)
    with pytest.raises(ValueError, match="y is empty"):
        as_float_vector("y", [])


def test_label_array():
    assert as_label_array("y", ["a", "b"]).dtype.kind == "U"
    with pytest.raises(ValueError, match="y_train contains NaN"):
        as_label_array("y_train", [0.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="y_train contains None"):
        as_label_array("y_train", np.array(["a", None], dtype=object))
    with pytest.raises(TypeError, match="y_train has complex dtype"):
        as_label_array("y_train", np.ones(3, dtype=complex))


def test_scalars():
    assert check_damping(0) == 0.0
    for bad in (-1e-3, np.nan, np.inf):
        with pytest.raises(ValueError, match="damping"):
            check_damping(bad)
    for bad in ("0.1", None, True, [0.1]):
        with pytest.raises(TypeError, match="damping"):
            check_damping(bad)
    assert check_int("k", np.int64(3), 1, 5) == 3
    with pytest.raises(ValueError, match=r"k must be <= 5 \(the number of training points\), got 6"):
        check_int("k", 6, 1, 5, maximum_what="the number of training points")
    with pytest.raises(TypeError, match="k must be an integer"):
        check_int("k", 2.0, 1, 5)


def test_index_array():
    np.testing.assert_array_equal(as_index_array("train_idx", 3, 10), [3])
    np.testing.assert_array_equal(as_index_array("train_idx", [-1, 0], 10), [9, 0])
    mask = np.zeros(10, dtype=bool)
    mask[[2, 5]] = True
    np.testing.assert_array_equal(as_index_array("train_idx", mask, 10), [2, 5])
    np.testing.assert_array_equal(as_index_array("train_idx", torch.tensor([1, 2]), 10), [1, 2])
    assert as_index_array("train_idx", [], 10).shape == (0,)
    assert as_index_array("train_idx", np.array([1, 2], dtype=np.uint8), 10).dtype == np.int64
    with pytest.raises(IndexError, match="train_idx contains index 10, out of range for 10"):
        as_index_array("train_idx", [0, 10], 10)
    with pytest.raises(IndexError, match="train_idx contains index -11"):
        as_index_array("train_idx", [-11], 10)
    with pytest.raises(ValueError, match="train_idx is a boolean array of length 2"):
        as_index_array("train_idx", [True, False], 10)
    with pytest.raises(TypeError, match="train_idx must be an integer index.*bool"):
        as_index_array("train_idx", True, 10)
    with pytest.raises(TypeError, match="train_idx must contain integer indices, got dtype float64"):
        as_index_array("train_idx", [1.0, 2.0], 10)
    with pytest.raises(ValueError, match="train_idx must be 1-D"):
        as_index_array("train_idx", [[1, 2]], 10)
    with pytest.raises(ValueError, match="repeated"):
        as_index_array("train_idx", [1, 1], 10, unique=True)
    with pytest.raises(ValueError, match="train_idx is empty"):
        as_index_array("train_idx", [], 10, allow_empty=False)


# ------------------------------------------------------------------------------------------------
# estimators
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, pattern, exc",
    [
        (lambda: pi.LogisticRegression(l2=-1.0), "l2 must be >= 0", ValueError),
        (lambda: pi.LogisticRegression(l2=np.nan), "l2 must be finite", ValueError),
        (lambda: pi.LogisticRegression(l2="big"), "l2 must be a real number", TypeError),
        (lambda: pi.LogisticRegression(max_iter=0), "max_iter must be >= 1", ValueError),
        (lambda: pi.LogisticRegression(tol=0.0), "tol must be > 0", ValueError),
        (
            lambda: pi.LogisticRegression(fit_intercept="yes"),
            "fit_intercept must be True or False",
            TypeError,
        ),
        (lambda: pi.SmoothHingeSVM(temperature=0.0), "temperature must be > 0", ValueError),
        (lambda: pi.RidgeRegression(l2=-0.5), "l2 must be >= 0", ValueError),
    ],
)
def test_estimator_hyperparameters(factory, pattern, exc):
    with pytest.raises(exc, match=pattern):
        factory()


def test_fit_rejects_bad_data():
    X, y = _data()
    m = pi.LogisticRegression()
    with pytest.raises(ValueError, match="y has 39 entries but the features have 40 rows"):
        m.fit(X, y[:-1])
    with pytest.raises(ValueError, match="y contains a single class"):
        m.fit(X, np.zeros(40))
    with pytest.raises(ValueError, match="y contains NaN"):
        m.fit(X, np.where(y == 0, np.nan, 1.0))
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        m.fit(Xn, y)
    with pytest.raises(ValueError, match="SmoothHingeSVM is a binary classifier but y has 3 classes"):
        pi.SmoothHingeSVM().fit(X, np.arange(40) % 3)
    with pytest.raises(ValueError, match="y must be a 1-D array"):
        pi.RidgeRegression().fit(X, np.ones((40, 2)))


def test_unfitted_model():
    m = pi.LogisticRegression()
    for call in (lambda: m.predict(np.ones((2, 2))), lambda: m.coef_, lambda: m.theta_):
        with pytest.raises(NotFittedError):
            call()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert not hasattr(m, "coef_")
    with pytest.raises(NotFittedError, match="not fitted yet; call fit"):
        pi.LinearInfluence(m, np.ones((3, 2)), [0, 1, 0])
    with pytest.raises(NotFittedError, match="not fitted yet"):
        pi.RidgeRegression().predict(np.ones((2, 2)))


def test_predict_checks_features_and_labels(binary):
    X, y, model, _ = binary
    with pytest.raises(ValueError, match="X has 4 features but the model was trained on 5"):
        model.predict(X[:, :4])
    with pytest.raises(
        ValueError, match=r"y contains label\(s\) 7 that are not among the model's classes \[0, 1\]"
    ):
        model.loss(X[:2], [0, 7])


def test_singular_fit_without_penalty_is_convergence_error():
    rng = np.random.default_rng(0)
    X = np.hstack([rng.standard_normal((20, 3)), np.zeros((20, 1))])  # a zero column: H singular
    y = rng.standard_normal(20)
    with pytest.raises(ConvergenceError, match="l2 > 0"):
        pi.RidgeRegression(l2=0.0).fit(X, y)


@pytest.mark.parametrize("make", [lambda: pi.LogisticRegression(l2=0.0), lambda: pi.SmoothHingeSVM(l2=0.0)])
def test_separable_classification_without_penalty(make):
    X = np.r_[np.linspace(-3, -1, 10), np.linspace(1, 3, 10)][:, None]
    y = (X[:, 0] > 0).astype(int)
    with pytest.raises(ConvergenceError, match="separable"):
        make().fit(X, y)


def test_separable_multinomial_without_penalty():
    X = np.repeat(np.array([[0.0, 3.0], [3.0, 0.0], [-3.0, -3.0]]), 5, axis=0)
    X += 0.1 * np.random.default_rng(0).standard_normal(X.shape)
    y = np.repeat([0, 1, 2], 5)
    with pytest.raises(ConvergenceError, match="separable|l2 > 0"):
        pi.LogisticRegression(l2=0.0, fit_intercept=False).fit(X, y)


# ------------------------------------------------------------------------------------------------
# LinearInfluence: construction
# ------------------------------------------------------------------------------------------------
def test_influence_constructor_checks(binary):
    X, y, model, _ = binary
    with pytest.raises(ValueError, match="X_train has 4 features but the model was trained on 5"):
        pi.LinearInfluence(model, X[:, :4], y)
    with pytest.raises(ValueError, match="y_train has 39 entries but the features have 40 rows"):
        pi.LinearInfluence(model, X, y[:-1])
    with pytest.raises(ValueError, match=r"y_train contains label\(s\) 2"):
        pi.LinearInfluence(model, X, np.where(y == 0, 2, 1))
    with pytest.raises(ValueError, match="y_train contains NaN"):
        pi.LinearInfluence(model, X, np.where(y == 0, np.nan, 1.0))
    with pytest.raises(ValueError, match="X_train contains NaN"):
        pi.LinearInfluence(model, np.where(X > 2, np.nan, X), y)
    with pytest.raises(ValueError, match="X_train is empty"):
        pi.LinearInfluence(model, X[:0], y[:0])
    with pytest.raises(ValueError, match="damping must be >= 0"):
        pi.LinearInfluence(model, X, y, damping=-1.0)
    with pytest.raises(ValueError, match="damping must be finite"):
        pi.LinearInfluence(model, X, y, damping=np.nan)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        pi.LinearInfluence(model, X, y, dtype=np.int32)
    with pytest.raises(TypeError, match="model must be a pyinfluence"):
        pi.LinearInfluence("model", X, y)


def test_influence_refuses_sklearn_estimator_with_hint(binary):
    from sklearn.linear_model import LogisticRegression as SkLR

    X, y, _, _ = binary
    with pytest.raises(TypeError, match="from_sklearn"):
        pi.LinearInfluence(SkLR().fit(X, y), X, y)


def test_influence_warns_when_not_at_optimum(binary):
    X, y, model, _ = binary
    with pytest.warns(NotAtOptimumWarning, match="not at the optimum"):
        pi.LinearInfluence(model, X[:-5], y[:-5])


def _ols_from_sklearn(X, y):
    from sklearn.linear_model import LinearRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAtOptimumWarning)
        return pi.from_sklearn(LinearRegression().fit(X, y), X, y, refine=False)


def test_not_positive_definite_mentions_damping():
    rng = np.random.default_rng(3)
    X = np.hstack([rng.standard_normal((25, 3)), np.zeros((25, 1))])  # zero column: H has a 0 pivot
    y = X[:, :3] @ np.array([1.0, 2.0, -1.0]) + 0.1 * rng.standard_normal(25)
    model = _ols_from_sklearn(X, y)
    assert model.l2 == 0.0
    with pytest.raises(NotPositiveDefiniteError, match=r"not positive definite.*damping=λ > 0") as info:
        pi.LinearInfluence(model, X, y)
    assert isinstance(info.value, ValueError)
    assert "l2=0" in str(info.value)
    inf = pi.LinearInfluence(model, X, y, damping=1e-3)  # damping cures it
    assert np.all(np.isfinite(inf.up_loss(X[:2], y[:2])))


def test_not_positive_definite_logistic_zero_column():
    X, y = _data(n=50, d=3, seed=5)
    X = np.hstack([X, np.zeros((50, 1))])
    model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    model.l2 = 0.0  # same θ̂ (weight of the zero column is 0), objective without penalty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAtOptimumWarning)
        with pytest.raises(NotPositiveDefiniteError, match="damping"):
            pi.LinearInfluence(model, X, y)


def test_duplicated_columns_without_penalty():
    """Exactly duplicated columns, l2=0: H is singular. Either the factorisation notices
    (NotPositiveDefiniteError naming damping) or, because every gradient is orthogonal to the
    null vector, the result must equal the pseudo-inverse answer."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((25, 3))
    X = np.hstack([X, X[:, [1]]])
    y = X @ np.array([1.0, 2.0, -1.0, 0.0]) + 0.1 * rng.standard_normal(25)
    model = _ols_from_sklearn(X, y)
    try:
        inf = pi.LinearInfluence(model, X, y)
    except NotPositiveDefiniteError as exc:
        assert "damping" in str(exc)
        return
    Xa = np.hstack([X, np.ones((25, 1))])
    G = (Xa @ model.theta_[0] - y)[:, None] * Xa
    ref = -G @ np.linalg.pinv(Xa.T @ Xa / 25) @ G[:3].T
    np.testing.assert_allclose(inf.up_loss(X[:3], y[:3]), ref, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# LinearInfluence: queries
# ------------------------------------------------------------------------------------------------
def test_query_argument_errors(binary):
    X, y, _, inf = binary
    n = X.shape[0]
    with pytest.raises(ValueError, match="X_test has 4 features but the model was trained on 5"):
        inf.up_loss(X[:2, :4], y[:2])
    with pytest.raises(ValueError, match="X_test has 3 samples but y_test has 2"):
        inf.up_loss(X[:3], y[:2])
    with pytest.raises(ValueError, match="X_test contains NaN"):
        inf.up_loss(np.full((1, 5), np.nan), [0])
    with pytest.raises(ValueError, match=r"y_test contains label\(s\) 3"):
        inf.up_loss(X[:2], [0, 3])
    with pytest.raises(ValueError, match="X_test is empty"):
        inf.up_loss(X[:0], y[:0])
    with pytest.raises(ValueError, match="X_test is a single point"):
        inf.up_loss(X[0], y[:3])
    with pytest.raises(ValueError, match="X_test has 4 features"):
        inf.up_loss(X[0, :4], y[0])
    with pytest.raises(ValueError, match="y_test must be a 1-D array.*scalar"):
        inf.up_loss(X[:2], 1)
    with pytest.raises(IndexError, match=f"train_idx contains index {n}"):
        inf.up_loss(X[:2], y[:2], train_idx=[0, n])
    with pytest.raises(TypeError, match="train_idx must contain integer indices"):
        inf.up_params(train_idx=[0.5])
    with pytest.raises(ValueError, match="train_idx is a boolean array of length 3"):
        inf.self_influence(train_idx=[True, False, True])
    with pytest.raises(ValueError, match=r"k must be <= 40 \(the number of training points\), got 41"):
        inf.top_k(X[:2], y[:2], k=n + 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        inf.top_k(X[:2], y[:2], k=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        inf.top_k(X[:2], y[:2], k=2.5)
    with pytest.raises(ValueError, match="method must be 'influence' or 'newton'"):
        inf.loo_change(X[:2], y[:2], method="exact")
    with pytest.raises(ValueError, match="repeated"):
        inf.loo_change(X[:2], y[:2], [1, 1], group=True)
    with pytest.raises(ValueError, match="train_idx is required with group=True"):
        inf.loo_change(X[:2], y[:2], group=True)
    with pytest.raises(ValueError, match="removes all 40 training points"):
        inf.loo_change(X[:2], y[:2], np.arange(n), group=True, method="newton")
    with pytest.raises(ValueError, match="train_idx is empty"):
        inf.retrain_loo(X[:2], y[:2], [], group=True)
    with pytest.raises(TypeError, match="group must be True or False"):
        inf.loo_change(X[:2], y[:2], [1], group="yes")


def test_query_errors_regression_and_multinomial(ridge, multi):
    X, y, _, inf = ridge
    with pytest.raises(ValueError, match="y_test contains NaN"):
        inf.up_loss(X[:2], [1.0, np.nan])
    X, y, _, inf = multi
    with pytest.raises(ValueError, match=r"y_test contains label\(s\) 5"):
        inf.up_loss(X[:2], [5, 0])
    with pytest.raises(ValueError, match=r"y_test contains label\(s\) 0.5"):
        inf.up_loss(X[:2], [0.5, 0])


# ------------------------------------------------------------------------------------------------
# hypothesis: random shapes/dtypes/values never crash, only clean exceptions
# ------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

CLEAN = (ValueError, TypeError, IndexError, RuntimeError)

_dtypes = st.sampled_from(
    [np.float64, np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_, np.complex128]
)
_values = st.sampled_from([0.0, 1.0, -1.0, 2.0, 0.5, 3.0, 1e300, -1e-300, np.nan, np.inf, -np.inf])


@st.composite
def arrays(draw, max_dims=3, max_side=5):
    dtype = draw(_dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    base = draw(_values)
    a = np.full(shape, base)
    if a.size:
        noise = draw(st.lists(_values, min_size=a.size, max_size=a.size))
        a = np.asarray(noise).reshape(shape)
    with np.errstate(all="ignore"):
        a = a.astype(dtype)
    layout = draw(st.sampled_from(["c", "f", "strided", "c"]))
    if layout == "f":
        a = np.asfortranarray(a)
    elif layout == "strided" and a.ndim >= 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]
    return a


_families = st.sampled_from(
    [
        ("logistic", 1),
        ("multinomial", 3),
        ("smooth_hinge", 1),
        ("squared", 1),
        ("multinomial", 1),
        ("bogus", 1),
    ]
)


@st.composite
def specs(draw):
    family, K = draw(_families)
    return dict(
        family=family,
        n_outputs=draw(st.sampled_from([K, K, 0, 2])),
        fit_intercept=draw(st.booleans()),
        penalize_intercept=draw(st.booleans()),
        l2=draw(st.sampled_from([1e-2, 0.0, 1.0, -1.0, np.nan])),
        temperature=draw(st.sampled_from([0.1, 1.0, 0.0, np.inf])),
    )


def _spec_or_none(kw):
    try:
        return _core.ModelSpec(**kw)
    except CLEAN:
        return None


@st.composite
def valid_problem(draw):
    """Mostly well-formed inputs with one perturbed argument, to reach deep into the kernels."""
    family, K = draw(
        st.sampled_from([("logistic", 1), ("multinomial", 3), ("smooth_hinge", 1), ("squared", 1)])
    )
    fit_intercept = draw(st.booleans())
    n = draw(st.integers(1, 6))
    d = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    X = rng.standard_normal((n, d)).astype(dtype)
    if family == "logistic":
        y = rng.integers(0, 2, n).astype(dtype)
    elif family == "multinomial":
        y = rng.integers(0, K, n).astype(dtype)
    elif family == "smooth_hinge":
        y = (2 * rng.integers(0, 2, n) - 1).astype(dtype)
    else:
        y = rng.standard_normal(n).astype(dtype)
    theta = 0.1 * rng.standard_normal((K, d + fit_intercept)).astype(dtype)
    spec = _core.ModelSpec(family, K, fit_intercept, False, 0.1, 0.5)
    args = {"X": X, "y": y, "theta": theta}
    which = draw(st.sampled_from(["none", "X", "y", "theta"]))
    if which != "none":
        args[which] = draw(arrays())
    return spec, args


def _try(fn, *a):
    try:
        return fn(*a)
    except CLEAN:
        return None


# PYINFLUENCE_FUZZ_EXAMPLES=5000 for a long, randomised run (default: 150, derandomised).
_N_FUZZ = int(os.environ.get("PYINFLUENCE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=_N_FUZZ,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize="PYINFLUENCE_FUZZ_EXAMPLES" not in os.environ,
)


@FUZZ
@given(kw=specs(), X=arrays(), y=arrays(), theta=arrays(), w=st.one_of(st.none(), arrays()))
def test_fuzz_core_functions_random(kw, X, y, theta, w):
    spec = _spec_or_none(kw)
    if spec is None:
        return
    _try(_core.per_example, spec, X, y, theta)
    _try(_core.objective, spec, X, y, theta, w)
    _try(_core.hessian, spec, X, y, theta, w)
    _try(_core.fit_newton, spec, X, y, theta, w, 1e-8, 5)
    _try(_core.LinearEngine, spec, X, y, theta, 0.1)


@FUZZ
@given(
    problem=valid_problem(),
    other=arrays(),
    k=st.integers(-2, 8),
    w=st.one_of(st.none(), arrays(max_dims=1)),
    damping=st.sampled_from([0.0, 1e-3, -1.0, np.nan, np.inf]),
)
def test_fuzz_core_near_valid(problem, other, k, w, damping):
    spec, a = problem
    X, y, theta = a["X"], a["y"], a["theta"]
    _try(_core.per_example, spec, X, y, theta)
    _try(_core.objective, spec, X, y, theta, w)
    _try(_core.hessian, spec, X, y, theta, w)
    _try(_core.fit_newton, spec, X, y, theta, w, 1e-8, 3)
    eng = _try(_core.LinearEngine, spec, X, y, theta, damping)
    if eng is None:
        return
    idx = (
        np.asarray(other).astype(np.int64, copy=False)
        if other.dtype.kind in "iu"
        else np.array([k], dtype=np.int64)
    )
    for call in (
        lambda: eng.hessian(),
        lambda: eng.gradients(X, y),
        lambda: eng.gradients(other, y),
        lambda: eng.solve(other),
        lambda: eng.up_params(X, other),
        lambda: eng.up_loss(X, y),
        lambda: eng.up_loss(other, y),
        lambda: eng.up_loss(X, y, other, y),
        lambda: eng.self_influence(),
        lambda: eng.self_influence(other, y),
        lambda: eng.pert_loss(X, y),
        lambda: eng.pert_loss(X, other, X, y),
        lambda: eng.top_k(X, y, k),
        lambda: eng.top_k(other, y, 1),
        lambda: eng.loo_newton(X, y, idx),
        lambda: eng.loo_newton(X, y, np.array([k], dtype=np.int64)),
        lambda: eng.loo_newton_group(X, y, idx),
        lambda: eng.loo_newton_group(X, y, np.array([k, 0], dtype=np.int64)),
    ):
        _try(call)


@FUZZ
@given(
    X_test=arrays(max_dims=3, max_side=6),
    y_test=arrays(max_dims=2, max_side=6),
    idx=st.one_of(st.none(), st.integers(-50, 50), arrays(max_dims=2)),
    k=st.integers(-1, 50),
    which=st.sampled_from(["binary", "multi", "ridge"]),
)
def test_fuzz_linear_influence(binary, multi, ridge, X_test, y_test, idx, k, which):
    _, _, _, inf = {"binary": binary, "multi": multi, "ridge": ridge}[which]
    with np.errstate(all="ignore"):
        moderate = X_test.dtype.kind != "c" and bool(np.all(np.abs(X_test.astype(float)) < 1e6))
    for call in (
        lambda: inf.up_loss(X_test, y_test, idx),
        lambda: inf.up_params(idx),
        lambda: inf.self_influence(idx),
        lambda: inf.pert_loss(X_test, y_test, idx),
        lambda: inf.loo_change(X_test, y_test, idx),
        lambda: inf.loo_change(X_test, y_test, idx, method="newton"),
        lambda: inf.loo_change(X_test, y_test, idx, method="newton", group=True),
        lambda: inf.top_k(X_test, y_test, k),
    ):
        try:
            out = call()
        except CLEAN:
            continue
        out = out.harmful_scores if isinstance(out, pi.TopK) else out
        if moderate:  # finite, moderate inputs must give finite scores (never NaN silently)
            assert np.all(np.isfinite(out))


@FUZZ
@given(
    X=arrays(max_dims=3, max_side=6),
    y=arrays(max_dims=2, max_side=6),
    est=st.sampled_from(["logistic", "svm", "ridge"]),
)
def test_fuzz_estimators(X, y, est):
    model = {
        "logistic": pi.LogisticRegression(),
        "svm": pi.SmoothHingeSVM(),
        "ridge": pi.RidgeRegression(),
    }[est]
    try:
        model.fit(X, y)
    except CLEAN:
        return
    with contextlib.suppress(CLEAN):
        pi.LinearInfluence(model, X, y, damping=1e-6)
