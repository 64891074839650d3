"""Regression diagnostics (pyinfluence.linear.diagnostics) against statsmodels and actual refits.

References are independent of the code under test: statsmodels' OLSInfluence (whose dfbeta, dfbetas, dffits
and externally studentised residuals come from n actual OLS refits) and GLMInfluence on the same data, plain
numpy least-squares refits, and a leave-one-out Newton step written out with numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from sklearn.datasets import load_breast_cancer, load_diabetes

from pyinfluence.errors import NonFiniteError
from pyinfluence.linear import LinearInfluence, LogisticRegression, RidgeRegression, SmoothHingeSVM
from pyinfluence.linear.diagnostics import RegressionDiagnostics, regression_diagnostics

TOL = 1e-8  # the agreement asked for: relative to the largest entry of the reference


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = TOL) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * float(np.max(np.abs(expected))))


@pytest.fixture(scope="module")
def diabetes():
    X, y = load_diabetes(return_X_y=True)
    return X, y


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X = X[:, [0, 1, 4, 8, 21]]  # a few features, standardised: the unpenalised GLM has a finite MLE
    return (X - X.mean(0)) / X.std(0), y


@pytest.fixture(scope="module")
def ols(diabetes):
    X, y = diabetes
    model = RidgeRegression(l2=0.0).fit(X, y)
    # statsmodels' design: the intercept column last, as in pyinfluence's theta_
    res = sm.OLS(y, np.column_stack([X, np.ones(len(y))])).fit()
    return regression_diagnostics(model, X, y), res.get_influence()


@pytest.fixture(scope="module")
def glm(cancer):
    X, y = cancer
    model = LogisticRegression(l2=0.0).fit(X, y)
    # tol: statsmodels' default IRLS tolerance leaves bse (hence dfbetas) ~1e-7 from the optimum's
    res = sm.GLM(y, np.column_stack([X, np.ones(len(y))]), family=sm.families.Binomial()).fit(tol=1e-14)
    return regression_diagnostics(LinearInfluence(model, X, y)), res


def test_ols_matches_statsmodels(ols):
    D, oi = ols
    assert D.kind == "ols" and D.exact
    assert_close(D.leverage, oi.hat_matrix_diag)
    assert_close(D.cooks_distance, oi.cooks_distance[0])
    assert_close(D.dfbeta, oi.dfbeta)  # statsmodels: n actual refits
    assert_close(D.dfbetas, oi.dfbetas)
    assert_close(D.dffits, oi.dffits[0])
    assert_close(D.resid_studentized, oi.resid_studentized_internal)
    assert_close(D.resid_studentized_external, oi.resid_studentized_external)
    assert_close(D.sigma_loo, np.sqrt(oi.sigma2_not_obsi))
    assert D.scale == pytest.approx(oi.scale, rel=TOL)
    assert D.dffits_threshold == pytest.approx(oi.dffits[1], rel=1e-12)


def test_ols_dfbeta_is_the_exact_refit(diabetes, ols):
    """θ̂ − θ̂₍ᵢ₎ from numpy least-squares refits without point i (the highest-leverage points and two others)."""
    X, y = diabetes
    D, _ = ols
    Xa = np.column_stack([X, np.ones(len(y))])
    theta = np.linalg.lstsq(Xa, y, rcond=None)[0]
    for i in [*np.argsort(D.leverage)[-3:], 0, 200]:
        keep = np.arange(len(y)) != i
        theta_i = np.linalg.lstsq(Xa[keep], y[keep], rcond=None)[0]
        assert_close(D.dfbeta[i], theta - theta_i, tol=1e-9)
        resid = y[keep] - Xa[keep] @ theta_i
        s_i = np.sqrt(resid @ resid / (keep.sum() - Xa.shape[1]))
        assert D.sigma_loo[i] == pytest.approx(s_i, rel=1e-10)


def test_ols_without_intercept(diabetes):
    X, y = diabetes
    y = y - 100.0  # no intercept: keep the fit reasonable
    model = RidgeRegression(l2=0.0, fit_intercept=False).fit(X, y)
    D = regression_diagnostics(model, X, y)
    oi = sm.OLS(y, X).fit().get_influence()
    assert D.dfbeta.shape == (len(y), X.shape[1])
    assert_close(D.leverage, oi.hat_matrix_diag)
    assert_close(D.cooks_distance, oi.cooks_distance[0])
    assert_close(D.dfbetas, oi.dfbetas)
    assert_close(D.dffits, oi.dffits[0])


def test_logistic_matches_statsmodels_glm(glm):
    D, res = glm
    gi = res.get_influence()
    assert D.kind == "logistic" and not D.exact
    assert D.resid_studentized_external is None and D.sigma_loo is None and D.scale == 1.0
    assert_close(D.leverage, gi.hat_matrix_diag)
    assert_close(D.cooks_distance, gi.cooks_distance[0])  # one-step, as statsmodels
    assert_close(D.dfbeta, gi.d_params)  # one-step, as statsmodels
    assert_close(D.dfbetas, gi.dfbetas)
    assert_close(D.dffits, gi.d_linpred_scaled)
    assert_close(D.resid_studentized, gi.resid_studentized)


def test_logistic_dfbeta_is_one_newton_step(cancer, glm):
    """dfbeta_i = −(Newton step from θ̂ on the log-likelihood without point i), written out with numpy."""
    X, y = cancer
    D, res = glm
    Xa = np.column_stack([X, np.ones(len(y))])
    theta = res.params
    mu = 1.0 / (1.0 + np.exp(-Xa @ theta))
    for i in [int(np.argmax(D.cooks_distance)), int(np.argmax(D.leverage)), 7]:
        keep = np.arange(len(y)) != i
        grad = Xa[keep].T @ (y[keep] - mu[keep])  # ∇ log-likelihood without i, at θ̂
        info = (Xa[keep] * (mu * (1 - mu))[keep, None]).T @ Xa[keep]
        step = np.linalg.solve(info, grad)
        assert_close(D.dfbeta[i], -step, tol=1e-8)


def test_properties_and_read_only(ols, glm):
    for D in (ols[0], glm[0]):
        assert isinstance(D, RegressionDiagnostics)
        n, p = D.n_train, D.n_params
        assert D.leverage.sum() == pytest.approx(p, rel=1e-10)  # trace of the hat matrix
        assert np.all((D.leverage > 0) & (D.leverage < 1)) and np.all(D.cooks_distance >= 0)
        for a in (D.leverage, D.cooks_distance, D.dfbeta, D.dfbetas, D.dffits, D.resid_studentized):
            assert a.dtype == np.float64 and a.shape[0] == n and np.all(np.isfinite(a))
            with pytest.raises(ValueError):
                a[0] = 0.0


def test_float32_engine_is_computed_in_float64(diabetes, ols):
    X, y = diabetes
    model = RidgeRegression(l2=0.0).fit(X, y)
    D32 = regression_diagnostics(LinearInfluence(model, X.astype(np.float32), y))
    assert D32.dfbetas.dtype == np.float64
    # only the rounding of X to float32 separates it from the float64 result
    assert_close(D32.cooks_distance, ols[0].cooks_distance, tol=1e-3)
    assert_close(D32.dfbetas, ols[0].dfbetas, tol=1e-3)


def test_refuses_penalised_damped_and_other_models(diabetes, cancer):
    X, y = diabetes
    with pytest.raises(ValueError, match="l2=0.01"):
        regression_diagnostics(RidgeRegression(l2=0.01).fit(X, y), X, y)
    model = RidgeRegression(l2=0.0).fit(X, y)
    with pytest.raises(ValueError, match="damping"):
        regression_diagnostics(LinearInfluence(model, X, y, damping=1e-3))
    Xc, yc = cancer
    with pytest.raises(ValueError, match="SmoothHingeSVM"):
        regression_diagnostics(SmoothHingeSVM(l2=0.01).fit(Xc, yc), Xc, yc)
    labels = np.digitize(Xc[:, 0], [-0.5, 0.5])  # three classes
    with pytest.raises(ValueError, match="multinomial"):
        regression_diagnostics(LogisticRegression(l2=0.1).fit(Xc, labels), Xc, labels)
    with pytest.raises(TypeError, match="model must be"):
        regression_diagnostics(object(), X, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="X_train and y_train are required"):
        regression_diagnostics(model)
    with pytest.raises(ValueError, match="taken from the LinearInfluence"):
        regression_diagnostics(LinearInfluence(model, X, y), X, y)


def test_undefined_cases_raise(diabetes):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=30)
    # a feature nonzero in row 4 only: leverage 1, the model without row 4 is not identified
    Xs = np.column_stack([X, np.eye(30)[4]])
    with pytest.raises(ValueError, match=r"point\(s\) \[4\] have leverage"):
        regression_diagnostics(RidgeRegression(l2=0.0).fit(Xs, y), Xs, y)
    y_exact = X @ np.array([1.0, -2.0, 0.5]) + 3.0
    with pytest.raises(ValueError, match="fitted exactly"):
        regression_diagnostics(RidgeRegression(l2=0.0).fit(X, y_exact), X, y_exact)
    X5, y5 = X[:5], y[:5]  # p = 4: s₍ᵢ₎ needs n ≥ 6
    with pytest.raises(ValueError, match="n ≥ p \\+ 2"):
        regression_diagnostics(RidgeRegression(l2=0.0).fit(X5, y5), X5, y5)


def test_non_finite_is_an_error(cancer):
    """A point fitted with probability 1 to rounding has an infinite Pearson residual: an error, not inf."""
    X, y = cancer
    X = X.copy()
    X[0] = 60.0 * np.sign(LogisticRegression(l2=0.0).fit(X, y).coef_[0]) * (1 if y[0] == 1 else -1)
    model = LogisticRegression(l2=0.0).fit(X, y)
    assert abs(float(model.decision_function(X[:1])[0])) > 40  # μ = 0 or 1 in float64
    with pytest.raises(
        NonFiniteError, match=r"resid_studentized is not finite for training point\(s\) \[0\]"
    ):
        regression_diagnostics(model, X, y)


def test_linear_influence_diagnostics_method(diabetes, ols):
    """``LinearInfluence.diagnostics()`` (the method users find first) gives statsmodels' values too."""
    X, y = diabetes
    _, oi = ols
    D = LinearInfluence(RidgeRegression(l2=0.0).fit(X, y), X, y).diagnostics()
    assert_close(D.leverage, oi.hat_matrix_diag)
    assert_close(D.cooks_distance, oi.cooks_distance[0])
    assert_close(D.dffits, oi.dffits[0])
