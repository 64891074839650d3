"""No NaN or inf is ever returned or ranked, and a leave-one-out Newton step that would divide by
a singular Hessian raises instead of returning inf.

Every input here is finite; the overflow happens inside the computation (features of huge magnitude, or
float32 beyond its range). Before the fix, ridge with test features of 1e200 returned an all-NaN ``up_loss`` and
``top_k`` ranked the NaNs; a training row of 1e160 overflowed H and the error advised damping; the n = p = 2
leave-one-out Newton step returned inf while ``group=True`` raised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyinfluence
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError


@pytest.fixture(scope="module")
def ridge():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * rng.normal(size=60)
    model = pyinfluence.RidgeRegression(l2=1e-2).fit(X, y)
    return model, X, y


@pytest.fixture(scope="module")
def logistic():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 3))
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=80) > 0).astype(float)
    model = pyinfluence.LogisticRegression(l2=1e-2).fit(X, y)
    return model, X, y


LINEAR_QUERIES = {
    "up_loss": lambda inf, Xt, yt: inf.up_loss(Xt, yt),
    "up_loss_subset": lambda inf, Xt, yt: inf.up_loss(Xt, yt, train_idx=[0, 3, 5]),
    "top_k": lambda inf, Xt, yt: inf.top_k(Xt, yt, k=5),
    "pert_loss": lambda inf, Xt, yt: inf.pert_loss(Xt, yt, train_idx=[0, 1]),
    "loo_change": lambda inf, Xt, yt: inf.loo_change(Xt, yt),
    "loo_newton": lambda inf, Xt, yt: inf.loo_change(Xt, yt, train_idx=[0, 1], method="newton"),
    "loo_newton_group": lambda inf, Xt, yt: inf.loo_change(
        Xt, yt, train_idx=[0, 1], method="newton", group=True
    ),
    "retrain_loo": lambda inf, Xt, yt: inf.retrain_loo(Xt, yt, train_idx=[0]),
}


@pytest.mark.parametrize("query", sorted(LINEAR_QUERIES))
def test_ridge_with_test_features_of_1e200_raises_naming_x_test(ridge, query):
    model, X, y = ridge
    inf = pyinfluence.LinearInfluence(model, X, y)
    X_test, y_test = X[:3] * 1e200, y[:3]
    with pytest.raises(NonFiniteError, match=r"X_test is the likely cause.*standardise") as info:
        LINEAR_QUERIES[query](inf, X_test, y_test)
    assert "largest |X_test| = " in str(info.value)
    # the same queries on well-scaled test points are finite (the checks do not fire on good data)
    out = LINEAR_QUERIES[query](inf, X[:3], y[:3])
    arrays = [out] if isinstance(out, np.ndarray) else [out.helpful_scores, out.harmful_scores]
    assert all(np.isfinite(a).all() for a in arrays)


def test_a_training_row_of_1e160_is_an_overflow_not_a_damping_problem(ridge):
    model, X, y = ridge
    X_bad = X.copy()
    X_bad[7] = 1e160
    with pytest.raises(NonFiniteError, match=r"training Hessian.*X_train is the likely cause") as info:
        pyinfluence.LinearInfluence(model, X_bad, y)
    assert "damping" not in str(info.value)
    assert not isinstance(info.value, NotPositiveDefiniteError)


@pytest.mark.parametrize("query", ["up_loss", "top_k", "loo_change"])
def test_float32_overflow_of_the_scores_raises_and_suggests_float64(ridge, query):
    """float32 ridge: test features of 1e19 keep the gradients (~1e38) and s_test finite, but the scores
    overflow — the check on the scored blocks is what catches it (top_k: before anything is ranked)."""
    model, X, y = ridge
    inf = pyinfluence.LinearInfluence(model, X, y, dtype=np.float32)
    with pytest.raises(NonFiniteError, match=r"float32.*compute in float64"):
        LINEAR_QUERIES[query](inf, X[:2] * 1e19, y[:2])


def test_float32_classifier_overflow_raises(logistic):
    model, X, y = logistic
    inf = pyinfluence.LinearInfluence(model, X, y, dtype=np.float32)
    # misclassified far out: residual ±1, gradients ~1e37 (finite), s_test = (H+λI)⁻¹g beyond float32's range
    with pytest.raises(NonFiniteError, match="X_test is the likely cause"):
        inf.top_k(X[:2] * 1e37, 1 - y[:2], k=3)
    assert np.isfinite(inf.up_loss(X[:2], y[:2])).all()


def test_loo_newton_that_leaves_a_singular_hessian_raises_like_the_group_path():
    """Ridge with l2 = 0 and n = p = 2: removing either point leaves one equation for two parameters. The
    group path's Cholesky refuses it; the one-at-a-time Woodbury path divided by 1 − c·d·xᵀA⁻¹x = 0 and
    returned inf."""
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([1.0, 2.0])
    model = pyinfluence.RidgeRegression(l2=0.0, fit_intercept=False).fit(X, y)
    inf = pyinfluence.LinearInfluence(model, X, y)
    # closed form: H = XᵀX/2 = I/2; without point i, H₋ᵢ = x_j x_jᵀ (rank 1): singular
    for i in (0, 1):
        kept = X[[1 - i]]
        assert np.linalg.matrix_rank(kept.T @ kept) == 1
        with pytest.raises(NotPositiveDefiniteError, match=f"without training point {i}"):
            inf.loo_change(X, y, train_idx=[i], method="newton")
        with pytest.raises(NotPositiveDefiniteError):
            inf.loo_change(X, y, train_idx=[i], method="newton", group=True)
    # with damping the leave-one-out Hessians are positive definite again: finite values that match the
    # group path (one factorisation per group) to rounding
    damped = pyinfluence.LinearInfluence(model, X, y, damping=1e-1)
    one = damped.loo_change(X, y, train_idx=[0, 1], method="newton")
    for i in (0, 1):
        group = damped.loo_change(X, y, train_idx=[i], method="newton", group=True)
        np.testing.assert_allclose(one[i], group, rtol=1e-10, atol=1e-12)


def test_multinomial_loo_newton_singular_removal_raises():
    """K > 1: the Woodbury system's eigenvalue test. Three classes, no intercept, l2 = 0, one point per
    class and two features: removing any point leaves the softmax parameters undetermined."""
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [2.0, 0.5], [-0.5, 1.5]])
    y = np.array([0, 1, 2, 0, 1, 2])
    model = pyinfluence.LogisticRegression(l2=1e-3, fit_intercept=False).fit(X, y)
    inf = pyinfluence.LinearInfluence(model, X, y)
    out = inf.loo_change(X[:2], y[:2], method="newton")  # well posed: finite
    assert np.isfinite(out).all()
    for i in range(X.shape[0]):  # agrees with the group path, point by point
        np.testing.assert_allclose(
            out[i],
            inf.loo_change(X[:2], y[:2], train_idx=[i], method="newton", group=True),
            rtol=1e-8,
            atol=1e-12,
        )


# ---------------------------------------------------------------------------------------------------------
# the torch path
# ---------------------------------------------------------------------------------------------------------
def _torch_ridge(dtype, outlier: float = 0.0):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=g, dtype=dtype)
    y = X @ torch.tensor([1.0, 2.0, -1.0], dtype=dtype) + 0.1 * torch.randn(50, generator=g, dtype=dtype)
    y[0] += outlier  # a training point with a large residual, hence a large gradient
    model = nn.Linear(3, 1).to(dtype)
    with torch.no_grad():  # the least-squares fit (near the optimum; deterministic)
        A = torch.cat([X, torch.ones(50, 1, dtype=dtype)], 1).double()
        w = torch.linalg.lstsq(A, y.double()[:, None]).solution[:, 0]
        model.weight.copy_(w[:3][None].to(dtype))
        model.bias.copy_(w[3:].to(dtype))

    def mse(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    return model, mse, X, y


TORCH_QUERIES = {
    "up_loss": lambda inf, Xt, yt: inf.up_loss(Xt, yt),
    "top_k": lambda inf, Xt, yt: inf.top_k(Xt, yt, k=3),
    "pert_loss": lambda inf, Xt, yt: inf.pert_loss(Xt, yt, train_idx=[0, 1]),
    "loo_change": lambda inf, Xt, yt: inf.loo_change(Xt, yt),
    "s_test": lambda inf, Xt, yt: inf.s_test(Xt, yt),
}


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("query", sorted(TORCH_QUERIES))
def test_torch_test_features_of_1e200_raise_naming_x_test(query, solver):
    model, mse, X, y = _torch_ridge(torch.float64)
    inf = pyinfluence.TorchInfluence(model, mse, (X, y), l2=1e-2, solver=solver, optimum_tol=None)
    with pytest.raises(NonFiniteError, match="X_test is the likely cause"):
        TORCH_QUERIES[query](inf, X[:2] * 1e200, y[:2])
    out = TORCH_QUERIES[query](inf, X[:2], y[:2])
    tensors = [out] if isinstance(out, torch.Tensor) else [out.helpful_scores, out.harmful_scores]
    assert all(bool(torch.isfinite(t).all()) for t in tensors)


def test_torch_float32_scores_overflow_raises_before_ranking():
    model, mse, X, y = _torch_ridge(torch.float32, outlier=1e4)
    inf = pyinfluence.TorchInfluence(model, mse, (X, y), l2=1e-2, optimum_tol=None)
    X_test = X[1:3] * 1e16
    # the test gradients and s_test stay finite (~1e35); the scores of the outlier and its neighbours overflow
    assert bool(torch.isfinite(inf.s_test(X_test, y[1:3])).all())
    with pytest.raises(NonFiniteError, match=r"scores ranked by top_k.*float32.*compute in float64"):
        inf.top_k(X_test, y[1:3], k=3)
    with pytest.raises(NonFiniteError, match=r"float32.*compute in float64"):
        inf.top_k(X[1:3] * 1e19, y[1:3], k=3)  # here the test gradients overflow already


def test_torch_training_data_that_overflows_is_named():
    model, mse, X, y = _torch_ridge(torch.float64)
    X = X.clone()
    X[4] = 1e160
    with pytest.raises(NonFiniteError, match="X_train is the likely cause"):
        pyinfluence.TorchInfluence(model, mse, (X, y), l2=1e-2, optimum_tol=None)
